"""Predecessor scores and the four classes of a residual feature (Laptev et al. 2025, Sec. 3.3).

For a feature with embedding f in the ``resid`` SAE of layer L and P ∈ {R = resid L−1, M = mlp L, A = attn L}:
s(P) = max_k f · e_k^P. With thresholds t_R (default 0.5) and t_M = t_A (default 0.15):

=============== ==========================================================
class           rule
=============== ==========================================================
``translated``  s(R) ≥ t_R and s(M) < t_M and s(A) < t_A
``processed``   s(R) ≥ t_R and (s(M) ≥ t_M or s(A) ≥ t_A)   (by mlp / attn / both)
``newborn``     s(R) < t_R and (s(M) ≥ t_M or s(A) ≥ t_A)   (from mlp / attn / both)
``unexplained`` all below
=============== ==========================================================

A missing predecessor SAE (allowed only with ``allow_missing=True``) has score NaN. A feature whose class the missing
scores could change is ``undetermined`` (e.g. s(R) ≥ t_R with no mlp / attn SAE: translated *or* processed), never
counted as translated or unexplained; a class the known scores already decide (processed / newborn by a module that
is present) stands.

Chance baseline: how often a random direction would pass a threshold. :func:`chance_rate` draws isotropic random
unit directions in d_model and scores each against a predecessor SAE's dictionary like a feature (the top-1 cosine);
the fraction at or above the threshold is the rate at which a score that high says nothing (at d = 640 and
t_M = 0.15, several percent). :meth:`hf_sae.flow.FeatureFlow.predecessors` reports it per predecessor.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._io import write_text_atomic
from ..errors import FlowError
from ..sites import D_MODEL_SITES
from .matching import match_decoders
from .plotting import plot_summary

PREDECESSOR_SITES = D_MODEL_SITES
"""The sites of a resid feature's predecessors P, in the order R (resid L−1), M (mlp L), A (attn L)."""
CLASSES = ("translated", "processed", "newborn", "unexplained", "undetermined")
VIA = ("", "mlp", "attn", "both")  # which modules explain a processed / newborn feature
DEFAULT_THRESHOLDS = {"resid": 0.5, "mlp": 0.15, "attn": 0.15}
_CHANCE_STREAM = 0x5EED_F10F  # chance directions come from their own random stream


def predecessor_keys(layer: int) -> tuple[tuple[str, tuple[int, str]], ...]:
    """(site, SAE key) of the predecessors R, M, A of the resid features of ``layer``."""
    return (("resid", (layer - 1, "resid")), ("mlp", (layer, "mlp")), ("attn", (layer, "attn")))


def check_threshold(name: str, value: float) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not -1 <= value <= 1:
        raise FlowError(f"threshold {name}={value!r} must be a cosine in [-1, 1], e.g. {name}=0.5.")
    return float(value)


def classify(
    s_resid: Tensor, s_mlp: Tensor, s_attn: Tensor, t_resid: float = 0.5, t_mlp: float = 0.15, t_attn: float = 0.15
) -> tuple[Tensor, Tensor]:
    """Vectorised classes of the table above.

    s_resid, s_mlp, s_attn: (F,) scores (NaN = no SAE there). Returns ``category`` (F,) int64 indexing
    :data:`CLASSES` and ``via`` (F,) int64 indexing :data:`VIA` (1 = mlp, 2 = attn, 3 = both, 0 = neither; the
    modules known to pass). ``undetermined`` where a NaN score could change the class.
    """
    from_resid = s_resid >= t_resid  # NaN compares False
    by_mlp = s_mlp >= t_mlp
    by_attn = s_attn >= t_attn
    via = by_mlp.long() + 2 * by_attn.long()
    module = via > 0
    category = torch.full_like(via, CLASSES.index("unexplained"))
    category[from_resid & ~module] = CLASSES.index("translated")
    category[from_resid & module] = CLASSES.index("processed")
    category[~from_resid & module] = CLASSES.index("newborn")
    module_unknown = ~module & (s_mlp.isnan() | s_attn.isnan())  # a missing module might have passed
    category[s_resid.isnan() | module_unknown] = CLASSES.index("undetermined")
    return category, via


@torch.no_grad()
def chance_rate(decoder: Tensor, threshold: float, n: int = 1024, seed: int = 0, block_size: int = 4096) -> float:
    """The fraction of ``n`` isotropic random unit directions (seeded) whose top-1 cosine with the rows of
    ``decoder`` (F, d) is ≥ ``threshold``: how often a score that high arises by chance."""
    generator = torch.Generator().manual_seed(_CHANCE_STREAM + seed)  # not the stream of torch.manual_seed(seed)
    directions = torch.randn(n, decoder.shape[1], generator=generator)
    scores, _ = match_decoders(directions, decoder, 1, block_size=block_size, device=decoder.device)
    return float((scores[:, 0] >= threshold).float().mean())


def class_label(category: int, via: int) -> str:
    """``"processed by mlp"``, ``"newborn from both"``, ``"translated"``, ``"unexplained"``."""
    name = CLASSES[category]
    if name == "processed":
        return f"processed by {VIA[via]}"
    if name == "newborn":
        return f"newborn from {VIA[via]}"
    return name


@dataclass
class PredecessorTable:
    """Predecessor scores, best ids and classes of every feature of the ``resid`` SAE of one layer.

    Attributes:
        layer: L.
        s_resid, s_mlp, s_attn: (F,) float32 s(R), s(M), s(A) (NaN where the flow has no such SAE).
        id_resid, id_mlp, id_attn: (F,) int64 the top-1 predecessor ids (-1 where there is no SAE).
        category: (F,) int64 index into :data:`CLASSES`; via: (F,) int64 index into :data:`VIA`.
        thresholds: {"resid": t_R, "mlp": t_M, "attn": t_A} used for the classes.
        chance: {site: fraction of random directions scoring ≥ that site's threshold} (:func:`chance_rate`) for the
            predecessor SAEs present; empty when not computed.
    """

    layer: int
    s_resid: Tensor
    s_mlp: Tensor
    s_attn: Tensor
    id_resid: Tensor
    id_mlp: Tensor
    id_attn: Tensor
    category: Tensor
    via: Tensor
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    chance: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.s_resid.shape[0]

    def scores(self, site: str) -> Tensor:
        return {"resid": self.s_resid, "mlp": self.s_mlp, "attn": self.s_attn}[site]

    def ids(self, site: str) -> Tensor:
        return {"resid": self.id_resid, "mlp": self.id_mlp, "attn": self.id_attn}[site]

    def label(self, feature: int) -> str:
        """The class of one feature, e.g. ``"processed by attn"``."""
        return class_label(int(self.category[feature]), int(self.via[feature]))

    def labels(self) -> list[str]:
        return [class_label(c, v) for c, v in zip(self.category.tolist(), self.via.tolist())]

    def mask(self, name: str) -> Tensor:
        """(F,) bool of features of class ``name`` (one of :data:`CLASSES`, or a label such as "newborn from mlp")."""
        if name in CLASSES:
            return self.category == CLASSES.index(name)
        for category in ("processed", "newborn"):
            for v in range(1, len(VIA)):
                if name == class_label(CLASSES.index(category), v):
                    return (self.category == CLASSES.index(category)) & (self.via == v)
        raise FlowError(f"class {name!r} is unknown; use one of {list(CLASSES)} or e.g. 'newborn from mlp'.")

    def counts(self, detailed: bool = False) -> dict[str, int]:
        """Number of features per class (with ``detailed``, per class and module, e.g. "processed by both")."""
        if not detailed:
            return {name: int((self.category == i).sum()) for i, name in enumerate(CLASSES)}
        out = {"translated": int(self.mask("translated").sum())}
        for category, word in (("processed", "by"), ("newborn", "from")):
            for via in VIA[1:]:
                out[f"{category} {word} {via}"] = int(self.mask(f"{category} {word} {via}").sum())
        out["unexplained"] = int(self.mask("unexplained").sum())
        out["undetermined"] = int(self.mask("undetermined").sum())
        return out

    def row(self, feature: int) -> dict:
        """Everything about one feature as a plain dict."""
        return {
            "layer": self.layer,
            "feature": feature,
            "s_resid": float(self.s_resid[feature]),
            "id_resid": int(self.id_resid[feature]),
            "s_mlp": float(self.s_mlp[feature]),
            "id_mlp": int(self.id_mlp[feature]),
            "s_attn": float(self.s_attn[feature]),
            "id_attn": int(self.id_attn[feature]),
            "class": self.label(feature),
        }

    def to_rows(self, features: Iterable[int] | None = None) -> list[dict]:
        return [self.row(f) for f in (range(len(self)) if features is None else features)]

    def to_csv(self, path=None) -> str:
        """The table as CSV (one row per feature); also written to ``path`` when given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.row(0)))
        writer.writeheader()
        for row in self.to_rows():
            writer.writerow(row)
        text = buffer.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        chance = ", ".join(f"{site} {100 * rate:.1f}%" for site, rate in self.chance.items())
        chance = f", chance of passing by random direction: {chance}" if chance else ""
        return f"PredecessorTable(layer={self.layer}, features={len(self)}, {counts}{chance})"


def build_table(
    layer: int,
    matches: dict[str, tuple[Tensor, Tensor] | None],
    n_features: int,
    thresholds: dict[str, float],
) -> PredecessorTable:
    """Assemble a table from top-1 matches {"resid"|"mlp"|"attn": (scores (F,), ids (F,)) or None (missing)}."""
    columns = {}
    for site in PREDECESSOR_SITES:
        found = matches.get(site)
        if found is None:
            columns[site] = (torch.full((n_features,), math.nan), torch.full((n_features,), -1, dtype=torch.long))
        else:
            columns[site] = (found[0].float(), found[1].long())
    category, via = classify(
        columns["resid"][0],
        columns["mlp"][0],
        columns["attn"][0],
        thresholds["resid"],
        thresholds["mlp"],
        thresholds["attn"],
    )
    return PredecessorTable(
        layer=layer,
        s_resid=columns["resid"][0],
        s_mlp=columns["mlp"][0],
        s_attn=columns["attn"][0],
        id_resid=columns["resid"][1],
        id_mlp=columns["mlp"][1],
        id_attn=columns["attn"][1],
        category=category,
        via=via,
        thresholds=dict(thresholds),
    )


@dataclass
class FlowSummary:
    """Per-layer class counts (the paper's per-layer picture: how residual features arise at each layer).

    Attributes:
        layers: the layers, ascending.
        counts: {layer: {class label: number of features}} (detailed labels, e.g. "newborn from attn").
        tables: {layer: PredecessorTable}.
    """

    layers: list[int]
    counts: dict[int, dict[str, int]]
    tables: dict[int, PredecessorTable]

    def fractions(self) -> dict[int, dict[str, float]]:
        out = {}
        for layer, counts in self.counts.items():
            total = max(1, sum(counts.values()))
            out[layer] = {name: n / total for name, n in counts.items()}
        return out

    def __str__(self) -> str:
        if not self.layers:
            return "(no layers)"
        names = list(self.counts[self.layers[0]])
        width = max(len(n) for n in names)
        head = f"{'layer':>5}  " + "  ".join(f"{n:>{width}}" for n in names)
        lines = [head]
        for layer in self.layers:
            total = max(1, sum(self.counts[layer].values()))
            cells = "  ".join(
                f"{f'{self.counts[layer][n]} ({100 * self.counts[layer][n] / total:.0f}%)':>{width}}" for n in names
            )
            lines.append(f"{layer:>5}  {cells}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """A stacked bar chart of the class fractions per layer (PNG)."""
        plot_summary(self, path)

"""Checking feature flow on data: co-activation groups, deactivation, skip-layer "transcoders", calibration.

* :func:`validate` (Laptev et al. 2025, Sec. 5.1): on real tokens (BOS and padding excluded), every active feature of
  the resid SAE of layer L is put in one of 8 groups by which of its top-1 predecessors (resid L−1, mlp L, attn L)
  are active on the same token: RES, MLP, ATT, RES&MLP, RES&ATT, MLP&ATT, RES&MLP&ATT, nowhere. The data-free
  scores should separate the groups: s(R) high where the RES predecessor is co-active, and so on; reported as group
  means and as the AUC of s(P) between occurrences with and without P's predecessor active.
* :func:`deactivation` (Sec. 5.2): remove a target's top-1 predecessor (its contribution a·W_dec at the
  predecessor's site, the ``rescale`` intervention with r = 0) and measure 1 − z_new/z_old of the target on the
  tokens where both were active.
* :func:`skip_layer_eval` (Mechanistic Permutability Eq. 5): f = encode_t(x_t), f̂ = T(t→t+1) f,
  x̂_{t+1} = decode_{t+1}(f̂); EV of x̂_{t+1} against x_{t+1} and the LM loss with x_{t+1} replaced by x̂_{t+1}.
* :func:`mean_nonzero_activations`: each latent's mean non-zero activation (the TopK analogue of JumpReLU folding).
* :func:`annotate_top_tokens`: each node's top activating tokens, for the HTML view.

Texts are read by :mod:`hf_sae.lm_inputs`, as in :mod:`hf_sae.evaluation` (strings with a tokenizer, token-id lists,
a (B, T) tensor or a ``BatchEncoding``); BOS (``model.config.bos_token_id``), padding and the SAEs'
``excluded_token_ids`` are not counted.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import lm_inputs
from ..errors import FlowError
from ..evaluation import LossComparison
from ..sites import capture_activations, resolve_site
from ..sparse import SparseLatents
from ..steering import ActivationPatch, latent_values
from .graph import parse_node_id
from .predecessors import PREDECESSOR_SITES
from .steering import FlowHook

GROUPS = ("nowhere", "RES", "MLP", "RES&MLP", "ATT", "RES&ATT", "MLP&ATT", "RES&MLP&ATT")  # index = bit mask


# ------------------------------------------------------------------------------------------------------ inputs
def _excluded(flow, model: nn.Module, keys: Iterable, exclude_token_ids: Sequence[int] | None) -> list[int]:
    return lm_inputs.excluded_token_ids(model, (flow.config(key) for key in keys), exclude_token_ids)


def _predecessor_key(layer: int, site: str) -> tuple[int, str]:
    return (layer - 1, "resid") if site == "resid" else (layer, site)


def _encode(sae: nn.Module, activation: Tensor) -> SparseLatents:
    return sae.encode(activation.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype))


def _dense_active(latents: SparseLatents, d_sae: int) -> Tensor:
    """(N, d_sae) bool: which latents are active (value > 0) in each row."""
    active = torch.zeros(latents.values.shape[0], d_sae, dtype=torch.bool, device=latents.values.device)
    return active.scatter_(1, latents.indices, latents.values > 0)


# -------------------------------------------------------------------------------------------------- validate
@dataclass
class ValidationResult:
    """Co-activation groups of resid features with their top-1 predecessors, per layer.

    Attributes:
        layers: the resid layers checked.
        counts: (n_layers, 8) occurrences (token, active feature) per group (:data:`GROUPS`, index = bit mask
            RES=1, MLP=2, ATT=4).
        score_sums: (n_layers, 8, 3) sums of s(R), s(M), s(A) over each group's occurrences (NaN: no SAE there).
        histograms: (n_layers, 3, 2, bins) counts of s(P) over [-1, 1] for occurrences whose P predecessor is
            inactive (0) / active (1): the data behind :meth:`auc`.
        n_tokens: counted tokens (BOS, padding and excluded ids not counted).
        missing: {layer: [sites whose predecessor SAE the flow lacks]}.
    """

    layers: list[int]
    counts: Tensor
    score_sums: Tensor
    histograms: Tensor
    n_tokens: int
    missing: dict[int, list[str]] = field(default_factory=dict)

    def _rows(self, layer: int | None) -> slice | list[int]:
        if layer is None:
            return slice(None)
        if layer not in self.layers:
            raise FlowError(f"layer {layer} was not validated; validated layers: {self.layers}.")
        return [self.layers.index(layer)]

    def groups(self, layer: int | None = None) -> dict[str, dict[str, float]]:
        """{group: {count, fraction, s_resid, s_mlp, s_attn (group means)}}; ``layer=None`` pools all layers."""
        rows = self._rows(layer)
        counts = self.counts[rows].sum(0).double()
        sums = self.score_sums[rows].sum(0)
        total = max(1.0, float(counts.sum()))
        out = {}
        for g, name in enumerate(GROUPS):
            n = float(counts[g])
            means = (sums[g] / n).tolist() if n > 0 else [math.nan] * 3
            out[name] = {
                "count": int(n),
                "fraction": n / total,
                "s_resid": means[0],
                "s_mlp": means[1],
                "s_attn": means[2],
            }
        return out

    def auc(self, layer: int | None = None) -> dict[str, float]:
        """AUC of s(P) separating occurrences whose P predecessor is co-active from the rest (0.5 = no separation;
        NaN when one side is empty or the flow has no SAE for P)."""
        hist = self.histograms[self._rows(layer)].sum(0).double()  # (3, 2, bins)
        out = {}
        for p, site in enumerate(PREDECESSOR_SITES):
            negative, positive = hist[p, 0], hist[p, 1]
            n_neg, n_pos = float(negative.sum()), float(positive.sum())
            if n_neg == 0 or n_pos == 0:
                out[site] = math.nan
                continue
            below = torch.cumsum(negative, 0) - negative  # negatives strictly below each bin
            wins = (positive * (below + 0.5 * negative)).sum()
            out[site] = float(wins / (n_neg * n_pos))
        return out

    def __str__(self) -> str:
        lines = [
            f"co-activation groups over {self.n_tokens} tokens, layers {self.layers} (pooled)",
            f"{'group':<12} {'count':>9} {'share':>6}  {'s(R)':>6} {'s(M)':>6} {'s(A)':>6}",
        ]
        for name, row in self.groups().items():
            lines.append(
                f"{name:<12} {row['count']:>9} {100 * row['fraction']:>5.1f}%  {row['s_resid']:>6.3f} "
                f"{row['s_mlp']:>6.3f} {row['s_attn']:>6.3f}"
            )
        auc = self.auc()
        lines.append("AUC of s(P), P co-active vs not: " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))
        return "\n".join(lines)


@torch.no_grad()
def validate(
    flow,
    model: nn.Module,
    texts,
    *,
    layers: Iterable[int] | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
    bins: int = 200,
) -> ValidationResult:
    """Group every active resid feature by which of its top-1 predecessors are co-active (see the module docstring).

    ``layers`` defaults to every resid layer with at least one predecessor SAE in the flow. Predecessor SAEs the flow
    lacks count as never active (listed in ``result.missing``).
    """
    if layers is None:
        layers = [
            layer
            for layer in flow.layers("resid")
            if any(_predecessor_key(layer, s) in flow for s in PREDECESSOR_SITES)
        ]
    layers = sorted(layers)
    if not layers:
        raise FlowError("no resid layer with a predecessor SAE (resid L-1, mlp L or attn L) to validate.")
    tables = {layer: flow.predecessors(layer, allow_missing=True) for layer in layers}
    keys = sorted(
        {(layer, "resid") for layer in layers}
        | {
            _predecessor_key(layer, s)
            for layer in layers
            for s in PREDECESSOR_SITES
            if _predecessor_key(layer, s) in flow
        }
    )
    missing = {layer: [s for s in PREDECESSOR_SITES if _predecessor_key(layer, s) not in flow] for layer in layers}
    lists, _ = lm_inputs.tokenize_texts(model, texts, tokenizer, max_length)
    excluded = _excluded(flow, model, keys, exclude_token_ids)
    sites = [resolve_site(model, *key) for key in keys]
    counts = torch.zeros(len(layers), 8, dtype=torch.long)
    sums = torch.zeros(len(layers), 8, 3, dtype=torch.float64)
    hists = torch.zeros(len(layers), 3, 2, bins, dtype=torch.long)
    n_tokens = 0
    for _, input_ids, attention_mask in lm_inputs.batches(lists, batch_size, lm_inputs.model_device(model)):
        acts = capture_activations(model, sites, input_ids=input_ids, attention_mask=attention_mask)
        kept = lm_inputs.kept_tokens(input_ids, attention_mask, excluded)
        n_tokens += int(kept.sum())
        latents = {key: _encode(flow[key], acts[key][kept]) for key in keys}
        for row, layer in enumerate(layers):
            table = tables[layer]
            target = latents[(layer, "resid")]
            values, indices = target.values.cpu(), target.indices.cpu()
            token, slot = (values > 0).nonzero(as_tuple=True)
            feature = indices[token, slot]
            group = torch.zeros_like(feature)
            for p, site in enumerate(PREDECESSOR_SITES):
                key = _predecessor_key(layer, site)
                scores = table.scores(site)[feature].double()
                if key not in latents:
                    continue
                active = _dense_active(latents[key], flow.config(key).d_sae).cpu()
                co_active = active[token, table.ids(site)[feature]]
                group |= co_active.long() << p
                bucket = ((scores.clamp(-1, 1) + 1) / 2 * bins).long().clamp_(0, bins - 1)
                hists[row, p, 0] += torch.bincount(bucket[~co_active], minlength=bins)
                hists[row, p, 1] += torch.bincount(bucket[co_active], minlength=bins)
            counts[row] += torch.bincount(group, minlength=8)
            for p, site in enumerate(PREDECESSOR_SITES):
                scores = table.scores(site)[feature].double()
                sums[row, :, p] += torch.zeros(8, dtype=torch.float64).index_add_(0, group, scores)
    return ValidationResult(layers, counts, sums, hists, n_tokens, {k: v for k, v in missing.items() if v})


# ---------------------------------------------------------------------------------------------- deactivation
@dataclass
class DeactivationResult:
    """Activation change 1 − z_new/z_old of resid features of ``layer`` when a top-1 predecessor is removed.

    Attributes:
        layer: L.
        rows: one dict per (feature, predecessor site): feature, site, predecessor (id), score (s(P)),
            n_tokens (tokens where both were active), change (mean 1 − z_new/z_old over them; NaN if none).
    """

    layer: int
    rows: list[dict[str, Any]]

    def mean_change(self) -> dict[str, float]:
        """Token-weighted mean change per predecessor site."""
        out = {}
        for site in PREDECESSOR_SITES:
            rows = [r for r in self.rows if r["site"] == site and r["n_tokens"] > 0]
            n = sum(r["n_tokens"] for r in rows)
            out[site] = sum(r["change"] * r["n_tokens"] for r in rows) / n if n else math.nan
        return out

    def __str__(self) -> str:
        lines = [
            f"deactivation at layer {self.layer}: {'feature':>8} {'site':>6} {'pred':>8} {'s(P)':>6} "
            f"{'tokens':>7} {'1-z_new/z_old':>14}"
        ]
        for r in self.rows:
            lines.append(
                f"{'':>22}{r['feature']:>8} {r['site']:>6} {r['predecessor']:>8} {r['score']:>6.3f} "
                f"{r['n_tokens']:>7} {r['change']:>14.3f}"
            )
        lines.append("mean change: " + ", ".join(f"{k} {v:.3f}" for k, v in self.mean_change().items()))
        return "\n".join(lines)


@torch.no_grad()
def deactivation(
    flow,
    model: nn.Module,
    texts,
    layer: int,
    *,
    features: Sequence[int] | None = None,
    n_features: int = 8,
    sites: Iterable[str] = PREDECESSOR_SITES,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
) -> DeactivationResult:
    """Remove each chosen feature's top-1 predecessor and measure its activation change (module docstring).

    ``features`` default to the ``n_features`` most often active resid features of ``layer`` on ``texts``. One
    forward (stopped after layer L) per feature, predecessor site and batch.
    """
    target_key = flow.require((layer, "resid"), f"measure deactivation at layer {layer}")
    table = flow.predecessors(layer, allow_missing=True)
    sites = [s for s in sites if _predecessor_key(layer, s) in flow]
    if not sites:
        raise FlowError(f"layer {layer} has no predecessor SAE in the flow (resid {layer - 1}, mlp or attn {layer}).")
    keys = [target_key] + [_predecessor_key(layer, s) for s in sites]
    lists, _ = lm_inputs.tokenize_texts(model, texts, tokenizer, max_length)
    excluded = _excluded(flow, model, keys, exclude_token_ids)
    target_sae = flow[target_key]
    target_site = resolve_site(model, *target_key)
    all_sites = [resolve_site(model, *key) for key in keys]
    inputs, clean = [], []
    for _, input_ids, attention_mask in lm_inputs.batches(lists, batch_size, lm_inputs.model_device(model)):
        acts = capture_activations(model, all_sites, input_ids=input_ids, attention_mask=attention_mask)
        kept = lm_inputs.kept_tokens(input_ids, attention_mask, excluded)
        inputs.append((input_ids, attention_mask, kept))
        clean.append({key: _encode(flow[key], acts[key]) for key in keys})
    if features is None:
        frequency = torch.zeros(target_sae.config.d_sae, dtype=torch.long)
        for (_, _, kept), latents in zip(inputs, clean):
            lat = latents[target_key]
            active = (lat.values > 0) & kept.unsqueeze(-1).to(lat.values.device)
            frequency += torch.bincount(lat.indices[active].cpu(), minlength=target_sae.config.d_sae)
        features = [int(f) for f in frequency.argsort(descending=True)[:n_features] if frequency[f] > 0]
    rows = []
    for feature in features:
        ids = torch.tensor([int(feature)])
        for site in sites:
            key = _predecessor_key(layer, site)
            predecessor = int(table.ids(site)[feature])
            total, n = 0.0, 0
            for (input_ids, attention_mask, kept), latents in zip(inputs, clean):
                z_old = _token_values(latents[target_key], ids)
                pred_on = _token_values(latents[key], torch.tensor([predecessor])) > 0
                chosen = kept.to(z_old.device) & (z_old > 0) & pred_on.to(z_old.device)
                if not bool(chosen.any()):
                    continue
                hook = FlowHook(model, flow[key], {predecessor: 0.0}, "rescale", exclude_token_ids=excluded)
                try:
                    act = capture_activations(model, [target_site], input_ids=input_ids, attention_mask=attention_mask)[
                        target_key
                    ]
                finally:
                    hook.remove()
                z_new = _token_values(_encode(target_sae, act), ids)
                total += float((1 - z_new[chosen] / z_old[chosen]).sum())
                n += int(chosen.sum())
            rows.append(
                {
                    "feature": int(feature),
                    "site": site,
                    "predecessor": predecessor,
                    "score": float(table.scores(site)[feature]),
                    "n_tokens": n,
                    "change": total / n if n else math.nan,
                }
            )
    return DeactivationResult(layer, rows)


def _token_values(latents: SparseLatents, ids: Tensor) -> Tensor:
    """(B, T) activation of the single latent ``ids[0]`` in (B, T, k) latents (0 where it is not among them)."""
    return (latents.values * (latents.indices == int(ids[0]))).sum(-1)


# ------------------------------------------------------------------------------------------ skip-layer transcoder
@dataclass
class SkipLayerResult(LossComparison):
    """The matched "transcoder" t → t+1 (Mechanistic Permutability Eq. 5) on real tokens.

    Attributes:
        layer: t (the resid SAEs of t and t + 1 are used; the output of decoder layer t + 1 is replaced).
        ev: explained variance of x̂_{t+1} = decode_{t+1}(T f) against x_{t+1}.
        sae_ev: EV of the t+1 SAE's own reconstruction of x_{t+1} (what a perfect match could reach).
        identity_ev: EV of x_t itself as a guess of x_{t+1} (decoder layer t + 1 deleted).
        clean_loss, skip_loss, identity_loss: mean next-token loss (nats) of the clean model, with x_{t+1} replaced
            by x̂_{t+1}, and with x_{t+1} replaced by x_t.
        n_tokens: counted positions (BOS, padding and excluded tokens are neither replaced nor counted).
    """

    layer: int
    ev: float
    sae_ev: float
    identity_ev: float
    clean_loss: float
    skip_loss: float
    identity_loss: float
    n_tokens: int

    @property
    def delta_loss(self) -> float:
        """skip_loss − clean_loss: the LM-loss change of the matched transcoder."""
        return self.skip_loss - self.clean_loss

    def __str__(self) -> str:
        return (
            f"skip layer {self.layer}->{self.layer + 1}: EV {self.ev:.4f} (SAE {self.sae_ev:.4f}, identity "
            f"{self.identity_ev:.4f}); LM loss {self.clean_loss:.4f} -> {self.skip_loss:.4f} "
            f"(delta {self.delta_loss:+.4f}; identity {self.identity_loss:.4f}) over {self.n_tokens} tokens"
        )


class _ExplainedVariance:
    """Running 1 − Σ||x − x̂||² / Σ||x − mean(x)||² in float64."""

    def __init__(self):
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum = None
        self.n = 0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        total = x.sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.n += x.shape[0]

    def value(self) -> float:
        if self.n == 0:
            return math.nan
        variance = self.sum_sq - float(self.sum.pow(2).sum()) / self.n
        return 1.0 - self.sse / variance if variance > 0 else math.nan


@torch.no_grad()
def transcode(flow, layer: int, x: Tensor, *, k: int = 1, binary: bool = False) -> Tensor:
    """x̂_{t+1} = decode_{t+1}(T(t→t+1) encode_t(x_t)) for x: (..., d_in) residual activations of layer t."""
    source, target = flow[(layer, "resid")], flow[(layer + 1, "resid")]
    match = flow.match((layer, "resid"), (layer + 1, "resid"), k)
    latents = _encode(source, x)
    values, indices = match.transport(latents.values, latents.indices, binary=binary)
    target_device = target.W_dec.device
    return target.decode(SparseLatents(values.to(target_device), indices.to(target_device))).to(x.dtype)


@torch.no_grad()
def skip_layer_eval(
    flow,
    model: nn.Module,
    layer: int,
    texts,
    *,
    k: int = 1,
    binary: bool = False,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
) -> SkipLayerResult:
    """Skip decoder layer t + 1 with the matched transcoder of resid t → t + 1 (Mechanistic Permutability Eq. 5).

    Args:
        layer: t; the flow needs the resid SAEs of t and t + 1.
        k: matches per feature in T (top-k; default 1); ``binary``: use 1[T > 0] instead of the cosines.
    """
    source_key = flow.require((layer, "resid"), f"skip layer {layer + 1} (the transcoder's input SAE)")
    target_key = flow.require((layer + 1, "resid"), f"skip layer {layer + 1} (the transcoder's output SAE)")
    target_sae = flow[target_key]
    lists, _ = lm_inputs.tokenize_texts(model, texts, tokenizer, max_length)
    excluded = _excluded(flow, model, [source_key, target_key], exclude_token_ids)
    site_t, site_next = resolve_site(model, *source_key), resolve_site(model, *target_key)
    ev, sae_ev, identity_ev = _ExplainedVariance(), _ExplainedVariance(), _ExplainedVariance()
    totals = torch.zeros(3, dtype=torch.float64)
    n_tokens = 0
    with lm_inputs.eval_mode(model):
        for _, input_ids, attention_mask in lm_inputs.batches(lists, batch_size, lm_inputs.model_device(model)):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            kept = lm_inputs.kept_tokens(input_ids, attention_mask, excluded)
            counted = lm_inputs.counted_predictions(kept, attention_mask)
            n_tokens += int(counted.sum())
            acts = capture_activations(model, [site_t, site_next], **inputs)
            x_t, x_next = acts[source_key][kept], acts[target_key][kept]
            ev.update(x_next, transcode(flow, layer, x_t, k=k, binary=binary))
            sae_ev.update(x_next, target_sae.decode(_encode(target_sae, x_next)).to(x_next.dtype))
            identity_ev.update(x_next, x_t)
            totals[0] += float(lm_inputs.next_token_loss_sum(model(**inputs).logits, input_ids, counted))
            for slot, replace in ((1, lambda x: transcode(flow, layer, x, k=k, binary=binary)), (2, lambda x: x)):
                recorded: dict[str, Tensor] = {}
                handle = site_t.register(lambda a, store=recorded: store.__setitem__("x", a.detach()))
                patch = ActivationPatch(
                    model,
                    target_sae,
                    lambda a, store=recorded, f=replace: f(store["x"]).to(a.dtype),
                    exclude_token_ids=excluded,
                )
                try:
                    totals[slot] += float(lm_inputs.next_token_loss_sum(model(**inputs).logits, input_ids, counted))
                finally:
                    patch.remove()
                    handle.remove()
    if n_tokens == 0:
        raise FlowError("no next-token predictions to average: every text is shorter than 2 counted tokens.")
    clean, skip, identity = (float(t) / n_tokens for t in totals)
    return SkipLayerResult(layer, ev.value(), sae_ev.value(), identity_ev.value(), clean, skip, identity, n_tokens)


# ---------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def mean_nonzero_activations(
    flow,
    model: nn.Module,
    texts,
    *,
    keys: Iterable | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
) -> dict[tuple[int, str], Tensor]:
    """{(layer, site): (d_sae,) mean activation of each latent over the tokens where it is active (0 if never)}."""
    keys = flow.keys() if keys is None else [flow.require(key, "calibrate it") for key in keys]
    lists, _ = lm_inputs.tokenize_texts(model, texts, tokenizer, max_length)
    excluded = _excluded(flow, model, keys, exclude_token_ids)
    sites = [resolve_site(model, *key) for key in keys]
    sums = {key: torch.zeros(flow.config(key).d_sae, dtype=torch.float64) for key in keys}
    counts = {key: torch.zeros(flow.config(key).d_sae, dtype=torch.long) for key in keys}
    for _, input_ids, attention_mask in lm_inputs.batches(lists, batch_size, lm_inputs.model_device(model)):
        acts = capture_activations(model, sites, input_ids=input_ids, attention_mask=attention_mask)
        kept = lm_inputs.kept_tokens(input_ids, attention_mask, excluded)
        for key in keys:
            latents = _encode(flow[key], acts[key][kept])
            active = latents.values > 0
            ids = latents.indices[active].cpu()
            sums[key].index_add_(0, ids, latents.values[active].double().cpu())
            counts[key] += torch.bincount(ids, minlength=sums[key].shape[0])
    return {key: (sums[key] / counts[key].clamp_min(1)).float() for key in keys}


# -------------------------------------------------------------------------------------------------- annotate
@torch.no_grad()
def annotate_top_tokens(
    flow,
    graph,
    model: nn.Module,
    texts,
    *,
    tokenizer: Any = None,
    n: int = 5,
    context: int = 4,
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
):
    """Set each node's ``top_tokens``: its ``n`` strongest activations on ``texts`` as strings
    ``"… preceding tokens [token]  (activation)"``, strongest first. Returns the graph (changed in place)."""
    by_key: dict[tuple[int, str], list[tuple[str, int]]] = {}
    for node in graph.nodes:
        layer, site, index = parse_node_id(node)
        by_key.setdefault((layer, site), []).append((node, index))
    keys = [flow.require(key, "annotate its nodes") for key in sorted(by_key)]
    lists, tokenizer = lm_inputs.tokenize_texts(model, texts, tokenizer, max_length)
    excluded = _excluded(flow, model, keys, exclude_token_ids)
    sites = [resolve_site(model, *key) for key in keys]
    best: dict[str, list[tuple[float, int, int]]] = {node: [] for node in graph.nodes}
    for first, input_ids, attention_mask in lm_inputs.batches(lists, batch_size, lm_inputs.model_device(model)):
        acts = capture_activations(model, sites, input_ids=input_ids, attention_mask=attention_mask)
        kept = lm_inputs.kept_tokens(input_ids, attention_mask, excluded)
        for key in keys:
            latents = _encode(flow[key], acts[key])
            nodes = by_key[key]
            ids = torch.tensor([index for _, index in nodes], device=latents.indices.device)
            flat = SparseLatents(latents.values.reshape(-1, latents.k), latents.indices.reshape(-1, latents.k))
            values = latent_values(flat, ids, flow.config(key).d_sae).reshape(*kept.shape, len(nodes)).cpu()
            values = values * kept.unsqueeze(-1).cpu()
            for column, (node, _) in enumerate(nodes):
                top = values[..., column].flatten().topk(min(n, values[..., column].numel()))
                for value, position in zip(top.values.tolist(), top.indices.tolist()):
                    if value <= 0:
                        continue
                    item = (value, first + position // kept.shape[1], position % kept.shape[1])
                    if len(best[node]) < n:
                        heapq.heappush(best[node], item)
                    else:
                        heapq.heappushpop(best[node], item)
    for node, items in best.items():
        lines = []
        for value, text_index, position in sorted(items, reverse=True):
            ids = lists[text_index]
            before = _render(tokenizer, ids[max(0, position - context) : position])
            token = _render(tokenizer, ids[position : position + 1])
            lines.append(f"{before}{' ' if before and tokenizer is None else ''}[{token}]  ({value:.3g})")
        graph.nodes[node]["top_tokens"] = lines
    return graph


def _render(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text: the tokenizer's decoding, or the ids separated by spaces without a tokenizer."""
    if tokenizer is None:
        return " ".join(lm_inputs.token_strings(None, ids))
    return tokenizer.decode(ids)

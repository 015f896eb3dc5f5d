"""Per-latent statistics that travel with an SAE: how often each latent fires and how strongly.

Steering strengths mean little in absolute units (a Gemma residual has norm ~5,000 with one dimension holding most
of it; a feature's peak may be 200 or 20,000). These statistics, measured on held-out tokens (BOS and padding left
out), give the reference scales of :func:`hf_sae.steer`'s ``units``:

* ``density[f]``          fraction of the tokens on which latent f is non-zero (at the SAE's budget k);
* ``mean_activation[f]``  mean of latent f over the tokens where it fires (0 for a latent that never fires);
* ``max_activation[f]``   its largest value;
* ``activation_norm``     mean ‖h‖ of the site's activation h over the same tokens (model units);
* ``activation_mean``     (d_in,) the mean activation (what mean ablation puts in place of h).

They are written beside the weights as ``feature_stats.safetensors`` (tensors plus string metadata), loaded with the
SAE by ``from_pretrained``, pushed with it, and summarised in its model card (a density histogram). Training records
them on its held-out tokens; :func:`hf_sae.feature_stats` measures them for any SAE (a converted one, say).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._io import atomic_path
from .errors import SAELoadError

STATS_FILE = "feature_stats.safetensors"
DENSITY_PLOT = "feature_density.png"
TENSORS = ("density", "mean_activation", "max_activation", "activation_mean")


@dataclass
class FeatureStats:
    """Held-out statistics of one SAE's latents (module docstring for each field).

    Attributes:
        density, mean_activation, max_activation: (d_sae,) float32.
        activation_mean: (d_in,) float32 mean activation at the site.
        activation_norm: mean ‖h‖ at the site.
        n_tokens: the number of tokens measured.
        k: the budget the latents were taken at (None: the SAE's own k).
        source: where the tokens came from (a dataset name, "training held-out tokens", ...).
    """

    density: Tensor
    mean_activation: Tensor
    max_activation: Tensor
    activation_mean: Tensor
    activation_norm: float
    n_tokens: int
    k: int | None = None
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.density.shape[0])

    def dead_fraction(self) -> float:
        """Fraction of latents that never fired on the measured tokens."""
        return float((self.density == 0).float().mean())

    def density_histogram(self, bins: int = 10, low: float = -6.0) -> tuple[list[float], list[int], int]:
        """Counts of log10(density) in ``bins`` equal bins from ``low`` to 0, and the number of dead latents.

        Returns (edges (bins + 1,), counts (bins,), dead); densities below 10^low fall in the first bin.
        """
        edges = torch.linspace(low, 0.0, bins + 1)
        alive = self.density[self.density > 0].double()
        logs = alive.log10().clamp(low, 0.0)
        counts = torch.histc(logs, bins=bins, min=low, max=0.0) if alive.numel() else torch.zeros(bins)
        return edges.tolist(), [int(c) for c in counts.tolist()], int((self.density == 0).sum())

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``feature_stats.safetensors`` into ``folder`` (atomically); returns the path."""
        path = Path(folder) / STATS_FILE
        tensors = {name: getattr(self, name).detach().float().contiguous().cpu() for name in TENSORS}
        metadata = {
            "activation_norm": repr(float(self.activation_norm)),
            "n_tokens": str(int(self.n_tokens)),
            "k": "" if self.k is None else str(int(self.k)),
            "source": self.source,
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a ``feature_stats.safetensors`` file (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in TENSORS}
            return cls(
                **tensors,
                activation_norm=float(metadata["activation_norm"]),
                n_tokens=int(metadata["n_tokens"]),
                k=int(metadata["k"]) if metadata.get("k") else None,
                source=metadata.get("source", ""),
                extra=json.loads(metadata.get("extra") or "{}"),
            )
        except Exception as err:  # a truncated file, a missing key, a foreign file of that name
            raise SAELoadError(
                f"{path}: cannot read the feature statistics ({type(err).__name__}: {err}). Delete the file or "
                "measure them again with hf_sae.feature_stats(model, sae, texts)."
            ) from None

    def check_matches(self, d_sae: int, d_in: int, where: str = "feature statistics") -> None:
        """Refuse statistics of another SAE (a width that differs)."""
        if self.d_sae != d_sae or int(self.activation_mean.shape[0]) != d_in:
            raise SAELoadError(
                f"{where}: they describe an SAE with d_sae={self.d_sae}, d_in={int(self.activation_mean.shape[0])}, "
                f"not this one (d_sae={d_sae}, d_in={d_in}). Measure them again with hf_sae.feature_stats."
            )

    def card_text(self) -> str:
        """The model card's section: what was measured, the density histogram as a table, and what it is for."""
        edges, counts, dead = self.density_histogram(bins=6)
        rows = ["| firing density | latents |", "|---|---|", f"| never fired | {dead:,} |"]
        for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True):
            rows.append(f"| 10^{low:g} – 10^{high:g} | {count:,} |")
        return (
            f"Per-latent statistics measured on {self.source or 'held-out tokens'} ({self.summary()}), shipped as "
            "`feature_stats.safetensors` and loaded with the SAE. They give steering strengths a scale: "
            '`sae.steer(model, {f: "2x"})` is twice feature f\'s peak activation, and `units="max" | "mean" | '
            '"residual_norm"` take multiples of its peak, its mean activation or the site\'s mean activation norm.\n\n'
            + "\n".join(rows)
        )

    def plot_density(self, path: str | os.PathLike, *, dpi: int = 120) -> Path:
        """A histogram of log10(firing density) over the latents that fired (PNG), written atomically."""
        from matplotlib.figure import Figure

        path = Path(path)
        alive = self.density[self.density > 0].double().log10()
        fig = Figure(figsize=(5.5, 3.0))
        ax = fig.add_subplot()
        ax.hist(alive.numpy(), bins=40, color="#4C72B0")
        ax.set_xlabel("log10(firing density)")
        ax.set_ylabel("latents")
        ax.set_title(f"{self.d_sae:,} latents, {100 * self.dead_fraction():.1f}% never fired", fontsize=9)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
        return path

    def summary(self) -> str:
        """One line: tokens, dead fraction, median density of the live latents, median peak."""
        alive = self.density > 0
        median_density = float(self.density[alive].median()) if bool(alive.any()) else 0.0
        median_peak = float(self.max_activation[alive].median()) if bool(alive.any()) else 0.0
        return (
            f"{self.n_tokens:,} tokens; {100 * self.dead_fraction():.1f}% of latents never fire; median density of "
            f"the others {median_density:.2e}, median peak activation {median_peak:.4g}; mean activation norm "
            f"{self.activation_norm:.4g}"
        )


class FeatureStatsAccumulator:
    """Accumulates :class:`FeatureStats` over chunks of (activation, latents) without a dense (N, d_sae) tensor.

    ``update(x, values, indices)``: x (N, d_in) activations in model units, values / indices (N, k) the SAE's latents
    of those rows. Sums are float64, so the result does not depend on the chunking.
    """

    def __init__(self, d_sae: int, d_in: int, k: int | None = None, source: str = ""):
        self.d_sae, self.d_in, self.k, self.source = d_sae, d_in, k, source
        self.count = torch.zeros(d_sae, dtype=torch.float64)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.peak = torch.zeros(d_sae, dtype=torch.float64)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.norm_sum = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, x: Tensor, values: Tensor, indices: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        values = values.reshape(-1, values.shape[-1]).double().cpu()
        indices = indices.reshape(-1, indices.shape[-1]).cpu()
        fired = values != 0
        chosen, amounts = indices[fired], values[fired]
        self.count.index_add_(0, chosen, torch.ones_like(amounts))
        self.total.index_add_(0, chosen, amounts)
        if chosen.numel():
            self.peak.scatter_reduce_(0, chosen, amounts, reduce="amax")
        self.x_sum += x.sum(0)
        self.norm_sum += float(x.norm(dim=-1).sum())
        self.n += x.shape[0]

    def result(self) -> FeatureStats:
        if self.n == 0:
            raise ValueError("no tokens were measured: the feature statistics need at least one token.")
        mean = torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.zeros_like(self.total))
        return FeatureStats(
            density=(self.count / self.n).float(),
            mean_activation=mean.float(),
            max_activation=self.peak.float(),
            activation_mean=(self.x_sum / self.n).float(),
            activation_norm=self.norm_sum / self.n,
            n_tokens=self.n,
            k=self.k,
            source=self.source,
        )

"""Reconstruction metrics (Gao et al. 2024; SAEBench): FVU, explained variance, L0, dead fraction, shrinkage.

All take (N, d_in) tensors; ``fvu`` = Σ||x − x̂||² / Σ||x − mean(x)||² over the batch, ``explained_variance`` =
1 − fvu, ``shrinkage`` = mean ||x̂|| / ||x||.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fvu(x: Tensor, reconstruction: Tensor) -> float:
    x, reconstruction = x.detach().double(), reconstruction.detach()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - reconstruction.double()).pow(2).sum() / total.clamp_min(torch.finfo(torch.float64).tiny))


def explained_variance(x: Tensor, reconstruction: Tensor) -> float:
    return 1.0 - fvu(x, reconstruction)


def l0(values: Tensor) -> float:
    """Mean number of non-zero latents per row; values: (N, k) or dense (N, d_sae)."""
    return float((values != 0).sum(-1).double().mean())


def dead_fraction(indices: Tensor, values: Tensor, d_sae: int) -> float:
    """Fraction of latents that never fire (non-zero value) in this batch; indices, values: (N, k)."""
    fired = torch.zeros(d_sae, dtype=torch.bool, device=indices.device)
    fired[indices[values > 0]] = True
    return 1.0 - float(fired.double().mean())


def shrinkage(x: Tensor, reconstruction: Tensor) -> float:
    """Mean ||x̂|| / ||x|| over rows (1 means no shrinkage)."""
    x_norm = x.detach().double().norm(dim=-1).clamp_min(1e-12)
    return float((reconstruction.detach().double().norm(dim=-1) / x_norm).mean())


def default_budgets(k: int) -> list[int]:
    """1, 2, 4, ..., and k itself."""
    budgets, b = [], 1
    while b < k:
        budgets.append(b)
        b *= 2
    return budgets + [k]


@torch.no_grad()
def budget_metrics(sae, x: Tensor, budgets: list[int] | None = None) -> dict[int, dict[str, float]]:
    """FVU, EV, L0 and shrinkage of ``sae`` on activations x (N, d_in) at each budget k' (default 1, 2, 4, ..., k).

    One encode at the full k; each budget decodes the first k' latents of the same ranking (budgets are nested).
    """
    x = x.reshape(-1, sae.config.d_in)
    latents = sae.encode(x)
    results = {}
    for budget in budgets or default_budgets(sae.config.k):
        part = latents.truncate(budget)
        reconstruction = sae.decode(part)
        error = fvu(x, reconstruction)
        results[budget] = {
            "fvu": error,
            "explained_variance": 1.0 - error,
            "l0": l0(part.values),
            "shrinkage": shrinkage(x, reconstruction),
        }
    return results


def l0_distribution(values: Tensor) -> dict:
    """How the number of active latents spreads over the rows of values (N, width): see
    :func:`l0_counts_distribution`. For variable-L0 SAEs (a threshold: JumpReLU, BatchTopK and Matryoshka at
    inference), whose L0 is a distribution, not the k of a TopK."""
    return l0_counts_distribution((values.detach() != 0).sum(-1))


def l0_counts_distribution(counts: Tensor) -> dict:
    """Per-row L0s (N,) -> mean, std, min, 10th percentile, median, 90th percentile, max and a histogram
    {L0: rows}."""
    counts = counts.reshape(-1).cpu()
    as_float = counts.double()
    return {
        "mean": float(as_float.mean()),
        "std": float(as_float.std(unbiased=False)),
        "min": int(counts.min()),
        "p10": float(as_float.quantile(0.1)),
        "median": float(as_float.quantile(0.5)),
        "p90": float(as_float.quantile(0.9)),
        "max": int(counts.max()),
        "histogram": {str(l0): int(rows) for l0, rows in enumerate(torch.bincount(counts).tolist()) if rows},
    }

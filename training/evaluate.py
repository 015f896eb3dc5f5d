"""The end-of-run evaluation on held-out windows (main process).

For each SAE (folded: it takes raw activations, as saved) and each budget k' = 1, 2, 4, ..., K: FVU, explained
variance, L0 and shrinkage (``hf_sae.metrics``); the fraction of latents that never fire on the held-out tokens and
the training-time dead fraction; and the language-model loss with the SAE spliced in
(``hf_sae.evaluation.lm_loss_with_sae``: clean / spliced / zero-ablated loss, CE loss recovered).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from hf_sae import metrics as sae_metrics
from hf_sae.evaluation import lm_loss_with_sae

from .data import TokenWindows
from .harvest import ActivationHarvester, SiteKey

logger = logging.getLogger(__name__)


@torch.no_grad()
def collect_eval_data(
    harvester: ActivationHarvester, windows: TokenWindows, tokens: int, lm_windows: int, lm_batch_size: int
) -> tuple[dict[SiteKey, Tensor], list[dict[str, Tensor]]]:
    """Harvest ``tokens`` held-out activations per site (float32, CPU) and keep the first ``lm_windows`` windows as
    LM batches ``{"input_ids", "attention_mask"}`` for the splice evaluation."""
    parts: dict[SiteKey, list[Tensor]] = {key: [] for key in harvester.widths}
    batches: list[dict[str, Tensor]] = []
    kept_windows, rows = 0, 0
    while rows < tokens or kept_windows < lm_windows:
        batch = windows.next_batch(lm_batch_size)
        if batch is None:
            break
        input_ids, attention_mask = batch
        if kept_windows < lm_windows:
            take = min(lm_windows - kept_windows, input_ids.shape[0])
            batches.append({"input_ids": input_ids[:take], "attention_mask": attention_mask[:take]})
            kept_windows += take
        if rows < tokens:
            kept = harvester(input_ids, attention_mask)
            if kept is None:
                logger.warning("skipped a held-out batch with NaN/inf activations")
                continue
            for key, activation in kept.items():
                parts[key].append(activation.float().cpu())
            rows += next(iter(kept.values())).shape[0]
    if rows == 0:
        raise ValueError(
            "the held-out data gave no activations to evaluate on. Check --eval-split (or --eval-holdout-documents)."
        )
    return {key: torch.cat(chunks)[:tokens] for key, chunks in parts.items()}, batches


@torch.no_grad()
def reconstruction_metrics(sae, x: Tensor, chunk_rows: int = 8192) -> dict[str, Any]:
    """FVU / EV / L0 / shrinkage at every budget k' of :func:`hf_sae.metrics.default_budgets`, and the fraction of
    latents that never fire on ``x`` at budget K. ``x``: (N, d_in) raw activations (float32)."""
    device = sae.W_dec.device
    K = sae.config.k
    budgets = sae_metrics.default_budgets(K)
    values, indices = [], []
    for start in range(0, x.shape[0], chunk_rows):
        latents = sae.encode(x[start : start + chunk_rows].to(device, sae.W_dec.dtype), K)
        values.append(latents.values.float().cpu())
        indices.append(latents.indices.cpu())
    values, indices = torch.cat(values), torch.cat(indices)
    per_budget = {}
    for budget in budgets:
        parts = []
        for start in range(0, x.shape[0], chunk_rows):
            v = values[start : start + chunk_rows, :budget].to(device, sae.W_dec.dtype)
            i = indices[start : start + chunk_rows, :budget].to(device)
            parts.append(sae.decode((v, i)).float().cpu())
        reconstruction = torch.cat(parts)
        fvu = sae_metrics.fvu(x, reconstruction)
        per_budget[str(budget)] = {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": sae_metrics.l0(values[:, :budget]),
            "shrinkage": sae_metrics.shrinkage(x, reconstruction),
        }
    return {
        "budgets": per_budget,
        "dead_fraction_eval": sae_metrics.dead_fraction(indices, values, sae.config.d_sae),
        "eval_tokens": int(x.shape[0]),
    }


def lm_loss_metrics(
    model, sae, batches: list[dict[str, Tensor]], excluded: list[int], lm_batch_size: int = 4
) -> dict[str, Any] | None:
    """Clean / spliced / zero-ablated LM loss and CE loss recovered (``hf_sae.evaluation.lm_loss_with_sae``, the
    steering issue's splice) on held-out windows; None when there are no windows (``--eval-lm-windows 0``).

    Few windows per forward: with a 262k vocabulary (Gemma) the float32 logits of 4 x 128 tokens are already 0.5 GB.
    """
    if not batches:
        return None
    windows = {key: torch.cat([batch[key] for batch in batches]) for key in ("input_ids", "attention_mask")}
    result = lm_loss_with_sae(
        model, sae, windows, batch_size=lm_batch_size, max_length=None, exclude_token_ids=excluded
    )
    return result.as_dict()

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
from tqdm.auto import tqdm

from hf_sae import metrics as sae_metrics
from hf_sae.evaluation import lm_loss_with_sae
from hf_sae.latent_stats import FeatureStatsAccumulator

from .data import TokenWindows
from .harvest import ActivationHarvester, SiteKey

logger = logging.getLogger(__name__)


def _bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    """A one-line bar that clears itself when done (shown only on a terminal, as tqdm decides)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        disable=None if progress else True,
    )


@torch.no_grad()
def collect_eval_data(
    harvester: ActivationHarvester,
    windows: TokenWindows,
    tokens: int,
    lm_windows: int,
    lm_batch_size: int,
    progress: bool = False,
) -> tuple[dict[SiteKey, Tensor], list[dict[str, Tensor]]]:
    """Harvest ``tokens`` held-out activations per site (float32, CPU) and keep the first ``lm_windows`` windows as
    LM batches ``{"input_ids", "attention_mask"}`` for the splice evaluation."""
    parts: dict[SiteKey, list[Tensor]] = {key: [] for key in harvester.widths}
    batches: list[dict[str, Tensor]] = []
    kept_windows, rows = 0, 0
    with _bar(tokens, "eval: harvest", "act", progress) as bar:
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
                n = next(iter(kept.values())).shape[0]
                bar.update(min(rows + n, tokens) - rows)
                rows += n
    if rows == 0:
        raise ValueError(
            "the held-out data gave no activations to evaluate on. Check --eval-split (or --eval-holdout-documents)."
        )
    return {key: torch.cat(chunks)[:tokens] for key, chunks in parts.items()}, batches


@torch.no_grad()
def reconstruction_metrics(
    sae, x: Tensor, chunk_rows: int = 4096, progress: bool = False, stats: FeatureStatsAccumulator | None = None
) -> dict[str, Any]:
    """FVU / EV / L0 / shrinkage at every budget k' of :func:`hf_sae.metrics.default_budgets`, and the fraction of
    latents that never fire on ``x`` at budget K. ``x``: (N, d_in) raw activations (float32). ``stats``: also
    accumulate the SAE's feature statistics (:mod:`hf_sae.latent_stats`) from the same encodes.

    The same numbers as :func:`hf_sae.metrics.fvu` / ``shrinkage`` / ``l0`` / ``dead_fraction`` on the whole of ``x``
    (float64 sums), accumulated over chunks of ``chunk_rows``: one encode at K per chunk, each budget decoding the
    first k' latents of it, and no (N, d_in) float64 copy per budget (what made this the slow part of the evaluation).

    A variable-L0 SAE (``config.variable_l0``: a threshold, as JumpReLU, BatchTopK and Matryoshka use at inference)
    also gets ``"native"``: FVU / EV / mean L0 of its own encoding ``sae.encode(x)`` and the distribution of the L0
    over tokens (:func:`hf_sae.metrics.l0_counts_distribution`). Budgets are TopK prefixes only where they are
    (``config.topk_budgets``); otherwise the one budget K (the cap).
    """
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    K, d_sae, n = sae.config.k, sae.config.d_sae, x.shape[0]
    budgets = sae_metrics.default_budgets(K) if sae.config.topk_budgets else [K]
    native = getattr(sae.config, "variable_l0", False)
    native_error, native_counts = torch.zeros((), dtype=torch.float64), []
    chunks = [(start, min(start + chunk_rows, n)) for start in range(0, n, chunk_rows)]
    mean = sum(x[a:b].double().sum(0) for a, b in chunks) / n  # (d_in,)
    total_variance = torch.zeros((), dtype=torch.float64)
    squared_error = {budget: torch.zeros((), dtype=torch.float64) for budget in budgets}
    norm_ratio = {budget: torch.zeros((), dtype=torch.float64) for budget in budgets}
    nonzero = dict.fromkeys(budgets, 0)
    fired = torch.zeros(d_sae, dtype=torch.bool)
    with _bar(n, "eval: reconstruction", "act", progress) as bar:
        for a, b in chunks:
            rows = x[a:b].double()
            total_variance += (rows - mean).pow(2).sum()
            x_norm = rows.norm(dim=-1).clamp_min(1e-12)
            latents = sae.encode(x[a:b].to(device, dtype), K)
            values, indices = latents.values, latents.indices
            for budget in budgets:
                v, i = values[:, :budget], indices[:, :budget]
                reconstruction = sae.decode((v, i)).cpu().double()
                squared_error[budget] += (rows - reconstruction).pow(2).sum()
                norm_ratio[budget] += (reconstruction.norm(dim=-1) / x_norm).sum()
                nonzero[budget] += int((v != 0).sum())
            fired[indices[values > 0].cpu()] = True
            if native:  # the SAE's own encoding: every latent above its threshold
                own = sae.encode(x[a:b].to(device, dtype))
                native_error += (rows - sae.decode(own).cpu().double()).pow(2).sum()
                native_counts.append((own.values != 0).sum(-1).cpu())
            if stats is not None:
                stats.update(x[a:b], values, indices)
            bar.update(b - a)
    total_variance = total_variance.clamp_min(torch.finfo(torch.float64).tiny)
    per_budget = {}
    for budget in budgets:
        fvu = float(squared_error[budget] / total_variance)
        per_budget[str(budget)] = {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": nonzero[budget] / n,
            "shrinkage": float(norm_ratio[budget] / n),
        }
    result = {
        "budgets": per_budget,
        "dead_fraction_eval": 1.0 - float(fired.double().mean()),
        "eval_tokens": int(n),
    }
    if native:
        fvu = float(native_error / total_variance)
        distribution = sae_metrics.l0_counts_distribution(torch.cat(native_counts))
        result["native"] = {"fvu": fvu, "explained_variance": 1.0 - fvu, "l0": distribution["mean"]}
        result["native"]["l0_distribution"] = distribution
    return result


def held_out_feature_stats(sae, source: str) -> FeatureStatsAccumulator:
    """An accumulator for the feature statistics of ``sae`` on the held-out tokens (fed by reconstruction_metrics)."""
    return FeatureStatsAccumulator(sae.config.d_sae, sae.config.d_in, sae.config.k, source)


def lm_loss_metrics(
    model,
    sae,
    batches: list[dict[str, Tensor]],
    excluded: list[int],
    lm_batch_size: int = 4,
    clean_loss: float | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Clean / spliced / zero-ablated LM loss and CE loss recovered (``hf_sae.evaluation.lm_loss_with_sae``, the
    steering issue's splice) on held-out windows; None when there are no windows (``--eval-lm-windows 0``).

    ``clean_loss``: the clean loss of an earlier call on the same windows and exclusions (another SAE of the run):
    its forwards are then skipped. Few windows per forward: with a 262k vocabulary (Gemma) the float32 logits of
    4 x 128 tokens are already 0.5 GB.
    """
    if not batches:
        return None
    windows = {key: torch.cat([batch[key] for batch in batches]) for key in ("input_ids", "attention_mask")}
    result = lm_loss_with_sae(
        model,
        sae,
        windows,
        batch_size=lm_batch_size,
        max_length=None,
        exclude_token_ids=excluded,
        clean_loss=clean_loss,
        progress=progress,
    )
    return result.as_dict()

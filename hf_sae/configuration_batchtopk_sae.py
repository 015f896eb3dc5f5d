"""Configuration of :class:`~hf_sae.BatchTopKSAE`: TopK over the whole batch in training, a threshold at inference.

Bussmann, Leask and Nanda, "BatchTopK Sparse Autoencoders" (arXiv 2412.06410). Training keeps the N·k largest
pre-activations of a batch of N tokens (so a token keeps any number of latents and the mean L0 is k); inference
keeps every latent above one threshold θ, estimated during training from the smallest activation each batch kept.
"""

from __future__ import annotations

import math
from typing import ClassVar

from .configuration_sae import SAEConfig
from .errors import SAEConfigError


class BatchTopKSAEConfig(SAEConfig):
    r"""Configuration of a BatchTopK SAE.

    Args:
        k (`int`, defaults to 64): the mean number of active latents per token: training keeps the N·k largest
            pre-activations of each batch of N tokens. ``encode(x, k=j)`` (any j <= k) is the per-token TopK at
            budget j; ``encode(x)`` uses the threshold.
        threshold_lr (`float`, defaults to 0.01): rate of the running estimate of the inference threshold θ. After
            each training batch, θ ← θ + r·(m − θ) with m the smallest activation the batch kept and r = max(
            threshold_lr, 1/t) at the t-th batch: the plain mean over the first 1/threshold_lr batches (the paper's
            estimate), then an exponential average that follows the SAE as it trains (as the reference code and
            SAELens do).
        hierarchical (`bool`, defaults to `False`): train with the HierarchicalTopK objective by value (each
            token's latents sorted descending; the mean of the MSE at every prefix budget 1..w, w the batch's
            largest L0). ``budgets`` cannot be set (w varies per batch).

    All other fields (AuxK, ``dead_tokens``, where the SAE lives) are those of
    :class:`~hf_sae.configuration_sae.SAEConfig`. Folding an activation scale divides θ by the scale too.
    """

    model_type: ClassVar[str] = "batchtopk_sae"
    variable_l0: ClassVar[bool] = True

    hierarchical: bool = False
    threshold_lr: float = 0.01

    def validate_sae(self) -> None:
        if self.budgets is not None:
            raise SAEConfigError(
                f"budgets={self.budgets!r} cannot be set for {type(self).__name__}: the number of latents per token "
                "varies from batch to batch. Leave budgets=None (hierarchical=True averages over every prefix)."
            )
        rate = self.threshold_lr
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate <= 1 and math.isfinite(rate)):
            raise SAEConfigError(f"threshold_lr must be a number in (0, 1], got {rate!r}; e.g. threshold_lr=0.01.")
        super().validate_sae()

    def display_name(self) -> str:
        return "BatchTopK (HierarchicalTopK)" if self.hierarchical else "BatchTopK"

    def card_tags(self) -> list[str]:
        return ["batchtopk"] + (["hierarchical-topk"] if self.hierarchical else [])

    def card_encoder(self) -> str:
        return (
            "BatchTopK encoder (Bussmann et al. 2024, arXiv 2412.06410): a = ReLU(W_encᵀ(x − b_dec) + b_enc); in "
            f"training the N·{self.k} largest activations of each batch of N tokens are kept (mean L0 {self.k}), at "
            "inference every activation above one threshold θ (the running mean of the smallest activation each "
            "training batch kept), so the L0 varies per token; "
        )

    def card_objective(self) -> str:
        if self.source_format:
            return super().card_objective()
        loss = (
            "trained with the HierarchicalTopK objective by value (Balagansky et al. 2025, arXiv 2505.24473): the "
            "mean of the MSE at every prefix budget of each token's latents sorted descending"
            if self.hierarchical
            else "trained with the reconstruction MSE"
        )
        if self.auxk:
            loss += f", plus AuxK on dead latents (coefficient {self.auxk_coefficient:g})"
        return self.card_encoder() + loss + ". Decoder rows are kept unit-norm during training."

    def card_facts(self) -> list[tuple[str, str]]:
        return [("selection", f"BatchTopK (mean L0 {self.k} in training; threshold θ at inference)")]

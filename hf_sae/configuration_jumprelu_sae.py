"""Configuration of :class:`~hf_sae.JumpReLUSAE`: the JumpReLU SAE of Gemma Scope (and SAELens' JumpReLU / standard).

Rajamanoharan et al., "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders"
(arXiv 2407.14435), Eq. 5-6; Lieberum et al., "Gemma Scope" (arXiv 2408.05147). A latent fires when its
pre-activation exceeds a learned per-latent threshold, so the number of active latents varies per token.
hf-sae loads such SAEs (``hf_sae.convert``) for analysis, steering and feature flow, and trains them with the
recipe of the paper and of Gemma Scope: straight-through estimators with a rectangle kernel of bandwidth ε for the
threshold gradients, loss MSE + λ·L0 with λ warmed up linearly.
"""

from __future__ import annotations

import math
from typing import ClassVar

from .configuration_sae import SAEConfig
from .errors import SAEConfigError

THRESHOLD_PARAMETRIZATIONS = ("direct", "log")


class JumpReLUSAEConfig(SAEConfig):
    r"""Configuration of a JumpReLU SAE.

    Args:
        apply_b_dec_to_input (`bool`, defaults to `False`): subtract ``b_dec`` from the input before the encoder.
            Gemma Scope does not (False); SAELens records it per SAE in ``cfg.json``.
        k (`int`, *optional*): the cap on active latents returned by ``encode`` (a JumpReLU SAE has no fixed k).
            Defaults to ``d_sae``: ``encode`` then returns every latent, active ones first, sorted descending, and
            decoding gives exactly the source SAE's reconstruction. A smaller cap (e.g. a few times the SAE's
            average L0) makes ``encode`` cheaper; tokens with more active latents than the cap then keep only their
            ``k`` largest, which changes their reconstruction.
        hierarchical (`bool`, defaults to `False`): must stay False (a JumpReLU SAE has no budget objective).
        auxk (`bool`, defaults to `False`): must stay False (the L0 penalty, not AuxK, shapes a JumpReLU SAE).
        threshold_parametrization (`str`, defaults to `"direct"`): how the threshold θ is stored: ``"direct"``
            (the ``threshold`` tensor of Gemma Scope and SAELens files; what converters build) or ``"log"`` (a
            ``log_threshold`` parameter with θ = exp(log θ), the paper's training parametrisation: positive, and
            Adam moves it multiplicatively). ``--sae arch=jumprelu`` trains with ``"log"``.
        l0_coefficient (`float`, defaults to 1e-3): λ, the weight of the L0 penalty. The loss is the MSE averaged
            over d_in plus λ·(mean L0 per token); with training's activation scale (E||x||² = d_in) the MSE is the
            paper's ||x − x̂||² of inputs with unit mean squared norm.
        l0_warmup_steps (`int`, defaults to 10_000): λ grows linearly from 0 to ``l0_coefficient`` over this many
            training steps (the Gemma Scope recipe; 0 disables the warm-up).
        bandwidth (`float`, defaults to 1e-3): ε, the width of the rectangle kernel of the straight-through
            estimators of the threshold gradients (paper Eq. 11-12).
        initial_threshold (`float`, defaults to 1e-3): θ of every latent when training starts.

    All other fields are those of :class:`~hf_sae.configuration_sae.SAEConfig`. ``activation_scale`` folding divides
    ``b_enc`` *and* ``threshold`` by the scale, so a folded SAE compares raw pre-activations with raw thresholds.
    """

    model_type: ClassVar[str] = "jumprelu_sae"
    topk_budgets: ClassVar[bool] = False
    variable_l0: ClassVar[bool] = True

    k: int | None = None
    hierarchical: bool = False
    auxk: bool = False
    apply_b_dec_to_input: bool = False
    threshold_parametrization: str = "direct"
    l0_coefficient: float = 1e-3
    l0_warmup_steps: int = 10_000
    bandwidth: float = 1e-3
    initial_threshold: float = 1e-3

    def validate_sae(self) -> None:
        if self.k is None and isinstance(self.d_sae, int) and not isinstance(self.d_sae, bool):
            self.k = self.d_sae
        if self.hierarchical:
            raise SAEConfigError(
                "hierarchical=True is not supported by JumpReLUSAEConfig: a JumpReLU SAE has a per-latent threshold, "
                "not a ranked budget objective. Pass hierarchical=False (the default)."
            )
        if self.auxk:
            raise SAEConfigError(
                "auxk=True is not supported by JumpReLUSAEConfig: its L0 penalty (and the threshold) decides which "
                "latents fire, not a TopK with dead latents. Pass auxk=False (the default)."
            )
        if self.threshold_parametrization not in THRESHOLD_PARAMETRIZATIONS:
            raise SAEConfigError(
                f"threshold_parametrization={self.threshold_parametrization!r} is unknown. Use one of "
                f"{list(THRESHOLD_PARAMETRIZATIONS)}."
            )
        for name in ("l0_coefficient", "bandwidth", "initial_threshold"):
            value = getattr(self, name)
            positive = name != "l0_coefficient"
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or (value <= 0 if positive else value < 0)
            ):
                raise SAEConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}.")
        if (
            isinstance(self.l0_warmup_steps, bool)
            or not isinstance(self.l0_warmup_steps, int)
            or self.l0_warmup_steps < 0
        ):
            raise SAEConfigError(f"l0_warmup_steps must be an integer >= 0, got {self.l0_warmup_steps!r}.")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise SAEConfigError(f"apply_b_dec_to_input must be True or False, got {self.apply_b_dec_to_input!r}.")
        super().validate_sae()

    def display_name(self) -> str:
        return "JumpReLU"

    def card_tags(self) -> list[str]:
        return ["jumprelu"]

    def card_objective(self) -> str:
        encoder = (
            "JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435): acts = ReLU(pre)·1[pre > θ] with a learned "
            "per-latent threshold θ, pre = x·W_enc + b_enc"
            + (" with b_dec subtracted from x first" if self.apply_b_dec_to_input else "")
        )
        if not self.source_format:
            warmup = f", λ warmed up linearly over {self.l0_warmup_steps:,} steps" if self.l0_warmup_steps else ""
            return (
                encoder + ". Trained by hf-sae with the paper's recipe as used for Gemma Scope (Lieberum et al. 2024, "
                f"arXiv 2408.05147): loss MSE + λ·L0 with λ = {self.l0_coefficient:g}{warmup}; the threshold "
                f"({self.threshold_parametrization} parametrisation) learns through straight-through estimators with "
                f"a rectangle kernel of bandwidth ε = {self.bandwidth:g}. Decoder rows are kept unit-norm during "
                f"training; `encode` returns at most k = {self.k} active latents per token."
            )
        return (
            encoder
            + ". It was not trained by hf-sae but converted exactly from its source"
            + (f" ({self.source_format}: `{self.source}`)" if self.source else "")
            + f"; `encode` returns at most k = {self.k} active latents per token"
            + (" (all of them)." if self.k == self.d_sae else ".")
        )

    def card_limitations(self) -> list[str]:
        return [
            "The number of active latents varies per token (a threshold, not a TopK): budgets k' < k are the k' "
            "largest of each token, not a trained objective."
        ]

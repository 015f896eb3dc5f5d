"""Configuration of :class:`~hf_sae.JumpReLUSAE`: the JumpReLU SAE of Gemma Scope (and SAELens' JumpReLU / standard).

Rajamanoharan et al., "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders"
(arXiv 2407.14435), Eq. 5-6; Lieberum et al., "Gemma Scope" (arXiv 2408.05147). A latent fires when its
pre-activation exceeds a learned per-latent threshold, so the number of active latents varies per token.
hf-sae loads such SAEs (``hf_sae.convert``) for analysis, steering and feature flow; it does not train them.
"""

from __future__ import annotations

from typing import ClassVar

from .configuration_sae import SAEConfig
from .errors import SAEConfigError


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
        auxk (`bool`, defaults to `False`): must stay False (hf-sae does not train JumpReLU SAEs).

    All other fields are those of :class:`~hf_sae.configuration_sae.SAEConfig`. ``activation_scale`` folding divides
    ``b_enc`` *and* ``threshold`` by the scale, so a folded SAE compares raw pre-activations with raw thresholds.
    """

    model_type: ClassVar[str] = "jumprelu_sae"
    trainable: ClassVar[bool] = False
    topk_budgets: ClassVar[bool] = False

    k: int | None = None
    hierarchical: bool = False
    auxk: bool = False
    apply_b_dec_to_input: bool = False

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
                "auxk=True is not supported by JumpReLUSAEConfig: hf-sae does not train JumpReLU SAEs. "
                "Pass auxk=False (the default)."
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise SAEConfigError(f"apply_b_dec_to_input must be True or False, got {self.apply_b_dec_to_input!r}.")
        super().validate_sae()

    def display_name(self) -> str:
        return "JumpReLU"

    def card_tags(self) -> list[str]:
        return ["jumprelu"]

    def card_objective(self) -> str:
        return (
            "JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435): acts = ReLU(pre)·1[pre > θ] with a learned "
            "per-latent threshold θ, pre = x·W_enc + b_enc"
            + (" with b_dec subtracted from x first" if self.apply_b_dec_to_input else "")
            + ". It was not trained by hf-sae but converted exactly from its source"
            + (f" ({self.source_format}: `{self.source}`)" if self.source else "")
            + f"; `encode` returns at most k = {self.k} active latents per token"
            + (" (all of them)." if self.k == self.d_sae else ".")
        )

    def card_limitations(self) -> list[str]:
        return [
            "hf-sae does not train JumpReLU SAEs: `forward` returns the reconstruction MSE only, and the "
            "threshold gets no gradient."
        ]

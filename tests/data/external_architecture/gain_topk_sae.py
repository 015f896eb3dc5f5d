"""A user's own SAE architecture, written outside hf-sae with its public names only (the registry test loads it).

Gain-TopK: a TopK SAE whose pre-activations are scaled by a learned positive per-latent gain g = exp(log_gain),
a = g ⊙ ReLU(W_encᵀ(x − b_dec) + b_enc), the k largest kept. Its config and model subclass hf-sae's base classes
and register once; AutoModel, the model card, training (``--import this_file.py --sae arch=gain_topk``) and the
remote-code export then work with no edit to hf-sae.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from hf_sae import SAEConfig, SAEConfigError, SAEPreTrainedModel, register_architecture


class GainTopKSAEConfig(SAEConfig):
    r"""Configuration of a Gain-TopK SAE.

    Args:
        gain_init (`float`, defaults to 1.0): the initial gain of every latent (> 0).

    All other fields are those of :class:`hf_sae.SAEConfig`.
    """

    model_type: ClassVar[str] = "gain_topk_sae"

    gain_init: float = 1.0

    def validate_sae(self) -> None:
        super().validate_sae()
        if isinstance(self.gain_init, bool) or not isinstance(self.gain_init, (int, float)) or self.gain_init <= 0:
            raise SAEConfigError(f"gain_init must be a number > 0, got {self.gain_init!r}.")

    def display_name(self) -> str:
        return "Gain-TopK" if not self.hierarchical else "Gain-TopK (HierarchicalTopK)"

    def card_tags(self) -> list[str]:
        return ["gain-topk", *super().card_tags()]

    def card_encoder(self) -> str:
        return "Gain-TopK encoder: a = exp(log_gain) ⊙ ReLU(W_encᵀ(x − b_dec) + b_enc), the k largest kept; "

    def card_facts(self) -> list[tuple[str, str]]:
        return [("initial gain", f"{self.gain_init:g}")]


class GainTopKSAE(SAEPreTrainedModel):
    """Parameters: ``encoder`` (d_sae, d_in) + bias, ``log_gain`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec``."""

    config_class = GainTopKSAEConfig

    def __init__(self, config: GainTopKSAEConfig):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.d_sae)
        self.log_gain = nn.Parameter(torch.zeros(config.d_sae))
        self.post_init()

    def reset_parameters(self) -> None:
        """Encoder and decoder drawn independently (not tied), every gain at ``gain_init``, biases 0."""
        for weight in (self.encoder.weight, self.W_dec):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.set_decoder_norm_to_unit_norm()
        self.log_gain.fill_(math.log(self.config.gain_init))
        for bias in (self.encoder.bias, self.b_dec):
            bias.zero_()

    def encoder_biases(self) -> list[nn.Parameter]:
        return [self.encoder.bias]

    def _pre_acts_flat(self, x: Tensor) -> Tensor:
        return torch.relu(self.encoder(x - self.b_dec)) * self.log_gain.exp()

    def _encode_topk(self, x: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0):
        scores = self._pre_acts_flat(x)
        values, indices = scores.topk(k, dim=-1, sorted=True)
        if dead_mask is not None and k_aux > 0:
            aux_values, aux_indices = scores.masked_fill(~dead_mask, 0.0).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values, aux_indices = values[:, :0], indices[:, :0]
        return values, indices, aux_values, aux_indices


register_architecture(GainTopKSAEConfig, GainTopKSAE, presets={"gain_topk": {}})

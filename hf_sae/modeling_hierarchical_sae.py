"""HierarchicalSAE: a TopK SAE trained so that every prefix budget k' <= k is a good SAE.

Encoder (Gao et al. 2024): a = ReLU(W_encᵀ(x − b_dec) + b_enc); latents = the k largest, sorted descending.
Objective (Balagansky et al. 2025): the mean over budgets of the MSE of the prefix reconstructions, see
:func:`hf_sae.losses.hierarchical_topk_loss`. With ``hierarchical=False`` it is a plain TopK SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .configuration_hierarchical_sae import HierarchicalSAEConfig
from .modeling_sae import SAEPreTrainedModel
from .registry import register_architecture
from .sparse import topk_encode


class HierarchicalSAE(SAEPreTrainedModel):
    """TopK SAE with the HierarchicalTopK objective.

    Parameters: ``encoder.weight`` (d_sae, d_in) and ``encoder.bias`` (d_sae,) — rows are latents, so the sparse
    backward gathers contiguous rows —, ``W_dec`` (d_sae, d_in) with unit-norm rows, ``b_dec`` (d_in,).
    ``W_enc`` is the SAEBench-style (d_in, d_sae) view of the encoder weight.
    """

    config_class = HierarchicalSAEConfig
    supports_latent_parallel = True  # latents are the top-k of independent encoder rows: --shard-latents works

    def __init__(self, config: HierarchicalSAEConfig):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.d_sae)
        self.post_init()

    def reset_parameters(self) -> None:
        """Gao et al. init: random unit decoder rows, W_enc = W_decᵀ, b_enc = b_dec = 0."""
        self.W_dec.normal_()
        self.set_decoder_norm_to_unit_norm()
        self.encoder.weight.copy_(self.W_dec)
        self.encoder.bias.zero_()
        self.b_dec.zero_()

    def encoder_biases(self) -> list[nn.Parameter]:
        return [self.encoder.bias]

    @property
    def W_enc(self) -> Tensor:
        """(d_in, d_sae) view of the encoder weight (SAEBench convention)."""
        return self.encoder.weight.t()

    @property
    def b_enc(self) -> Tensor:
        return self.encoder.bias

    def _pre_acts_flat(self, x: Tensor) -> Tensor:
        return torch.relu(nn.functional.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))

    def _encode_topk(
        self, x: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0, center: Tensor | None = None
    ):
        """``center`` replaces b_dec in the centring x − b_dec (a latent-parallel shard passes b_dec through an
        op that sums its gradient over processes, see :mod:`hf_sae.latent_parallel`)."""
        center = self.b_dec if center is None else center
        return topk_encode(x, self.encoder.weight, self.encoder.bias, k, dead_mask, k_aux, center=center)


register_architecture(
    HierarchicalSAEConfig,
    HierarchicalSAE,
    presets={
        "hierarchical": {},
        "topk": {"hierarchical": False},
    },  # "hierarchical" fixes nothing: --no-hierarchical works
)

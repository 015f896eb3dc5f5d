"""JumpReLUSAE: the JumpReLU SAE of Gemma Scope, loadable next to hf-sae's TopK SAEs.

Rajamanoharan et al., "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders"
(arXiv 2407.14435), Eq. 5-6, as released in Gemma Scope (Lieberum et al. 2024):

    pre  = x W_enc + b_enc                   (x − b_dec instead of x when ``apply_b_dec_to_input``)
    acts = ReLU(pre) · 1[pre > threshold]    (per-latent threshold θ)
    x̂    = b_dec + acts W_dec

For θ >= 0 (every released SAE: θ = exp(log θ) in training) ReLU(pre)·1[pre > θ] = pre·1[pre > θ], SAELens' form.

How it fits the hf-sae contract (``encode`` returns latents sorted descending, capped at ``config.k``):
the active latents are ranked by value and the first ``k`` kept. ``config.k`` defaults to ``d_sae`` (no cap), so
``decode(encode(x))`` equals the source SAE's reconstruction exactly; inactive slots carry value 0 and contribute
nothing. Decoder rows are *not* unit-norm in JumpReLU SAEs; ``W_dec`` is kept raw (never renormalised) because
rescaling rows would change the latent values and the reconstruction. Latent values are therefore in the source's
units, and steering strengths mean "this much of the raw decoder row".

``forward`` computes the reconstruction and the plain MSE only (``losses = {"reconstruction": ...}``): hf-sae does
not train JumpReLU SAEs (their L0 penalty needs straight-through threshold gradients), and ``threshold`` receives
no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .configuration_jumprelu_sae import JumpReLUSAEConfig
from .modeling_sae import SAEOutput, SAEPreTrainedModel
from .registry import register_architecture
from .sparse import SparseLatents


class JumpReLUSAE(SAEPreTrainedModel):
    """JumpReLU SAE (Gemma Scope / SAELens layout). Drop-in for encode, decode, steering and feature flow.

    Parameters (stored as the source gives them): ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``threshold``
    (d_sae,), ``W_dec`` (d_sae, d_in) with raw (not unit) rows, ``b_dec`` (d_in,).
    """

    config_class = JumpReLUSAEConfig

    def __init__(self, config: JumpReLUSAEConfig):
        super().__init__(config)
        self.W_enc = nn.Parameter(torch.empty(config.d_in, config.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.threshold = nn.Parameter(torch.zeros(config.d_sae))
        self.post_init()

    def reset_parameters(self) -> None:
        """A fresh JumpReLUSAE: random unit decoder rows, W_enc = W_decᵀ, zero biases and thresholds (a ReLU SAE).

        Real JumpReLU SAEs come from :mod:`hf_sae.convert`; this init only makes a new instance well defined.
        """
        self.W_dec.normal_()
        self.set_decoder_norm_to_unit_norm()
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.threshold.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def unit_activations(self) -> Tensor:
        """The thresholds θ (1 where θ <= 0, a plain ReLU latent): a latent value of θ_i is "just firing"."""
        theta = self.threshold.detach()
        return torch.where(theta > 0, theta, torch.ones_like(theta))

    @torch.no_grad()
    def fold_unit_activations(self) -> JumpReLUSAE:
        """Fold the thresholds in (Mechanistic Permutability Eq. 4), in place: W_enc′ = W_enc·diag(1/θ),
        b_enc′ = b_enc/θ, W_dec′ = diag(θ)·W_dec, θ′ = 1. A latent's value becomes z/θ and its decoder row θ·W_dec, so
        z·W_dec is the same, and pre/θ > 1 exactly when pre > θ; latents with θ <= 0 are left as they are."""
        scale = self.unit_activations()
        self.W_enc.div_(scale)
        self.b_enc.div_(scale)
        self.W_dec.mul_(scale[:, None])
        self.threshold.copy_(torch.where(self.threshold > 0, torch.ones_like(scale), self.threshold))
        return self

    def encoder_biases(self) -> list[nn.Parameter]:
        """Parameters measured in input units: folding an activation scale s divides them by s (with b_dec)."""
        return [self.b_enc, self.threshold]

    # -------------------------------------------------------------------------------------------- encoding
    def _pre_acts_flat(self, x: Tensor) -> Tensor:
        """x: (N, d_in) -> (N, d_sae) JumpReLU activations ReLU(pre)·1[pre > threshold]."""
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = torch.addmm(self.b_enc, x, self.W_enc)
        return torch.relu(pre) * (pre > self.threshold)

    def _encode_topk(self, x: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0):
        """x: (N, d_in) -> values, indices (N, k) sorted descending; no AuxK latents (empty (N, 0) tensors)."""
        acts = self._pre_acts_flat(x)
        values, indices = acts.topk(k, dim=-1, sorted=True)
        empty_values = values.new_zeros(values.shape[0], 0)
        empty_indices = indices.new_zeros(indices.shape[0], 0)
        return values, indices, empty_values, empty_indices

    def forward(self, x: Tensor, return_dict: bool | None = None) -> SAEOutput:
        """(..., d_in) -> SAEOutput with the reconstruction at ``config.k``, the latents and the MSE (no L0 term)."""
        self._check_input(x)
        cfg = self.config
        flat = self._scale_in(x.reshape(-1, cfg.d_in))
        values, indices, _, _ = self._encode_topk(flat, cfg.k)
        shape = (*x.shape[:-1], cfg.k)
        latents = SparseLatents(values.reshape(shape), indices.reshape(shape))
        reconstruction = self.decode(latents)
        loss = (self._scale_in(reconstruction) - self._scale_in(x)).pow(2).mean()
        return SAEOutput(loss=loss, reconstruction=reconstruction, latents=latents, losses={"reconstruction": loss})


register_architecture(JumpReLUSAEConfig, JumpReLUSAE, presets={"jumprelu": {}})

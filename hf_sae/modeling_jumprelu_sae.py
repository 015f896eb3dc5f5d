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
nothing. Decoder rows of released JumpReLU SAEs are *not* unit-norm; a converted ``W_dec`` is kept raw (never
renormalised) because rescaling rows would change the latent values and the reconstruction (training, like every
hf-sae training step, keeps the rows of the SAE it trains unit-norm). Latent values are therefore in the source's
units, and steering strengths mean "this much of the raw decoder row".

Training (Rajamanoharan et al. 2024, Sec. 4; the Gemma Scope recipe): in training mode ``forward`` returns
L = mean_{batch, d_in} (x − x̂)² + λ_t · mean_batch Σ_i H(pre_i − θ_i), the threshold's gradients coming from the
straight-through estimators of Eq. 11-12 with a rectangle kernel of bandwidth ε (:func:`hf_sae.losses.jumprelu`,
:func:`hf_sae.losses.step`); λ_t grows linearly to ``l0_coefficient`` over ``l0_warmup_steps`` steps (a saved
``steps_trained`` counter). A config with ``threshold_parametrization="log"`` (what training builds) stores
``log_threshold`` and θ = exp(log θ); ``sae.threshold`` reads θ in both parametrisations. In eval mode ``forward``
is the inference reconstruction and its MSE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .configuration_jumprelu_sae import JumpReLUSAEConfig
from .losses import hierarchical_topk_loss, jumprelu, step
from .modeling_sae import SAEOutput, SAEPreTrainedModel
from .registry import register_architecture
from .sparse import CentringGradient, SelectedLinear, SparseLatents, compact_latents


class JumpReLUSAE(SAEPreTrainedModel):
    """JumpReLU SAE (Gemma Scope / SAELens layout). Drop-in for encode, decode, steering and feature flow.

    Parameters (stored as the source gives them): ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``threshold``
    (d_sae,) — or ``log_threshold`` with ``threshold_parametrization="log"`` —, ``W_dec`` (d_sae, d_in) with raw (not
    unit) rows, ``b_dec`` (d_in,).
    """

    config_class = JumpReLUSAEConfig

    def __init__(self, config: JumpReLUSAEConfig):
        super().__init__(config)
        self.W_enc = nn.Parameter(torch.empty(config.d_in, config.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        if config.threshold_parametrization == "log":
            self.log_threshold = nn.Parameter(torch.zeros(config.d_sae))
        else:
            self.threshold = nn.Parameter(torch.zeros(config.d_sae))
        # Training steps taken (the λ warm-up); saved with a trained (log) SAE so a resumed run continues it.
        persistent = config.threshold_parametrization == "log"
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long), persistent=persistent)
        self.post_init()

    def __getattr__(self, name: str):
        if name == "threshold" and "log_threshold" in self._parameters:
            return self._parameters["log_threshold"].exp()  # θ = exp(log θ), with gradient
        return super().__getattr__(name)

    def reset_parameters(self) -> None:
        """A fresh JumpReLUSAE: random unit decoder rows, W_enc = W_decᵀ, zero biases; thresholds 0 (a ReLU SAE)
        in the direct parametrisation, ``initial_threshold`` in the log one (the training init of the paper).

        Real released JumpReLU SAEs come from :mod:`hf_sae.convert`.
        """
        self.W_dec.normal_()
        self.set_decoder_norm_to_unit_norm()
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        if "log_threshold" in self._parameters:
            self.log_threshold.fill_(math.log(self.config.initial_threshold))
        else:
            self.threshold.zero_()
        self.b_dec.zero_()
        if hasattr(self, "steps_trained"):
            self.steps_trained.zero_()

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
        if "log_threshold" in self._parameters:
            self.log_threshold.zero_()
        else:
            self.threshold.copy_(torch.where(self.threshold > 0, torch.ones_like(scale), self.threshold))
        return self

    def encoder_biases(self) -> list[nn.Parameter]:
        """Parameters measured in input units: folding an activation scale s divides them by s (with b_dec)."""
        return [self.b_enc] + ([] if "log_threshold" in self._parameters else [self.threshold])

    @torch.no_grad()
    def fold_activation_scale(self, scale: float | None = None) -> None:
        """As the base class; θ is divided by s too (log θ − log s in the log parametrisation)."""
        if self.config.activation_scale_folded and scale is None:
            return
        value = float(self.config.activation_scale if scale is None else scale)
        super().fold_activation_scale(scale)
        if "log_threshold" in self._parameters:
            self.log_threshold.sub_(math.log(value))

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
        """(..., d_in) -> SAEOutput. Eval mode: the reconstruction at ``config.k``, the latents and the MSE. Training
        mode (with autograd on): the MSE + λ·L0 objective of the module docstring, ``losses = {"reconstruction",
        "l0"}`` (the L0 term as added, λ_t·L0) and the active latents (width: the batch's largest L0)."""
        if not (self.training and torch.is_grad_enabled()):
            return self._inference_forward(x)
        self._check_input(x)
        cfg = self.config
        flat = self._scale_in(x.reshape(-1, cfg.d_in))
        x_in = flat - self.b_dec if cfg.apply_b_dec_to_input else flat
        pre = torch.addmm(self.b_enc, x_in, self.W_enc)
        threshold = self.threshold
        with torch.no_grad():  # every entry with a value or a straight-through gradient: pre > θ − ε/2
            band = pre > threshold - cfg.bandwidth / 2
            width = max(1, int(band.sum(-1).max()))
        if width <= self.sparse_step_width * cfg.d_sae:
            mse, l0, x_hat, acts, columns = self._sparse_step(flat, x_in, pre.detach(), threshold, band, width)
        else:  # early in training (θ near 0) most latents fire: the dense step is cheaper
            acts = jumprelu(pre, threshold, cfg.bandwidth)
            x_hat = torch.addmm(self.b_dec, acts, self.W_dec)
            wide = torch.promote_types(x_hat.dtype, torch.float32)  # half precision accumulates in fp32
            mse = (x_hat.to(wide) - flat.to(wide)).pow(2).mean()
            l0 = step(pre, threshold, cfg.bandwidth).to(wide).sum(-1).mean()
            columns = None
        with torch.no_grad():
            self.steps_trained += 1
            warmup = (self.steps_trained.float() / cfg.l0_warmup_steps).clamp_max(1.0) if cfg.l0_warmup_steps else 1.0
            values, indices = compact_latents(acts.detach())
            if columns is not None:  # compact_latents ranked the band's slots: back to latent ids
                indices = columns.gather(1, indices)
        l0_term = cfg.l0_coefficient * warmup * l0
        losses = {"reconstruction": mse, "l0": l0_term}
        return self._sae_output(x, values, indices, x_hat.detach(), mse + l0_term, losses)

    # The sparse step runs when the band pre > θ − ε/2 of every token fits in this fraction of the latents.
    sparse_step_width = 0.125

    def _sparse_step(self, x: Tensor, x_in: Tensor, pre: Tensor, threshold: Tensor, band: Tensor, width: int):
        """The training objective on the band's latents only (the others have neither a value nor a gradient):
        their pre-activations with the sparse encoder backward, the JumpReLU and step STEs on the gathered
        thresholds, the MSE on the fused kernel. The same loss and gradients as the dense step, O(N·width·d_in)."""
        cfg = self.config
        columns = band.to(pre.dtype).topk(width, dim=-1).indices  # (N, width): every band entry of the row first
        in_band = band.gather(1, columns)
        weight, bias = self.W_enc.t(), self.b_enc
        if cfg.apply_b_dec_to_input and self.b_dec.requires_grad:
            bias = CentringGradient.apply(bias, weight, self.b_dec)
        pre_band = SelectedLinear.apply(x_in.detach(), weight, bias, columns, pre.gather(1, columns))
        threshold_band = threshold[columns]
        acts = jumprelu(pre_band, threshold_band, cfg.bandwidth) * in_band
        l0 = (step(pre_band, threshold_band, cfg.bandwidth) * in_band).sum(-1).mean()
        mse, x_hat = hierarchical_topk_loss(x, acts, columns, self.W_dec, self.b_dec, [width])
        return mse, l0.to(mse.dtype), x_hat, acts, columns

    @classmethod
    def run_defaults(cls, total_steps: int) -> dict:
        """λ's warm-up: Gemma Scope's 10,000 steps, at most a tenth of a shorter run (else a short run would end
        before λ had grown)."""
        return {"l0_warmup_steps": max(1, min(10_000, total_steps // 10))}

    def _inference_forward(self, x: Tensor) -> SAEOutput:
        self._check_input(x)
        cfg = self.config
        flat = self._scale_in(x.reshape(-1, cfg.d_in))
        values, indices, _, _ = self._encode_topk(flat, cfg.k)
        shape = (*x.shape[:-1], cfg.k)
        latents = SparseLatents(values.reshape(shape), indices.reshape(shape))
        reconstruction = self.decode(latents)
        loss = (self._scale_in(reconstruction) - self._scale_in(x)).pow(2).mean()
        return SAEOutput(loss=loss, reconstruction=reconstruction, latents=latents, losses={"reconstruction": loss})


register_architecture(JumpReLUSAEConfig, JumpReLUSAE, presets={"jumprelu": {"threshold_parametrization": "log"}})

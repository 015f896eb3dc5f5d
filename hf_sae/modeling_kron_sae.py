"""KronSAE: the encoder factorised into Kronecker heads with the mAND activation.

Kurochkin et al., "Kronecker Factorization Improves Efficiency and Interpretability of Sparse Autoencoders"
(arXiv 2505.22255, App. H). One fused encoder matrix gives, per head h, m base pre-activations u_h and n
extension pre-activations w_h (u = P x̃ + b_P, w = Q x̃ + b_Q with x̃ = x − b_dec, as TopK SAEs read their input;
``apply_b_dec_to_input=False`` reads raw x as the paper's listing does, and loses most latents on a residual stream).
Latent (h, i, j), at index h·m·n + i·n + j, is

    mAND(u_hi, w_hj) = sqrt(u_hi · w_hj) if u_hi > 0 and w_hj > 0 else 0,

so per head the squared scores are the rank-one outer product ReLU(u_h) ReLU(w_h)ᵀ. Deviation from the listing:
it adds 1e-5 inside the square root; we keep exact zeros for inactive pairs and guard the square root's gradient
(it is evaluated only where u·w > 0), so gradients stay finite. TopK, the decoder and the (hierarchical) loss are
those of every hf-sae SAE. ``kron_activation="relu_product"`` uses ReLU(u)·ReLU(w) instead (the paper's ablation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .configuration_kron_sae import KronSAEConfig
from .errors import SAEConfigError
from .kernels import kron_cpu_kernels
from .modeling_sae import SAEPreTrainedModel
from .registry import register_architecture
from .sparse import CentringGradient, SparseLinearGather


def mand(u: Tensor, w: Tensor) -> Tensor:
    """Elementwise mAND: sqrt(u·w) where both are positive, exactly 0 elsewhere; finite gradients everywhere.

    ∂/∂u = w / (2 mAND) = sqrt(w/u) / 2 where mAND > 0, and 0 elsewhere (also where u·w underflows to 0).
    """
    return _MAnd.apply(u, w)


class _MAnd(torch.autograd.Function):
    """mAND = sqrt(ReLU(u)·ReLU(w)) (equal to sqrt(u·w) when both are positive, else 0) with its guarded gradient,
    in a few fused elementwise passes (the step runs it on every selected latent)."""

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor) -> Tensor:
        z = (u.clamp_min(0) * w.clamp_min(0)).sqrt_()
        ctx.save_for_backward(u, w, z)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, w, z = ctx.saved_tensors
        half = torch.where(z > 0, grad * 0.5 / z, torch.zeros_like(z))  # z > 0 implies u > 0 and w > 0
        return half * w, half * u


class KronSAE(SAEPreTrainedModel):
    """Kronecker-factorised SAE. Drop-in for :class:`~hf_sae.HierarchicalSAE` (same encode/decode/forward).

    Parameters: ``encoder.weight`` (h·(m+n), d_in) — per head m base rows then n extension rows —,
    ``encoder.bias`` (h·(m+n),), ``W_dec`` (d_sae, d_in) unit rows, ``b_dec`` (d_in,).
    """

    config_class = KronSAEConfig

    def __init__(self, config: KronSAEConfig):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.num_heads * (config.base_dim + config.ext_dim))
        self.post_init()

    # ------------------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Encoder ~ N(0, 1/d_in) (rows of norm ~1), biases 0; decoder row (h,i,j) = P_hi + Q_hj, unit-normalised.

        Deviation from the paper's N(0, 1/(2F)): the learning-rate rule (8e-4 / sqrt(F / 2^14)) is the TopK recipe's,
        whose encoder W_decᵀ has unit columns (elements ~ 1/sqrt(d_in)). Adam moves every element by ~lr per step,
        so at N(0, 1/(2F)) (std 0.011 at F = 4096) each step changed the encoder by ~15% of its scale. On Gemma 3 270M
        layer 6 (200 x 1024 tokens, AuxK on; experiments/kron_centring.py): TopK EV 0.9049 / 2.4% dead; this init
        EV 0.9004 / 11.2%; the paper's EV 0.8890 / 10.7% (26.9% dead at step 50; 22.3% at 200 with AuxK off).
        """
        cfg = self.config
        self.encoder.weight.normal_(0.0, 1.0 / math.sqrt(cfg.d_in))
        self.encoder.bias.zero_()
        base, ext = self._split(self.encoder.weight.t())  # (d, h, m), (d, h, n)
        rows = base.permute(1, 2, 0)[:, :, None, :] + ext.permute(1, 2, 0)[:, None, :, :]  # (h, m, n, d)
        self.W_dec.copy_(rows.reshape(cfg.d_sae, cfg.d_in))
        self.set_decoder_norm_to_unit_norm()
        self.b_dec.zero_()

    def encoder_biases(self) -> list[nn.Parameter]:
        return [self.encoder.bias]

    @torch.no_grad()
    def fold_activation_scale(self, scale: float | None = None) -> None:
        """As the base class for mAND (degree 1 in x: biases / s). ReLU(u)·ReLU(w) is degree 2, so its fold is
        encoder weight · sqrt(s) and encoder bias / sqrt(s) (then latents are z_s / s, as for every SAE)."""
        if self.config.kron_activation != "relu_product" or (self.config.activation_scale_folded and scale is None):
            return super().fold_activation_scale(scale)
        scale = float(self.config.activation_scale if scale is None else scale)
        root = scale**0.5
        self.encoder.weight.mul_(root)
        self.encoder.bias.div_(root)
        self.b_dec.div_(scale)
        self.config.activation_scale = scale
        self.config.activation_scale_folded = True

    # ------------------------------------------------------------------------------------------------ views
    @property
    def W_enc(self) -> Tensor:
        # TypeError, not AttributeError: nn.Module.__getattr__ would swallow an AttributeError's message.
        raise TypeError(
            "KronSAE has no single linear encoder: latent (h,i,j) is mAND(u_hi, w_hj) of two linear maps. Use "
            "sae.encoder.weight (the fused (num_heads*(base_dim+ext_dim), d_in) matrix) or sae.pre_acts(x)."
        )

    @property
    def b_enc(self) -> Tensor:
        raise TypeError(
            "KronSAE has no per-latent encoder bias; its biases are per base/extension pre-activation: "
            "sae.encoder.bias with shape (num_heads*(base_dim+ext_dim),)."
        )

    # --------------------------------------------------------------------------------------------- encoding
    def _split(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(N, h·(m+n)) -> u (N, h, m), w (N, h, n)."""
        cfg = self.config
        pre = pre.reshape(pre.shape[0], cfg.num_heads, cfg.base_dim + cfg.ext_dim)
        return pre[..., : cfg.base_dim], pre[..., cfg.base_dim :]

    def _activation(self, u: Tensor, w: Tensor) -> Tensor:
        if self.config.kron_activation == "mand":
            return mand(u, w)
        if self.config.kron_activation == "relu_product":
            return torch.relu(u) * torch.relu(w)
        raise SAEConfigError(f"unknown kron_activation {self.config.kron_activation!r}")

    def _encoder_input(self, x: Tensor) -> Tensor:
        """x̃ = x − b_dec (or x itself with ``apply_b_dec_to_input=False``): what the encoder reads. x: (N, d_in)."""
        return x - self.b_dec if self.config.apply_b_dec_to_input else x

    def head_factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, d_in) -> u (N, h, m), w (N, h, n): the base and extension pre-activations."""
        return self._split(self.encoder(self._encoder_input(x)))

    def _pre_acts_flat(self, x: Tensor) -> Tensor:
        u, w = self.head_factors(x)
        scores = self._activation(u[..., :, None], w[..., None, :])  # (N, h, m, n)
        return scores.reshape(x.shape[0], self.config.d_sae)

    def _encode_topk(self, x: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0):
        cfg = self.config
        weight, bias = self.encoder.weight, self.encoder.bias
        centred = self._encoder_input(x)  # x̃ (N, d_in)
        with torch.no_grad():  # select without gradient, then recompute only the selected scores with it
            pre = centred @ weight.t()  # (N, h·(m+n)) without the bias: the selection adds it on the fly
            indices, columns = select_topk_latents(pre, cfg.num_heads, cfg.base_dim, cfg.ext_dim, k, bias=bias)
            if dead_mask is not None and k_aux > 0:
                squared = self._dense_squared_scores(pre + bias)
                _, aux_indices = squared.masked_fill_(~dead_mask, -1.0).topk(k_aux, dim=-1)
                aux_columns = torch.cat(self._columns(aux_indices), dim=-1)
                t = k + k_aux  # columns of all selected latents: every u, then every w
                columns = torch.cat([columns[:, :k], aux_columns[:, :k_aux], columns[:, k:], aux_columns[:, k_aux:]], 1)
            else:
                aux_indices, t = indices.new_zeros(indices.shape[0], 0), k
        if torch.is_grad_enabled() and (centred.requires_grad or weight.requires_grad):
            # The sparse backward touches only the 2 columns each selected latent reads. It reads x̃ without
            # gradient: b_dec's share (∂pre/∂b_dec = −W) goes through the bias (see CentringGradient).
            bias_in = CentringGradient.apply(bias, weight, self.b_dec) if self._centres_with_b_dec(centred) else bias
            gathered = SparseLinearGather.apply(centred.detach(), weight, bias_in, columns, pre, True)
        else:
            gathered = pre.gather(1, columns) + bias[columns]
        values = self._activation(gathered[:, :t], gathered[:, t:])
        return values[:, :k], indices, values[:, k:], aux_indices

    def _centres_with_b_dec(self, centred: Tensor) -> bool:
        """Whether x̃ = x − b_dec carries b_dec's gradient (x itself never needs one in training)."""
        return self.config.apply_b_dec_to_input and centred.requires_grad

    def _dense_squared_scores(self, pre: Tensor) -> Tensor:
        """(N, h·(m+n)) -> (N, d_sae) ReLU(u)·ReLU(w): mAND² (the relu_product score itself); same ranking, no
        square root. Only AuxK needs all of them (the dead latents' ranking is not per head)."""
        u, w = self._split(pre)
        return (u.relu()[..., :, None] * w.relu()[..., None, :]).reshape(pre.shape[0], self.config.d_sae)

    def _columns(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return latent_columns(indices, self.config.base_dim, self.config.ext_dim)


def latent_columns(indices: Tensor, base_dim: int, ext_dim: int) -> tuple[Tensor, Tensor]:
    """Latent ids (N, t), h·m·n + i·n + j -> the fused-encoder columns of their u_{h,i} and w_{h,j}, each (N, t)."""
    mn, width = base_dim * ext_dim, base_dim + ext_dim
    head, rest = indices // mn, indices % mn
    return head * width + rest // ext_dim, head * width + base_dim + rest % ext_dim


def select_topk_latents(
    pre: Tensor, num_heads: int, base_dim: int, ext_dim: int, k: int, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ids (N, k) of the k largest mAND scores, sorted descending, without scoring all h·m·n latents, and the
    fused-encoder columns (N, 2k) they read (every latent's u column, then every latent's w column).

    pre: (N, h·(m+n)), plus ``bias`` (h·(m+n),) when given (added on the fly: the encoder's matmul need not
    broadcast it into its output). The compiled CPU kernel (``kernels/kron_cpu.cpp``, one pass per row) where it is
    built, else :func:`select_topk_latents_reference`: the same latents (ties aside: the kernel prefers the smaller
    id).
    """
    kernels = kron_cpu_kernels() if pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.float64) else None
    if kernels is not None:
        bias_arg = bias.detach().to(pre.dtype) if bias is not None else pre.new_zeros(0)
        indices, columns = kernels.kron_select_topk(pre.contiguous(), bias_arg, num_heads, base_dim, ext_dim, k)
        return indices, columns
    indices = select_topk_latents_reference(pre if bias is None else pre + bias, num_heads, base_dim, ext_dim, k)
    return indices, torch.cat(latent_columns(indices, base_dim, ext_dim), dim=-1)


def select_topk_latents_reference(pre: Tensor, num_heads: int, base_dim: int, ext_dim: int, k: int) -> Tensor:
    """Pure-torch :func:`select_topk_latents` (any device and dtype), and the reference the kernel is tested against.

    pre: (N, h·(m+n)) fused pre-activations (per head m base u, then n extension w). Per head the squared scores
    are ReLU(u_h) ReLU(w_h)ᵀ (rank one), so a head's best latent is max ReLU(u_h) · max ReLU(w_h). A latent of
    score s is in the top k only if fewer than k heads have a best latent above s, so its head is among the k heads
    with the largest best latent: only those k·m·n candidates are scored. The products are the same floats the
    dense ranking compares, so the selection equals ``topk`` over all d_sae scores up to the order of exact ties.
    """
    n_rows = pre.shape[0]
    heads = pre.view(n_rows, num_heads, base_dim + ext_dim)
    u, w = heads[..., :base_dim], heads[..., base_dim:]
    best = u.amax(-1).clamp_min_(0) * w.amax(-1).clamp_min_(0)  # (N, h): max over the head of ReLU(u)·ReLU(w)
    n_heads = min(k, num_heads)
    _, top_heads = best.topk(n_heads, dim=-1, sorted=False)  # (N, n_heads)
    chosen = heads.gather(1, top_heads[..., None].expand(-1, -1, base_dim + ext_dim)).relu_()
    candidates = (chosen[..., :base_dim, None] * chosen[..., None, base_dim:]).reshape(n_rows, -1)
    _, position = candidates.topk(k, dim=-1, sorted=True)  # (N, k) into (n_heads, m, n)
    mn = base_dim * ext_dim
    return top_heads.gather(1, position // mn) * mn + position % mn


register_architecture(KronSAEConfig, KronSAE, presets={"kron": {}})

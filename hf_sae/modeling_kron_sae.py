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
from .modeling_sae import SAEPreTrainedModel
from .registry import register_architecture
from .sparse import SparseLinearGather


def mand(u: Tensor, w: Tensor) -> Tensor:
    """Elementwise mAND: sqrt(u·w) where both are positive, exactly 0 elsewhere; finite gradients everywhere."""
    product = u * w
    active = (u > 0) & (w > 0)
    safe = torch.where(active, product, torch.ones_like(product))
    return torch.where(active, safe.sqrt(), torch.zeros_like(product))


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
        """Paper init: encoder ~ N(0, 1/(2F)), biases 0; decoder row (h,i,j) = P_hi + Q_hj, unit-normalised."""
        cfg = self.config
        self.encoder.weight.normal_(0.0, math.sqrt(1.0 / (2 * cfg.d_sae)))
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
        x = self._encoder_input(x)  # x̃; the sparse gathers below read it too and pass its gradient on to b_dec
        sparse_backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        with torch.no_grad():  # select on the dense scores, then recompute only the selected ones with gradient
            pre = torch.addmm(bias, x, weight.t())
            u, w = self._split(pre)
            # Rank by ReLU(u)·ReLU(w): it is mAND² (and the relu_product score itself), so the ranking is the same
            # and one multiply replaces the masked square root over all d_sae scores.
            scores = (u.relu()[..., :, None] * w.relu()[..., None, :]).reshape(x.shape[0], cfg.d_sae)
            _, indices = scores.topk(k, dim=-1, sorted=True)
            if dead_mask is not None and k_aux > 0:
                _, aux_indices = scores.masked_fill_(~dead_mask, -1.0).topk(k_aux, dim=-1, sorted=False)
            else:
                aux_indices = indices.new_zeros(indices.shape[0], 0)
        if not sparse_backward:
            return self._gather_scores(pre, indices), indices, self._gather_scores(pre, aux_indices), aux_indices
        all_indices = torch.cat([indices, aux_indices], dim=-1)
        values = self._gather_scores(pre, all_indices, x)
        return values[:, :k], indices, values[:, k:], aux_indices

    def _gather_scores(self, pre: Tensor, indices: Tensor, x: Tensor | None = None) -> Tensor:
        """Activation of latents ``indices`` (N, t) from the fused pre-activations pre (N, h·(m+n)).

        With ``x`` given, u and w are re-gathered through :class:`SparseLinearGather`, so the encoder gradient only
        touches the two columns each selected latent reads.
        """
        cfg = self.config
        mn, width = cfg.base_dim * cfg.ext_dim, cfg.base_dim + cfg.ext_dim
        head, rest = indices // mn, indices % mn
        base_col = head * width + rest // cfg.ext_dim
        ext_col = head * width + cfg.base_dim + rest % cfg.ext_dim
        if x is None:
            return self._activation(pre.gather(1, base_col), pre.gather(1, ext_col))
        columns = torch.cat([base_col, ext_col], dim=-1)
        gathered = SparseLinearGather.apply(x, self.encoder.weight, self.encoder.bias, columns, pre)
        t = indices.shape[-1]
        return self._activation(gathered[:, :t], gathered[:, t:])


register_architecture(KronSAEConfig, KronSAE, presets={"kron": {}})

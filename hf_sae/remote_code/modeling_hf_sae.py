"""Self-contained hf-sae SAEs, for loading on a machine *without* hf-sae installed.

``hf_sae.hub.push_sae(..., include_code=True)`` uploads this file next to ``config.json`` and adds an ``auto_map``, so

    from transformers import AutoModel
    sae = AutoModel.from_pretrained("org/repo", trust_remote_code=True)

gives an SAE with the same ``encode`` / ``decode`` / ``encode_dense`` / ``forward`` outputs as hf-sae's classes
(``HierarchicalSAE`` — TopK when ``hierarchical=False`` —, ``KronSAE``, ``JumpReLUSAE``). It depends on torch and
transformers only. It is the inference path: hf-sae's training objective, AuxK and kernels are not included, and
``forward(x).loss`` is the plain reconstruction MSE. With hf-sae installed, ``import hf_sae`` and leave
``trust_remote_code`` off to get the full classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


# ---------------------------------------------------------------------------------------------------- configs
class _SAEConfig(PreTrainedConfig):
    """Fields hf-sae's models need at inference; every other config.json key is kept as an attribute."""

    def __init__(
        self,
        d_in: int = 2304,
        d_sae: int = 16384,
        k: int = 64,
        hierarchical: bool = True,
        activation_scale: float = 1.0,
        activation_scale_folded: bool = True,
        hook_site: str = "resid",
        hook_layer: int | None = None,
        base_model: str | None = None,
        **kwargs,
    ):
        self.d_in, self.d_sae, self.k, self.hierarchical = d_in, d_sae, k, hierarchical
        self.activation_scale, self.activation_scale_folded = activation_scale, activation_scale_folded
        self.hook_site, self.hook_layer, self.base_model = hook_site, hook_layer, base_model
        super().__init__(**kwargs)


class HierarchicalSAEConfig(_SAEConfig):
    model_type = "hierarchical_sae"


class KronSAEConfig(_SAEConfig):
    model_type = "kron_sae"

    def __init__(
        self, num_heads: int = 2048, base_dim: int = 2, ext_dim: int = 4, kron_activation: str = "mand", **kwargs
    ):
        self.num_heads, self.base_dim, self.ext_dim = num_heads, base_dim, ext_dim
        self.kron_activation = kron_activation
        super().__init__(**kwargs)


class JumpReLUSAEConfig(_SAEConfig):
    model_type = "jumprelu_sae"

    def __init__(self, apply_b_dec_to_input: bool = False, hierarchical: bool = False, **kwargs):
        self.apply_b_dec_to_input = apply_b_dec_to_input
        super().__init__(hierarchical=hierarchical, **kwargs)


# ----------------------------------------------------------------------------------------------------- models
@dataclass
class SparseLatents:
    """values, indices: (..., k), sorted by value descending."""

    values: Tensor
    indices: Tensor

    def __iter__(self):
        yield self.values
        yield self.indices

    def to_dense(self, d_sae: int) -> Tensor:
        return self.values.new_zeros(*self.values.shape[:-1], d_sae).scatter_(-1, self.indices, self.values)


@dataclass
class SAEOutput(ModelOutput):
    loss: Tensor | None = None
    reconstruction: Tensor | None = None
    latents: SparseLatents | None = None


class _SAE(PreTrainedModel):
    base_model_prefix = "sae"
    main_input_name = "x"
    _no_split_modules: list[str] = []

    def __init__(self, config):
        super().__init__(config)
        self.W_dec = nn.Parameter(torch.zeros(config.d_sae, config.d_in))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))

    def _init_weights(self, module):  # weights always come from the checkpoint
        pass

    def _scale_in(self, x: Tensor) -> Tensor:
        return x if self.config.activation_scale_folded else x * self.config.activation_scale

    def _scale_out(self, x: Tensor) -> Tensor:
        return x if self.config.activation_scale_folded else x / self.config.activation_scale

    def _scores(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden by every architecture
        raise TypeError(f"{type(self).__name__} must implement _scores()")

    def pre_acts(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) non-negative scores the latents are selected from."""
        flat = self._scale_in(x.reshape(-1, self.config.d_in).to(self.W_dec.dtype))
        return self._scores(flat).reshape(*x.shape[:-1], self.config.d_sae)

    def _topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """x: (N, d_in), scaled -> values, indices (N, k) sorted descending."""
        return self._scores(x).topk(k, dim=-1, sorted=True)

    def encode(self, x: Tensor, k: int | None = None) -> SparseLatents:
        """(..., d_in) -> the k (default config.k) largest latents, sorted descending."""
        k = self.config.k if k is None else k
        if not 1 <= k <= self.config.k:
            raise ValueError(f"k={k} is outside 1..{self.config.k}")
        flat = self._scale_in(x.reshape(-1, self.config.d_in).to(self.W_dec.dtype))
        values, indices = self._topk(flat, k)
        shape = (*x.shape[:-1], k)
        return SparseLatents(values.reshape(shape), indices.reshape(shape))

    def encode_dense(self, x: Tensor, k: int | None = None) -> Tensor:
        return self.encode(x, k).to_dense(self.config.d_sae)

    def decode(self, latents) -> Tensor:
        """SparseLatents (..., k) -> (..., d_in) = b_dec + Σ v_t W_dec[i_t]."""
        values, indices = latents
        k = values.shape[-1]
        flat_v = values.reshape(-1, k).to(self.W_dec.dtype)
        flat_i = indices.reshape(-1, k).to(device=self.W_dec.device, dtype=torch.long)
        x_hat = self.b_dec + F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v, mode="sum")
        return self._scale_out(x_hat).reshape(*values.shape[:-1], self.config.d_in)

    def forward(self, x: Tensor, return_dict: bool | None = None) -> SAEOutput:
        latents = self.encode(x)
        reconstruction = self.decode(latents)
        loss = (self._scale_in(reconstruction) - self._scale_in(x)).pow(2).mean()
        return SAEOutput(loss=loss, reconstruction=reconstruction, latents=latents)


class HierarchicalSAE(_SAE):
    """TopK SAE: scores = ReLU(W_encᵀ(x − b_dec) + b_enc)."""

    config_class = HierarchicalSAEConfig

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.d_sae)
        self.post_init()

    @property
    def W_enc(self) -> Tensor:
        return self.encoder.weight.t()

    @property
    def b_enc(self) -> Tensor:
        return self.encoder.bias

    def _scores(self, x: Tensor) -> Tensor:
        return F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))


class KronSAE(_SAE):
    """Kronecker-factorised encoder: latent (h, i, j) = mAND(u_hi, w_hj) = sqrt(u·w) where both are positive."""

    config_class = KronSAEConfig

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.Linear(config.d_in, config.num_heads * (config.base_dim + config.ext_dim))
        self.post_init()

    def _activation(self, u: Tensor, w: Tensor) -> Tensor:
        if self.config.kron_activation == "relu_product":
            return torch.relu(u) * torch.relu(w)
        product, active = u * w, (u > 0) & (w > 0)
        safe = torch.where(active, product, torch.ones_like(product))
        return torch.where(active, safe.sqrt(), torch.zeros_like(product))

    def _factors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (N, d_in) -> pre (N, h·(m+n)), u (N, h, m), w (N, h, n)."""
        cfg = self.config
        pre = torch.addmm(self.encoder.bias, x, self.encoder.weight.t())
        heads = pre.reshape(x.shape[0], cfg.num_heads, cfg.base_dim + cfg.ext_dim)
        return pre, heads[..., : cfg.base_dim], heads[..., cfg.base_dim :]

    def _scores(self, x: Tensor) -> Tensor:
        _, u, w = self._factors(x)
        return self._activation(u[..., :, None], w[..., None, :]).reshape(x.shape[0], self.config.d_sae)

    def _topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Rank by ReLU(u)·ReLU(w) (= mAND², same order), then compute the selected latents' values."""
        cfg = self.config
        pre, u, w = self._factors(x)
        ranking = (u.relu()[..., :, None] * w.relu()[..., None, :]).reshape(x.shape[0], cfg.d_sae)
        indices = ranking.topk(k, dim=-1, sorted=True).indices
        mn, width = cfg.base_dim * cfg.ext_dim, cfg.base_dim + cfg.ext_dim
        head, rest = indices // mn, indices % mn
        base_col = head * width + rest // cfg.ext_dim
        ext_col = head * width + cfg.base_dim + rest % cfg.ext_dim
        return self._activation(pre.gather(1, base_col), pre.gather(1, ext_col)), indices


class JumpReLUSAE(_SAE):
    """JumpReLU SAE (Gemma Scope): acts = ReLU(pre)·1[pre > threshold], pre = x W_enc + b_enc."""

    config_class = JumpReLUSAEConfig

    def __init__(self, config):
        super().__init__(config)
        self.W_enc = nn.Parameter(torch.zeros(config.d_in, config.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.threshold = nn.Parameter(torch.zeros(config.d_sae))
        self.post_init()

    def _scores(self, x: Tensor) -> Tensor:
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = torch.addmm(self.b_enc, x, self.W_enc)
        return torch.relu(pre) * (pre > self.threshold)


CLASSES = {
    "hierarchical_sae": (HierarchicalSAEConfig, HierarchicalSAE),
    "kron_sae": (KronSAEConfig, KronSAE),
    "jumprelu_sae": (JumpReLUSAEConfig, JumpReLUSAE),
}

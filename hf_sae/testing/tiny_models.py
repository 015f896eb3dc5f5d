"""Tiny random-weight decoder LMs for tests and benchmarks: real transformers models built from a config, in seconds.

Every builder takes a ``seed`` (the same seed gives the same weights, in any process) and config ``overrides``, leaves
the caller's global random state as it was, and returns the model in eval mode. The default shape is hidden 64,
4 layers, 4 query heads of width 16 over 2 key/value heads, MLP width 128 and vocab 1000 (BOS id 2 for the Gemmas,
1 for Llama: each config's default)::

    model = tiny_gemma2(seed=0)                        # eager attention (Gemma-2's soft-capping needs it)
    model = tiny_gemma3(seed=0, num_hidden_layers=2)
    model = tiny_llama(seed=0, head_dim=32)            # a Llama-like layout (no post-feedforward norm)
    model = tiny_qwen3(seed=0)                         # Qwen3: Llama-like, with q/k norms
    model = TINY_MODELS["gemma2"](seed=0)
    sae = tiny_sae(layer=1, site="resid", d_sae=256, k=8)  # a HierarchicalSAE that reads that model
    sae = planted_sae(directions, layer=2, site="mlp")     # feature i reads and writes directions[i]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .. import HierarchicalSAE, HierarchicalSAEConfig  # the public API: this module sits above the package

TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=1000,
)
"""The shape every tiny model shares unless overridden (the shape the tests have always used)."""


def seeded_model(model_class: type[PreTrainedModel], config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """``model_class(config)`` (an LM or an SAE) initialised from ``torch.manual_seed(seed)`` on the CPU, in eval mode.

    The global (CPU) random state is forked, so the caller's next random numbers are the ones it would have drawn
    without this call.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def tiny_gemma2(seed: int = 0, **overrides: Any) -> Gemma2ForCausalLM:
    """A tiny random-weight Gemma-2 with eager attention; ``overrides`` go to ``Gemma2Config``."""
    config = Gemma2Config(**{**TINY_CONFIG, "attn_implementation": "eager", **overrides})
    return seeded_model(Gemma2ForCausalLM, config, seed)


def tiny_gemma3(seed: int = 0, **overrides: Any) -> Gemma3ForCausalLM:
    """A tiny random-weight Gemma-3 text model; ``overrides`` go to ``Gemma3TextConfig``."""
    return seeded_model(Gemma3ForCausalLM, Gemma3TextConfig(**{**TINY_CONFIG, **overrides}), seed)


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A tiny random-weight Llama (the layout of Llama, Mistral, Qwen: no post-norms); ``overrides`` go to
    ``LlamaConfig``."""
    return seeded_model(LlamaForCausalLM, LlamaConfig(**{**TINY_CONFIG, **overrides}), seed)


def tiny_qwen3(seed: int = 0, **overrides: Any) -> Qwen3ForCausalLM:
    """A tiny random-weight Qwen3 (Llama-like layout plus per-head q/k norms); ``overrides`` go to ``Qwen3Config``."""
    return seeded_model(Qwen3ForCausalLM, Qwen3Config(**{**TINY_CONFIG, **overrides}), seed)


TINY_MODELS: dict[str, Callable[..., PreTrainedModel]] = {
    "gemma2": tiny_gemma2,
    "gemma3": tiny_gemma3,
    "llama": tiny_llama,
    "qwen3": tiny_qwen3,
}
"""The builders by family name, for tests parametrised over architectures."""


def tiny_sae(
    layer: int = 1,
    site: str = "resid",
    *,
    d_in: int = TINY_CONFIG["hidden_size"],
    d_sae: int = 256,
    k: int = 8,
    seed: int = 1,
    b_dec_std: float = 0.0,
    **config: Any,
) -> HierarchicalSAE:
    """A small random :class:`HierarchicalSAE` at ``(layer, site)`` of a tiny model, in eval mode, same weights for
    the same seed; ``config`` goes to :class:`HierarchicalSAEConfig` (e.g. ``base_model``).

    ``b_dec_std > 0`` draws a non-zero decoder bias b_dec ~ N(0, b_dec_std²) (a new SAE starts with b_dec = 0), e.g.
    so that a test sees b_dec cancel in a clamp. The global random state is left alone, as in :func:`seeded_model`.
    """
    cfg = HierarchicalSAEConfig(d_in=d_in, d_sae=d_sae, k=k, hook_layer=layer, hook_site=site, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = HierarchicalSAE(cfg)
        if b_dec_std:
            with torch.no_grad():
                sae.b_dec.normal_(std=b_dec_std)
    return sae.eval()


def planted_sae(decoder: Tensor, layer: int = 1, site: str = "resid", *, k: int = 4, **config: Any) -> HierarchicalSAE:
    """A :class:`HierarchicalSAE` whose decoder rows *and* encoder rows are ``decoder`` (d_sae, d_in), in eval mode.

    Feature i writes direction ``decoder[i]`` and fires most on it, so a test can plant features whose matches,
    predecessor classes and activations it knows. ``config`` goes to :class:`HierarchicalSAEConfig`; the global
    random state is left alone.
    """
    cfg = HierarchicalSAEConfig(
        d_in=decoder.shape[1], d_sae=decoder.shape[0], k=k, hook_layer=layer, hook_site=site, **config
    )
    with torch.random.fork_rng(devices=[]):
        sae = HierarchicalSAE(cfg).eval()
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.encoder.weight.copy_(decoder)
    return sae

"""Where an SAE reads and writes in a decoder-only language model (hook sites).

This module is the one place that turns ``(hook_layer, hook_site)`` into a module and a read/write hook. Training
(harvesting), steering, splicing and feature flow all go through :func:`resolve_site` and :meth:`Site.register`.

Sites (see ``shared/design/sites.md``):

======== ============================================================ =====================================
site     Gemma-2 / Gemma-3 (post-norm layout)                         Llama-like (no post-feedforward norm)
======== ============================================================ =====================================
resid    output of ``layers[L]`` (residual stream after layer L)       output of ``layers[L]``
mlp      output of ``layers[L].post_feedforward_layernorm``            output of ``layers[L].mlp``
attn     output of ``layers[L].post_attention_layernorm``              output of ``layers[L].self_attn`` (1st)
attn_z   input of ``layers[L].self_attn.o_proj`` (forward pre-hook)    same
======== ============================================================ =====================================

``resid``, ``mlp`` and ``attn`` have width d_model; ``attn_z`` has width n_heads * head_dim.

In transformers 5.x a decoder layer returns a plain tensor ``(batch, seq, d_model)``, 4.x returned a tuple; the hook
handles both. A hook fires at prefill ``(B, T, width)`` and at every KV-cached decode step ``(B, 1, width)``.
Handles are removed one by one: transformers installs hooks of its own on the layers, so never clear them wholesale.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import SiteError

SITES = ("resid", "mlp", "attn", "attn_z")
"""Every hook site hf-sae knows: the one list (configs, training, steering and feature flow read it)."""
D_MODEL_SITES = ("resid", "mlp", "attn")
"""The sites whose activations live in d_model space (the residual stream and what adds to it): feature flow's."""
SITE_DESCRIPTIONS = {
    "resid": "residual stream after",
    "mlp": "MLP output (after the post-MLP norm) of",
    "attn": "attention output (after o_proj and the post-attention norm) of",
    "attn_z": "concatenated attention head outputs (input of o_proj) of",
}
"""What each site reads, in words that precede "layer L" (model cards)."""

ActivationFn = Callable[[Tensor], "Tensor | None"]


# ----------------------------------------------------------------------------------------------- the layer stack
def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (``model.model`` of a ``*ForCausalLM``, or the base model itself).

    Its forward receives ``input_ids`` / ``attention_mask`` / ``cache`` for every call, whether the user calls the
    causal-LM wrapper or the base model, which is why steering tracks positions there.
    """
    candidates = (
        ("model",),
        (),
        ("model", "language_model"),
        ("language_model",),
    )
    for path in candidates:
        owner: Any = model
        for name in path:
            owner = getattr(owner, name, None)
            if owner is None:
                break
        if isinstance(owner, nn.Module) and isinstance(getattr(owner, "layers", None), nn.ModuleList):
            return owner
    raise SiteError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a `model.layers` (base model) or "
        "`model.model.layers` (*ForCausalLM) ModuleList, as in Gemma, Llama, Mistral or Qwen. Pass such a model "
        "(e.g. loaded with AutoModelForCausalLM)."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: ``model.model.layers`` for a ``*ForCausalLM``, ``model.layers`` for a base model."""
    return decoder_stack(model).layers


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers of ``model``."""
    return len(decoder_layers(model))


def model_name(model: nn.Module) -> str:
    """The Hub id or path the model was loaded from ("" for a model built from a config)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name or "")


def _hidden_size(model: nn.Module, layer: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    for name in ("input_layernorm", "post_attention_layernorm"):
        weight = getattr(getattr(layer, name, None), "weight", None)
        if isinstance(weight, Tensor):
            return int(weight.shape[0])
    raise SiteError(f"cannot tell the hidden size of {type(model).__name__}: its config has no `hidden_size`.")


# ------------------------------------------------------------------------------------------------------ the site
@dataclass
class Site:
    """One hook site: the module to hook, how to hook it, and the width of the activation there.

    Attributes:
        layer: decoder layer index L.
        name: one of :data:`SITES`.
        module: the module whose output (``kind="forward"``) or input (``kind="forward_pre"``) is the activation.
        kind: ``"forward"`` or ``"forward_pre"``.
        width: activation width (d_model; n_heads * head_dim for ``attn_z``).
    """

    layer: int
    name: str
    module: nn.Module
    kind: str
    width: int

    def register(self, fn: ActivationFn) -> RemovableHandle:
        """Hook ``fn`` on this site and return the handle (call ``handle.remove()`` to undo exactly this hook).

        ``fn(activation: Tensor (B, T, width)) -> Tensor | None``. Returning a tensor of the same shape replaces the
        activation: the module output for forward hooks (a plain tensor, or the first element of a tuple output), the
        input of ``o_proj`` for ``attn_z`` (forward pre-hook). Returning None leaves it unchanged.
        """
        if self.kind == "forward":

            def forward_hook(module: nn.Module, args: tuple, output: Any) -> Any:
                activation = output if isinstance(output, Tensor) else output[0]
                result = fn(activation)
                if result is None:
                    return None
                return result if isinstance(output, Tensor) else (result, *output[1:])

            return self.module.register_forward_hook(forward_hook)
        if self.kind == "forward_pre":

            def pre_hook(module: nn.Module, args: tuple) -> Any:
                result = fn(args[0])
                return None if result is None else (result, *args[1:])

            return self.module.register_forward_pre_hook(pre_hook)
        raise SiteError(f"Site.kind={self.kind!r} is unknown; expected 'forward' or 'forward_pre'.")

    @property
    def key(self) -> tuple[int, str]:
        """``(layer, name)``, the key used by feature flow and multi-site harvesting."""
        return (self.layer, self.name)


def resolve_site(model: nn.Module, layer: int, site: str) -> Site:
    """Resolve ``(layer, site)`` on ``model`` to a :class:`Site`; raise :class:`SiteError` with the fix otherwise."""
    if site not in SITES:
        raise SiteError(f"hook site {site!r} is unknown. Use one of {list(SITES)} (see hf_sae.sites).")
    layers = decoder_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise SiteError(
            f"layer {layer!r} is out of range: {type(model).__name__} has {len(layers)} decoder layers, so the layer "
            f"must be in 0..{len(layers) - 1}. Check the SAE's hook_layer or pass another model."
        )
    block = layers[layer]
    post_norm_layout = hasattr(block, "post_feedforward_layernorm")
    if site == "resid":
        return Site(layer, site, block, "forward", _hidden_size(model, block))
    if site == "mlp":
        module = block.post_feedforward_layernorm if post_norm_layout else getattr(block, "mlp", None)
        return Site(layer, site, _require(module, block, "mlp"), "forward", _hidden_size(model, block))
    attention = getattr(block, "self_attn", None)
    if site == "attn":
        module = block.post_attention_layernorm if post_norm_layout else attention
        return Site(layer, site, _require(module, block, "self_attn"), "forward", _hidden_size(model, block))
    o_proj = getattr(attention, "o_proj", None)
    if not isinstance(o_proj, nn.Linear):
        raise SiteError(
            f"site 'attn_z' needs `self_attn.o_proj` (an nn.Linear) in layer {layer} of {type(model).__name__}, "
            "which this architecture lacks. Use 'resid', 'mlp' or 'attn' instead."
        )
    return Site(layer, site, o_proj, "forward_pre", o_proj.in_features)


def _require(module: nn.Module | None, block: nn.Module, name: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise SiteError(
            f"decoder layer {type(block).__name__} has no `{name}` sub-module, so this site cannot be hooked. "
            "Use site 'resid', or a Gemma / Llama-like model."
        )
    return module


def resolve_sae_site(model: nn.Module, sae: nn.Module) -> Site:
    """The site an SAE reads and writes (``sae.config.hook_layer`` / ``hook_site``), checked against the model.

    Raises :class:`SiteError` when the SAE has no ``hook_layer`` or its ``d_in`` differs from the site width.
    Warns (does not raise) when the SAE's ``base_model`` names a different model than ``model`` was loaded from.
    """
    config = sae.config
    if config.hook_layer is None:
        raise SiteError(
            "this SAE's config has hook_layer=None, so it does not say where it attaches. Set "
            "sae.config.hook_layer (and hook_site) to the layer it was trained on."
        )
    site = resolve_site(model, config.hook_layer, config.hook_site)
    if config.d_in != site.width:
        raise SiteError(
            f"SAE d_in={config.d_in} does not match the width {site.width} of site {config.hook_site!r} at layer "
            f"{config.hook_layer} of {type(model).__name__}. Use an SAE trained on this model and site, or fix the "
            "SAE's hook_site / hook_layer."
        )
    check_base_model(model, config.base_model)
    return site


def check_base_model(model: nn.Module, base_model: str | None) -> None:
    """Warn when an SAE's ``base_model`` and the model's name clearly differ (different last path component)."""
    name = model_name(model)
    if not base_model or not name:
        return
    if base_model.rstrip("/").split("/")[-1] != name.rstrip("/").split("/")[-1]:
        warnings.warn(
            f"the SAE was trained on base_model={base_model!r} but is attached to a model loaded from {name!r}. "
            "Its features may mean nothing here; attach it to the model it was trained on.",
            UserWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------- capturing activations
class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every requested activation has been read."""


@torch.no_grad()
def capture_activations(model: nn.Module, sites: Sequence[Site], **model_inputs: Any) -> dict[tuple[int, str], Tensor]:
    """Run ``model(**model_inputs)`` up to the deepest requested site and return the activations there.

    Returns ``{(layer, name): Tensor (B, T, width)}``. The forward stops as soon as the last site has been read, so
    later layers and the LM head never run (sites.md: ~3x faster than a full forward for an early layer).
    """
    captured: dict[tuple[int, str], Tensor] = {}
    wanted = {site.key for site in sites}

    def recorder(site: Site) -> ActivationFn:
        def record(activation: Tensor) -> None:
            captured[site.key] = activation.detach()
            if wanted.issubset(captured):
                raise _StopForward

        return record

    handles = [site.register(recorder(site)) for site in sites]
    try:
        model(**model_inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(wanted - set(captured))
    if missing:
        raise SiteError(f"the forward pass never reached site(s) {missing}; check the model and the inputs.")
    return captured

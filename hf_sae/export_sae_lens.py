"""hf-sae -> SAELens: write an SAE as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), the layout
``sae_lens.SAE.load_from_disk`` reads and SAEBench, SAEDashboard and Neuronpedia uploads take.

Every export is exact: SAELens' encode/decode of the folder equals hf-sae's ``encode``/``decode`` (checked in the
tests with the real ``sae_lens`` package). What maps to what:

================================ ============================================================================
hf-sae                           SAELens
================================ ============================================================================
TopK (``HierarchicalSAE``,       ``topk`` with ``k`` = the budget chosen (``k=``, default the SAE's k): a
``hierarchical=False`` or not)   HierarchicalTopK SAE at budget k′ is the TopK SAE of its first k′ latents
JumpReLU (``JumpReLUSAE``)       ``jumprelu`` (thresholds as they are; ``apply_b_dec_to_input`` kept)
BatchTopK / Matryoshka           ``jumprelu`` with the one inference threshold θ on every latent, which is how
                                 SAELens itself saves a BatchTopK SAE for inference (Matryoshka's nesting is
                                 its training objective; its forward is BatchTopK's)
KronSAE                          refused: its encoder is not linear (mAND of the Kronecker factors), and
                                 SAELens' SAEs all compute ``x·W_enc + b_enc``
================================ ============================================================================

The parameters are hf-sae's own views (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec``): hf-sae's
TopK subtracts ``b_dec`` before its encoder, which is SAELens' ``apply_b_dec_to_input=True``. ``metadata`` carries
where the SAE reads: ``hook_name`` in TransformerLens' names (resid -> ``blocks.L.hook_resid_post``, mlp ->
``hook_mlp_out``, attn -> ``hook_attn_out``, attn_z -> ``attn.hook_z`` with ``reshape_activations="hook_z"``),
``hf_hook_name`` the transformers module, ``model_name`` the base model's Hub id, and the context length and data set.
Both files are written atomically, ``cfg.json`` last.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._io import staged_files, write_json_atomic
from ._version import __version__
from .errors import SAEConfigError
from .modeling_sae import SAEPreTrainedModel

SAE_LENS_CONFIG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
_HOOKS = {
    "resid": ("blocks.{layer}.hook_resid_post", "model.layers.{layer}"),
    "mlp": ("blocks.{layer}.hook_mlp_out", "model.layers.{layer}.post_feedforward_layernorm"),
    "attn": ("blocks.{layer}.hook_attn_out", "model.layers.{layer}.post_attention_layernorm"),
    "attn_z": ("blocks.{layer}.attn.hook_z", "model.layers.{layer}.self_attn.o_proj"),
}


class SAEExportError(SAEConfigError):
    """An SAE cannot be written in another library's format (its forward has no exact equivalent there)."""


def _class(name: str) -> type | None:
    import hf_sae

    return getattr(hf_sae, name, None)


def _is(sae: SAEPreTrainedModel, *names: str) -> bool:
    return any((cls := _class(name)) is not None and isinstance(sae, cls) for name in names)


def _architecture(sae: SAEPreTrainedModel, k: int | None) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(SAELens architecture, weights, extra cfg fields) of ``sae``; refuses what SAELens cannot compute exactly."""
    config = sae.config
    if _is(sae, "KronSAE"):
        raise SAEExportError(
            f"{type(sae).__name__} cannot be exported to SAELens: its encoder is not linear (the mAND of its "
            "Kronecker factors), while every SAELens SAE computes x·W_enc + b_enc, so no SAELens folder reproduces "
            "its latents."
        )
    with torch.no_grad():
        weights = {
            "W_enc": sae.W_enc.detach().contiguous().clone(),
            "W_dec": sae.W_dec.detach().contiguous().clone(),
            "b_dec": sae.b_dec.detach().clone(),
        }
        if _is(sae, "JumpReLUSAE"):
            if config.k < config.d_sae:
                warnings.warn(
                    f"this JumpReLU SAE caps encode at k={config.k} latents, which SAELens' JumpReLU does not; "
                    "the export keeps every latent above its threshold (the uncapped JumpReLU).",
                    stacklevel=3,
                )
            weights.update(b_enc=sae.b_enc.detach().clone(), threshold=sae.threshold.detach().clone())
            return "jumprelu", weights, {"apply_b_dec_to_input": bool(config.apply_b_dec_to_input)}
        weights["b_enc"] = sae.b_enc.detach().clone()
        if _is(sae, "BatchTopKSAE") and int(sae.threshold_batches) > 0:
            if k is not None:
                raise SAEExportError(
                    f"k={k}: a BatchTopK SAE exports its inference rule (one threshold θ), not a per-token TopK; "
                    "leave k out."
                )
            weights["threshold"] = torch.full_like(weights["b_enc"], float(sae.threshold))
            return "jumprelu", weights, {"apply_b_dec_to_input": True}
        if not _is(sae, "HierarchicalSAE"):
            raise SAEExportError(
                f"{type(sae).__name__} ({config.model_type}) has no SAELens export; hf-sae exports TopK / "
                "HierarchicalTopK, JumpReLU and BatchTopK / Matryoshka SAEs."
            )
        budget = config.k if k is None else k
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= config.k:
            raise SAEExportError(
                f"k={k!r}: the export's TopK budget must be an integer in 1..{config.k} (the SAE's k)."
            )
        extra = {"apply_b_dec_to_input": True, "k": budget, "rescale_acts_by_decoder_norm": False}
        return "topk", weights, extra


def sae_lens_config(sae: SAEPreTrainedModel, architecture: str, extra: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The ``cfg.json`` of the export (SAELens 6.x keys)."""
    config = sae.config
    metadata: dict[str, Any] = {
        "model_name": config.base_model,
        "hook_name": None,
        "hf_hook_name": None,
        "context_size": config.context_length,
        "dataset_path": config.dataset,
        "prepend_bos": True,
        "sae_lens_training_version": None,
        "hf_sae_model_type": config.model_type,
        "hf_sae_version": __version__,
    }
    if config.hook_layer is not None:
        hook_name, module = _HOOKS[config.hook_site]
        metadata.update(
            hook_name=hook_name.format(layer=config.hook_layer), hf_hook_name=module.format(layer=config.hook_layer)
        )
    return {
        "architecture": architecture,
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if config.hook_site == "attn_z" else "none",
        **extra,
        "metadata": metadata,
    }


def to_sae_lens(
    sae: SAEPreTrainedModel, out: str | os.PathLike, *, k: int | None = None, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``sae`` as a SAELens folder in ``out`` (created if missing; other files there are kept).

    Args:
        sae: a TopK / HierarchicalTopK, JumpReLU, BatchTopK or Matryoshka SAE (KronSAE is refused, see the module).
        out: the folder to write ``cfg.json`` and ``sae_weights.safetensors`` into.
        k: TopK budget of the export (default the SAE's k; a HierarchicalTopK SAE is exact at every k′ ≤ k).
        dtype: dtype of the written weights (default: the SAE's).

    Returns the folder. Load it with ``sae_lens.SAE.load_from_disk(out)``.
    """
    config = sae.config
    if not config.activation_scale_folded and config.activation_scale != 1.0:
        raise SAEExportError(
            f"the SAE expects inputs scaled by activation_scale={config.activation_scale:g} (not folded), which a "
            "SAELens folder cannot record; call sae.fold_activation_scale() first."
        )
    architecture, weights, extra = _architecture(sae, k)
    target = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    target = target or weights["W_enc"].dtype
    tensors = {name: tensor.to(target).contiguous() for name, tensor in weights.items()}
    cfg = sae_lens_config(sae, architecture, extra, str(target).removeprefix("torch."))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SAEExportError(f"{out} is a file; pass a folder to write the SAELens SAE into.")
    with staged_files(out, last=(SAE_LENS_CONFIG,)) as staging:
        save_file(tensors, str(staging / SAE_LENS_WEIGHTS))
        write_json_atomic(staging / SAE_LENS_CONFIG, cfg)
    return out

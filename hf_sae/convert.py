"""Converters from other libraries' SAE formats into hf-sae models, with identical outputs.

* :func:`from_gemma_scope` — Gemma Scope ``params.npz`` (``layer_{L}/width_{W}/average_l0_{N}``) ->
  :class:`JumpReLUSAE`.
* :func:`from_sae_lens` — a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``): ``jumprelu`` and
  ``standard`` (ReLU; a JumpReLU with threshold 0) -> :class:`JumpReLUSAE`, ``topk`` -> :class:`HierarchicalSAE`
  with ``hierarchical=False``.
* :func:`from_gemma_scope_2` — a Gemma Scope 2 folder (``config.json`` + ``params.safetensors``, Gemma 3
  ``resid_post`` / ``mlp_out`` / ``attn_out``) -> :class:`JumpReLUSAE` (:mod:`hf_sae.convert_gemma_scope_2`).
* :func:`from_qwen_scope` — a Qwen-Scope ``layer{L}.sae.pt`` (TopK, Qwen3 / Qwen3.5) -> :class:`HierarchicalSAE`
  with ``hierarchical=False`` (:mod:`hf_sae.convert_qwen_scope`).
* :func:`from_sparsify` — an EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``, one per hookpoint)
  -> :class:`HierarchicalSAE` with ``hierarchical=False``.

The way out: :func:`to_sae_lens` writes an hf-sae SAE as a SAELens folder (:mod:`hf_sae.export_sae_lens`).

Each converter takes a local folder or a Hub repo id (downloading only the files it needs) and returns an hf-sae
model; save it with ``save_pretrained`` or push it with ``hf_sae.hub.push_sae``. From the shell:
``hf-sae convert FORMAT SRC OUT``.

Exactness. Every converter keeps the source's arithmetic: ``decode(encode(x))`` equals the source's
reconstruction and the active latents and values are the source's (checked to 1e-5 in the tests against files and
outputs made by SAELens and sparsify themselves). Where hf-sae's parametrisation differs, the conversion is an
exact re-parametrisation: a TopK SAE that does not subtract ``b_dec`` before its encoder gets
``b_enc' = b_enc + b_dec·W_enc``; SAELens' ``rescale_acts_by_decoder_norm`` is folded into unit-norm decoder rows
(``W_enc[:, i]·‖d_i‖``, ``b_enc[i]·‖d_i‖``, ``d_i/‖d_i‖``). Decoder rows that are not unit-norm in the source
(SAELens TopK without rescaling, every JumpReLU) stay raw: renormalising them would change a TopK ranking or
JumpReLU values. Pickled weights are never read: only ``.safetensors`` and ``.npz`` (with ``allow_pickle=False``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

from .convert_sae_lens_batchtopk import (
    BATCHTOPK_FAMILY,
    batchtopk_family_of,
    batchtopk_fields_and_state,
    batchtopk_weight_names,
    jumprelu_training_fields,
)
from .errors import SAEConversionError
from .loading import explain_load_failure
from .modeling_sae import SAEPreTrainedModel
from .registry import resolve_architecture

SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SOURCE_CONFIG = "cfg.json"
GEMMA_SCOPE_PARAMS = "params.npz"


# ------------------------------------------------------------------------------------------------- sources
def _local_folder(source: str | os.PathLike, subfolder: str | None, revision: str | None, files: list[str]) -> Path:
    """A local folder holding ``files``: ``source/subfolder`` on disk, or those files downloaded from the Hub."""
    path = Path(source)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise SAEConversionError(f"{folder}: no such folder (subfolder {subfolder!r} of {path}).")
        return folder
    if path.exists():
        raise SAEConversionError(f"{path} is a file; pass the folder that holds {files}.")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = snapshot_download(str(source), revision=revision, allow_patterns=[prefix + f for f in files])
    except Exception as err:
        better = explain_load_failure(str(source), err, subfolder=subfolder, revision=revision)
        raise (better or SAEConversionError(f"{source}: cannot download {files}: {err}")) from err
    return Path(root) / prefix if prefix else Path(root)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SAEConversionError(f"{path}: missing. The folder does not hold a {path.name} next to its weights.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SAEConversionError(f"{path}: not valid JSON ({err}).") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SAEConversionError(f"{path}: missing; the weights of the SAE are expected in this file.")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise SAEConversionError(
            f"{path}: cannot be read as safetensors ({err}); the file is probably truncated or corrupt. "
            "Download or save it again."
        ) from err


def _take(tensors: dict[str, torch.Tensor], path: Path, names: tuple[str, ...], shapes: dict[str, tuple]) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEConversionError(f"{path}: tensor(s) {missing} missing (found {sorted(tensors)}).")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEConversionError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape} from the config."
            )


def _build(arch: str, fields: dict[str, Any]) -> SAEPreTrainedModel:
    """A fresh SAE of the registered architecture (or preset) ``arch`` whose weights the converter then sets."""
    architecture, preset = resolve_architecture(arch)
    return architecture.model_class(architecture.build_config(preset, **fields))


def _finish(model, tensors: dict[str, torch.Tensor], dtype: torch.dtype | str | None, path: Path):
    """Load exactly these tensors (strict) and cast to ``dtype`` (default: the source's dtype); NaN/inf weights (a
    corrupt payload behind a valid header) are refused, naming ``path``."""
    bad = sorted(name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all()))
    if bad:
        raise SAEConversionError(
            f"{path}: NaN/inf values in {bad}; the file is corrupt (or the source SAE diverged). Download it again."
        )
    source_dtype = next(iter(tensors.values())).dtype
    with torch.no_grad():
        model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    target = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model.to(target or source_dtype)
    model.eval()
    return model


_TRANSFORMER_LENS_HOOKS = {
    "hook_resid_post": (0, "resid"),
    "hook_resid_pre": (-1, "resid"),  # the residual stream entering block L is the one leaving block L-1
    "hook_mlp_out": (0, "mlp"),
    "hook_attn_out": (0, "attn"),
    "hook_z": (0, "attn_z"),
    "attn.hook_z": (0, "attn_z"),
}
_NO_SITE_REASONS = {
    "hook_resid_mid": "the residual stream between the attention and the MLP of block {layer}",
    "hook_mlp_in": "the input of the MLP of block {layer}",
    "ln2.hook_normalized": "the normalised input of the MLP of block {layer}",
    "hook_attn_in": "the input of the attention of block {layer}",
    "ln1.hook_normalized": "the normalised input of the attention of block {layer}",
    "mlp.hook_post": "the MLP's hidden activations (d_mlp wide) of block {layer}",
    "mlp.hook_pre": "the MLP's hidden pre-activations (d_mlp wide) of block {layer}",
}


def hook_site_of(hook_name: str | None) -> tuple[int, str] | str | None:
    """A TransformerLens hook name (SAELens' ``hook_name``) or a transformers module name -> ``(hook_layer,
    hook_site)``; a string saying why it has no hf-sae site; None for no hook name.

    ``blocks.L.hook_resid_post`` -> (L, resid), ``hook_resid_pre`` of L -> (L-1, resid) (of block 0: the embeddings,
    no site), ``hook_mlp_out`` -> mlp, ``hook_attn_out`` -> attn, ``attn.hook_z`` -> attn_z; module names as in
    :func:`from_sparsify` (``model.layers.L`` -> (L, resid)). Everything else (``hook_resid_mid``, the MLP's hidden
    units, ...) reads activations no hf-sae site hooks.
    """
    if not hook_name:
        return None
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if not match:
        layer, site = _sparsify_hook(hook_name)
        return (layer, site) if layer is not None else f"{hook_name!r} is not a TransformerLens hook hf-sae knows"
    layer, hook = int(match.group(1)), match.group(2)
    if hook in _TRANSFORMER_LENS_HOOKS:
        offset, site = _TRANSFORMER_LENS_HOOKS[hook]
        if layer + offset < 0:
            return (
                f"{hook_name!r} reads the embeddings (the residual stream before block 0), which no hf-sae site hooks"
            )
        return layer + offset, site
    reason = _NO_SITE_REASONS.get(hook, "activations no hf-sae site hooks")
    return f"{hook_name!r} reads {reason.format(layer=layer)}"


_LLAMA = re.compile(r"(?:meta-)?llama-(3(?:\.\d)?)-(\d+)b(-instruct)?")
_LLAMA_2 = re.compile(r"llama-2-(\d+)b(-chat)?(?:-hf)?")
_QWEN = re.compile(r"qwen(\d(?:\.\d)?)-([\d.]+)b(-instruct|-chat|-base)?")


def hub_model_id(name: str | None) -> str | None:
    """A TransformerLens model name (what SAELens records as ``model_name``) -> the model's Hugging Face Hub id.

    Mapped: Gemma (``gemma-2-2b`` -> ``google/gemma-2-2b``, ``gemma-3-270m``, ``gemma-2b-it``, ...), Llama 2 / 3.x
    (``Llama-3.1-8B`` -> ``meta-llama/Llama-3.1-8B``, ``Meta-Llama-3-8B``, ``Llama-2-7b`` ->
    ``meta-llama/Llama-2-7b-hf``), Qwen 1.5 / 2 / 2.5 / 3 (``qwen2.5-7b-instruct`` -> ``Qwen/Qwen2.5-7B-Instruct``) and
    Pythia. A name that already is a Hub id (``org/name``) is kept; any other name is returned unchanged (the caller
    warns).
    """
    if not name or "/" in name:
        return name
    lower = name.lower()
    if lower.startswith("gemma-"):
        return f"google/{lower}"
    if lower.startswith("pythia-"):
        return f"EleutherAI/{lower}"
    if match := _LLAMA.fullmatch(lower):
        version, size, instruct = match.groups()
        family = "Meta-Llama-3" if version == "3" else f"Llama-{version}"
        return f"meta-llama/{family}-{size}B" + ("-Instruct" if instruct else "")
    if match := _LLAMA_2.fullmatch(lower):
        size, chat = match.groups()
        return f"meta-llama/Llama-2-{size}b" + ("-chat" if chat else "") + "-hf"
    if match := _QWEN.fullmatch(lower):
        version, size, variant = match.groups()
        return f"Qwen/Qwen{version}-{size}B" + (variant.title() if variant else "")
    return name


def _apply_overrides(fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return fields


# ------------------------------------------------------------------------------------------------ Gemma Scope
_GEMMA_SCOPE_REPO = re.compile(r"gemma-scope-(?P<size>\d+b)-(?P<variant>pt|it)-(?P<site>res|mlp|att)")
_GEMMA_SCOPE_SITES = {"res": "resid", "mlp": "mlp", "att": "attn_z"}


def _parse_gemma_scope(source: str, sae_id: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    match = _GEMMA_SCOPE_REPO.search(str(source).replace("\\", "/"))
    if match:
        size, variant = match.group("size"), match.group("variant")
        fields["base_model"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
        fields["hook_site"] = _GEMMA_SCOPE_SITES[match.group("site")]
    text = f"{source}/{sae_id or ''}"
    if layer := re.findall(r"layer_(\d+)", text):
        fields["hook_layer"] = int(layer[-1])
    return fields


def from_gemma_scope(
    path_or_repo: str | os.PathLike,
    sae_id: str | None = None,
    *,
    revision: str | None = None,
    k: int | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> SAEPreTrainedModel:
    """A Gemma Scope SAE (``params.npz``) as a :class:`JumpReLUSAE`.

    Args:
        path_or_repo: a local folder (a clone of e.g. ``google/gemma-scope-2b-pt-res``, or the SAE's own folder) or
            a Hub repo id.
        sae_id: the SAE inside it, e.g. ``"layer_20/width_16k/average_l0_71"`` (None: ``path_or_repo`` is the folder
            holding ``params.npz``).
        k: cap on active latents ``encode`` returns (default d_sae: exact; see :class:`JumpReLUSAEConfig`).
        dtype: the model's dtype (default float32, the file's).
        config_overrides: config fields to set (``base_model``, ``hook_layer``, ``hook_site``, ``dataset``, ...);
            by default they come from the repo name and path: ``gemma-scope-2b-pt-res`` -> ``google/gemma-2-2b``,
            ``resid`` (``mlp`` -> ``mlp``, ``att`` -> ``attn_z``), ``layer_20`` -> 20.

    Gemma Scope's encoder: pre = x·W_enc + b_enc (no b_dec subtraction), acts = ReLU(pre)·1[pre > threshold];
    decoder x̂ = acts·W_dec + b_dec (Lieberum et al. 2024, and the release's tutorial code).
    """
    folder = _local_folder(path_or_repo, sae_id, revision, [GEMMA_SCOPE_PARAMS])
    path = folder / GEMMA_SCOPE_PARAMS
    if not path.is_file():
        raise SAEConversionError(f"{path}: missing; a Gemma Scope SAE folder holds params.npz.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name]) for name in npz.files}
    except Exception as err:  # zipfile / numpy errors for truncated or corrupt files
        raise SAEConversionError(
            f"{path}: cannot be read as .npz ({err}); truncated or corrupt? Download it again."
        ) from err
    names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    tensors = {name: torch.from_numpy(arrays[name].copy()) for name in names if name in arrays}
    if "W_enc" not in tensors:
        raise SAEConversionError(f"{path}: no W_enc array (found {sorted(arrays)}); not a Gemma Scope params.npz.")
    d_in, d_sae = tensors["W_enc"].shape
    _take(tensors, path, names, {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)})
    width = re.findall(r"width_(\d+)k", f"{path_or_repo}/{sae_id or ''}")
    if width and int(width[-1]) * 1024 != d_sae:
        warnings.warn(
            f"{path}: the path says width_{width[-1]}k but W_enc has {d_sae} latents; using {d_sae}.", stacklevel=2
        )
    source = f"{path_or_repo}" + (f"/{sae_id}" if sae_id else "")
    fields = _apply_overrides(
        {
            "d_in": d_in,
            "d_sae": d_sae,
            "k": k or d_sae,
            "apply_b_dec_to_input": False,
            "source_format": "gemma-scope",
            "source": source,
            **_parse_gemma_scope(str(path_or_repo), sae_id),
        },
        config_overrides,
    )
    return _finish(_build("jumprelu_sae", fields), tensors, dtype, path)


# ---------------------------------------------------------------------------------------------------- SAELens
_SAE_LENS_ARCHITECTURES = ("standard", "jumprelu", "topk", *BATCHTOPK_FAMILY)


def _sae_lens_architecture(cfg: dict[str, Any]) -> tuple[str, int | None]:
    """(architecture, k) of a SAELens cfg.json, pre-6.0 configs included (``activation_fn_str`` / kwargs)."""
    architecture = cfg.get("architecture")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture is None:
        architecture = "topk" if activation == "topk" and k is not None else "standard"
        if activation not in (None, "relu", "topk"):
            raise SAEConversionError(f"activation_fn={activation!r} is not supported (relu, topk are).")
    return architecture, k


def _sae_lens_site(metadata: dict[str, Any], cfg_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """hook_layer / hook_site from SAELens' hook name; a hook without an hf-sae site is refused unless the caller
    names the site (``hook_layer=`` and ``hook_site=``), and a missing hook name leaves hook_layer None (warned)."""
    hook_name = metadata.get("hook_name") or metadata.get("hook_point")
    found = hook_site_of(hook_name)
    if isinstance(found, tuple):
        return {"hook_layer": found[0], "hook_site": found[1]}
    if "hook_layer" in overrides and "hook_site" in overrides:
        return {}
    if found is None:
        warnings.warn(
            f"{cfg_path}: no hook_name, so the layer and site this SAE reads are unknown; the config gets "
            "hook_layer=None. Pass hook_layer= and hook_site= to record them.",
            stacklevel=3,
        )
        return {}
    raise SAEConversionError(
        f"{cfg_path}: hook {found}; hf-sae's sites are resid (after a layer), mlp, attn and attn_z, so attaching "
        "or steering this SAE would read the wrong activations. Pass hook_layer= and hook_site= (CLI: --hook-layer, "
        "--hook-site) to convert it anyway, recording the site you will use it at."
    )


def from_sae_lens(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    k: int | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> SAEPreTrainedModel:
    """A SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``) as an hf-sae model.

    * ``jumprelu`` -> :class:`JumpReLUSAE` (``apply_b_dec_to_input`` kept); ``standard`` (ReLU) -> JumpReLUSAE with
      threshold 0 (ReLU(pre)·1[pre > 0] = ReLU(pre)); ``k`` caps ``encode`` (default d_sae: exact).
    * ``topk`` -> :class:`HierarchicalSAE` (``hierarchical=False``, the SAE's k); ``rescale_acts_by_decoder_norm``
      and ``apply_b_dec_to_input=False`` are folded exactly (module docstring).
    * ``normalize_activations`` ``"none"`` or ``"expected_average_only_in"`` (whose scale SAELens folds into the
      weights before saving: it is the identity at inference) are supported; per-token normalisations
      (``constant_norm_rescale``, ``layer_norm``) and ``covariance_whitening`` cannot be expressed and are refused.
    * ``batchtopk`` / ``matryoshka_batchtopk`` (training checkpoints, and the ``jumprelu`` inference folders SAELens
      publishes for them: one threshold, ``metadata.training_architecture``) -> :class:`BatchTopKSAE` /
      :class:`MatryoshkaSAE` with that threshold (:mod:`hf_sae.convert_sae_lens_batchtopk`); a JumpReLU training
      checkpoint keeps its recipe (bandwidth, λ, warm-up) in the config.
    * gated, matching pursuit and other architectures are refused with a message.

    ``path`` is a local folder or a Hub repo id (with ``subfolder`` the SAE's folder inside it). Metadata
    (``model_name``, ``hook_name``, ``context_size``, ``dataset_path``) fills ``base_model``, ``hook_layer``,
    ``hook_site``, ``context_length`` and ``dataset``; ``config_overrides`` win.
    """
    folder = _local_folder(path, subfolder, revision, [SOURCE_CONFIG, SAE_LENS_WEIGHTS])
    cfg_path, weights_path = folder / SOURCE_CONFIG, folder / SAE_LENS_WEIGHTS
    cfg = _read_json(cfg_path)
    architecture, source_k = _sae_lens_architecture(cfg)
    if architecture not in _SAE_LENS_ARCHITECTURES:
        raise SAEConversionError(
            f"{cfg_path}: architecture {architecture!r} is not supported; hf-sae converts "
            f"{list(_SAE_LENS_ARCHITECTURES)}."
        )
    normalization = cfg.get("normalize_activations") or "none"
    if normalization not in ("none", "expected_average_only_in"):
        raise SAEConversionError(
            f"{cfg_path}: normalize_activations={normalization!r} rescales each input at run time, which an hf-sae "
            "SAE (raw activations in, raw out) cannot express. Fold or remove it with SAELens first."
        )
    if cfg.get("reshape_activations") not in (None, "none", "hook_z"):
        raise SAEConversionError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported.")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise SAEConversionError(f"{cfg_path}: missing or non-integer {key!r} ({cfg.get(key)!r}).")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    tensors = _read_safetensors(weights_path)
    family = batchtopk_family_of(cfg, tensors)
    if family is not None:
        names = batchtopk_weight_names(cfg)
    else:
        names = ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
    _take(
        tensors,
        weights_path,
        names,
        {
            "W_enc": (d_in, d_sae),
            "W_dec": (d_sae, d_in),
            "b_enc": (d_sae,),
            "b_dec": (d_in,),
            **({"threshold": (d_sae,)} if "threshold" in names else {}),
            **({"topk_threshold": ()} if "topk_threshold" in names else {}),
        },
    )
    unexpected = sorted(set(tensors) - set(names))
    if unexpected:
        raise SAEConversionError(f"{weights_path}: unexpected tensor(s) {unexpected} for a {architecture} SAE.")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    metadata = {**cfg, **(cfg.get("metadata") or {})}
    source = str(path) + (f"/{subfolder}" if subfolder else "")
    fields: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "source_format": "sae-lens", "source": source}
    fields.update(_sae_lens_site(metadata, cfg_path, config_overrides))
    base_model = hub_model_id(metadata.get("model_name"))
    if base_model is not None and "/" not in base_model and "base_model" not in config_overrides:
        warnings.warn(
            f"{cfg_path}: model_name {base_model!r} is a TransformerLens name hf-sae cannot map to a Hub id; the "
            "config keeps it as base_model. Pass base_model='org/name' to record the model's Hub id.",
            stacklevel=2,
        )
    for key, value in (
        ("base_model", base_model),
        ("context_length", metadata.get("context_size")),
        ("dataset", metadata.get("dataset_path")),
    ):
        if value is not None:
            fields[key] = value
    weights = {name: tensors[name].to(torch.float64) for name in names}
    source_dtype = tensors["W_enc"].dtype
    if family is not None:
        name, extra, state = batchtopk_fields_and_state(family, cfg, weights, str(cfg_path))
        model = _build(name, _apply_overrides({**fields, **extra}, config_overrides))
    elif architecture == "topk":
        if not isinstance(source_k, int) or not 1 <= source_k <= d_sae:
            raise SAEConversionError(f"{cfg_path}: a topk SAE needs an integer k in 1..d_sae, got {source_k!r}.")
        W_enc, b_enc, W_dec = weights["W_enc"], weights["b_enc"], weights["W_dec"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        if not apply_b_dec:
            b_enc = b_enc + weights["b_dec"] @ W_enc
        topk = {**fields, "k": source_k, "hierarchical": False, "auxk": False}
        model = _build("topk", _apply_overrides(topk, config_overrides))
        state = {
            "encoder.weight": W_enc.t().contiguous(),
            "encoder.bias": b_enc,
            "W_dec": W_dec,
            "b_dec": weights["b_dec"],
        }
    else:
        model = _build(
            "jumprelu_sae",
            _apply_overrides(
                {**fields, **jumprelu_training_fields(cfg), "k": k or d_sae, "apply_b_dec_to_input": apply_b_dec},
                config_overrides,
            ),
        )
        threshold = weights.get("threshold", torch.zeros(d_sae, dtype=torch.float64))
        state = {
            "W_enc": weights["W_enc"],
            "b_enc": weights["b_enc"],
            "threshold": threshold,
            "W_dec": weights["W_dec"],
            "b_dec": weights["b_dec"],
        }
    return _finish(model, {name: t.to(source_dtype) for name, t in state.items()}, dtype, weights_path)


# --------------------------------------------------------------------------------------------------- sparsify
def _sparsify_hook(hookpoint: str | None) -> tuple[int | None, str | None]:
    """sparsify hookpoints (module names) -> (hook_layer, hook_site); only exact site matches are mapped."""
    if not hookpoint:
        return None, None
    match = re.search(r"layers\.(\d+)(?:\.(.+))?$", hookpoint)
    if not match:
        return None, None
    layer, rest = int(match.group(1)), match.group(2)
    sites = {None: "resid", "post_feedforward_layernorm": "mlp", "post_attention_layernorm": "attn"}
    return (layer, sites[rest]) if rest in sites else (None, None)


def from_sparsify(
    path: str | os.PathLike,
    hookpoint: str | None = None,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> SAEPreTrainedModel:
    """An EleutherAI sparsify SAE (``cfg.json`` + ``sae.safetensors``) as a :class:`HierarchicalSAE` (TopK).

    ``path`` is the hookpoint's folder, or a run folder / Hub repo with ``hookpoint`` (e.g. ``"layers.12"``) naming
    the subfolder. sparsify's parameters are hf-sae's (``encoder.weight`` (d_sae, d_in), ``encoder.bias``,
    ``W_dec``, ``b_dec``; b_dec subtracted before the encoder; ReLU then TopK), so the weights are copied as they are.
    Supported: ``activation="topk"``, no ``skip_connection``, not a transcoder. The hookpoint ``layers.N`` maps to
    ``hook_layer=N, hook_site="resid"``; other module names leave the site to ``config_overrides``.
    """
    folder = _local_folder(path, hookpoint, revision, [SOURCE_CONFIG, SPARSIFY_WEIGHTS])
    cfg_path, weights_path = folder / SOURCE_CONFIG, folder / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise SAEConversionError(f"{cfg_path}: activation={cfg['activation']!r} is not supported (only topk).")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise SAEConversionError(
                f"{cfg_path}: {flag}=true: this is not a plain SAE (it predicts another module's output or adds a "
                "linear skip), which hf-sae does not represent."
            )
    tensors = _read_safetensors(weights_path)
    if "encoder.weight" not in tensors:
        raise SAEConversionError(f"{weights_path}: no encoder.weight (found {sorted(tensors)}); not a sparsify SAE.")
    d_sae, d_in = tensors["encoder.weight"].shape
    if cfg.get("d_in") not in (None, d_in):
        raise SAEConversionError(f"{cfg_path}: d_in={cfg['d_in']} but encoder.weight has d_in={d_in}.")
    if cfg.get("num_latents") not in (None, 0, d_sae):
        raise SAEConversionError(f"{cfg_path}: num_latents={cfg['num_latents']} but encoder.weight has {d_sae} rows.")
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    _take(tensors, weights_path, names, {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)})
    unexpected = sorted(set(tensors) - set(names))
    if unexpected:
        raise SAEConversionError(f"{weights_path}: unexpected tensor(s) {unexpected} (skip connection?).")
    k = cfg.get("k")
    if not isinstance(k, int) or not 1 <= k <= d_sae:
        raise SAEConversionError(f"{cfg_path}: k must be an integer in 1..{d_sae}, got {k!r}.")
    hook_layer, hook_site = _sparsify_hook(hookpoint or Path(folder).name)
    source = str(path) + (f"/{hookpoint}" if hookpoint else "")
    fields: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "hierarchical": False,
        "auxk": False,
        "source_format": "sparsify",
        "source": source,
    }
    if hook_layer is not None:
        fields.update(hook_layer=hook_layer, hook_site=hook_site)
    elif "hook_layer" not in config_overrides:
        warnings.warn(
            f"{folder}: hookpoint {hookpoint or Path(folder).name!r} has no exact hf-sae site (resid = 'layers.N'); "
            "the config gets hook_layer=None. Pass hook_layer= and hook_site= to record where the SAE reads.",
            stacklevel=2,
        )
    model = _build("topk", _apply_overrides(fields, config_overrides))
    return _finish(model, {name: tensors[name] for name in names}, dtype, weights_path)


# ------------------------------------------------------------------------ converters in modules of their own
from .convert_gemma_scope_2 import from_gemma_scope_2  # noqa: E402  (they use the helpers above)
from .convert_qwen_scope import from_qwen_scope  # noqa: E402
from .export_sae_lens import to_sae_lens  # noqa: E402, F401  (the way out: hf-sae -> SAELens)

# ------------------------------------------------------------------------------------------------- the CLI's
FORMATS = {
    "gemma-scope": from_gemma_scope,
    "gemma-scope-2": from_gemma_scope_2,
    "qwen-scope": from_qwen_scope,
    "sae-lens": from_sae_lens,
    "sparsify": from_sparsify,
}


def convert(format: str, source: str | os.PathLike, **kwargs: Any):
    """``FORMATS[format](source, **kwargs)`` with a clear error for an unknown format."""
    if format not in FORMATS:
        raise SAEConversionError(f"unknown format {format!r}; use one of {list(FORMATS)}.")
    return FORMATS[format](source, **kwargs)

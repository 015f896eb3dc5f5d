"""Gemma Scope 2 (Google DeepMind's SAEs on every layer of Gemma 3, 270M to 27B) -> :class:`JumpReLUSAE`.

The release, as published (``google/gemma-scope-2-{size}-{pt|it}``, one repo per model):

* one folder per SAE, ``{kind}/layer_{L}_width_{W}_l0_{size}`` (``kind``: ``resid_post``, ``mlp_out``,
  ``attn_out``, their ``*_all`` every-layer sets, and ``transcoder`` / ``clt`` / ``crosscoder``), holding
  ``params.safetensors`` and (in most folders) ``config.json``;
* ``params.safetensors``: ``w_enc (d_in, d_sae)``, ``w_dec (d_sae, d_in)``, ``b_enc``, ``b_dec``, ``threshold``;
* ``config.json``: ``architecture`` (``"jump_relu"``), ``hf_hook_point_in`` / ``hf_hook_point_out`` (transformers
  module paths, ``model.layers.L.output``), ``model_name``, ``width``, ``l0``, ``affine_connection``, ``type``;
* the JumpReLU SAE of Gemma Scope 1: pre = x·W_enc + b_enc (no ``b_dec`` subtracted),
  acts = ReLU(pre)·1[pre > threshold], x̂ = acts·W_dec + b_dec (Lieberum et al. 2024; Rajamanoharan et al. 2024).

The config's hook point names the site: ``model.layers.L.output`` -> (L, ``resid``),
``model.layers.L.post_feedforward_layernorm.output`` (``mlp_out``) -> (L, ``mlp``),
``model.layers.L.self_attn.o_proj.input`` (``attn_out``: the heads' outputs before ``o_proj``) -> (L, ``attn_z``),
``model.layers.L.post_attention_layernorm.output`` -> (L, ``attn``); a folder without a config.json gets the hook point
its kind implies (as SAELens infers it). Transcoders (and cross-layer transcoders, crosscoders) read one site and
write another, which an hf-sae SAE (it reconstructs its own input) does not represent: they are refused.

Matryoshka. Gemma Scope 2's SAEs were trained with a Matryoshka objective (nested dictionary prefixes), but what is
published is a JumpReLU SAE with a threshold per latent: the nesting is a property of the training, not of the
forward pass. :class:`~hf_sae.MatryoshkaSAE` is a BatchTopK SAE (one selection rule for all latents), which cannot
hold per-latent thresholds exactly, so these SAEs load as JumpReLU SAEs with the published inference.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .convert import _apply_overrides, _build, _finish, _local_folder, _read_json, _read_safetensors, _take
from .errors import SAEConversionError
from .modeling_sae import SAEPreTrainedModel

GEMMA_SCOPE_2_PARAMS = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
_NAMES = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
_HOOK_POINT = re.compile(r"(?:.*\.)?layers\.(?P<layer>\d+)(?:\.(?P<module>.+?))?\.(?P<end>output|input)")
_SITES = {
    (None, "output"): "resid",
    ("post_feedforward_layernorm", "output"): "mlp",
    ("post_attention_layernorm", "output"): "attn",
    ("self_attn.o_proj", "input"): "attn_z",
}
_KIND_HOOKS = {
    "resid_post": "model.layers.{layer}.output",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
    "attn_out": "model.layers.{layer}.self_attn.o_proj.input",
}
_TRANSCODER = re.compile(r"transcoder|(?:^|[/_])clt(?:$|[/_])|crosscoder")
_REPO = re.compile(r"gemma-scope-2-(?P<size>\d+(?:\.\d+)?[mb])-(?P<variant>pt|it)")


def hook_point_site(hook_point: str) -> tuple[int, str] | None:
    """A Gemma Scope 2 ``hf_hook_point_in`` -> ``(hook_layer, hook_site)``; None for a module no hf-sae site reads
    (e.g. ``pre_feedforward_layernorm.output``, a transcoder's input)."""
    match = _HOOK_POINT.fullmatch(hook_point or "")
    if not match:
        return None
    site = _SITES.get((match.group("module"), match.group("end")))
    return (int(match.group("layer")), site) if site else None


def gemma_3_model_id(repo_or_name: str) -> str | None:
    """The Gemma 3 model's Hub id from a Gemma Scope 2 repo name (``google/gemma-scope-2-1b-pt`` ->
    ``google/gemma-3-1b-pt``) or a config's ``model_name`` (``gemma-v3-1b-pt`` -> the same); the 270M base model's Hub
    id has no ``-pt`` (``google/gemma-3-270m``). None when the name says neither."""
    name = str(repo_or_name).replace("\\", "/").lower().replace("gemma-v3-", "gemma-3-")
    match = _REPO.search(name) or re.search(r"gemma-3-(?P<size>\d+(?:\.\d+)?[mb])-(?P<variant>pt|it)", name)
    if not match:
        return None
    size, variant = match.group("size"), match.group("variant")
    return f"google/gemma-3-{size}" + ("" if (size, variant) == ("270m", "pt") else f"-{variant}")


def _published_config(folder: Path, sae_path: str) -> dict[str, Any]:
    """config.json of the SAE's folder, else the hook point its kind (``resid_post``, ...) implies."""
    path = folder / GEMMA_SCOPE_2_CONFIG
    if path.is_file():
        return _read_json(path)
    kind = next((k for k in _KIND_HOOKS if re.search(rf"(?:^|/){k}(?:_all)?/", sae_path + "/")), None)
    layer = re.findall(r"layer_(\d+)", sae_path)
    if kind is None or not layer:
        raise SAEConversionError(
            f"{folder}: no config.json, and the path does not say the SAE's kind and layer "
            f"(expected e.g. resid_post/layer_12_width_16k_l0_small; kinds {list(_KIND_HOOKS)}). Pass the SAE's "
            "folder inside a Gemma Scope 2 repo."
        )
    return {"architecture": "jump_relu", "hf_hook_point_in": _KIND_HOOKS[kind].format(layer=int(layer[-1]))}


def _refuse_transcoder(cfg: dict[str, Any], where: str) -> None:
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    named = _TRANSCODER.search(where) or "transcoder" in str(cfg.get("type") or "")
    if named or cfg.get("affine_connection") or hook_out not in (None, hook_in):
        raise SAEConversionError(
            f"{where}: a transcoder (reads {hook_in!r}, writes {hook_out!r}); hf-sae's SAEs reconstruct the "
            "activation they read, so a transcoder (or cross-layer transcoder, crosscoder) cannot be converted. "
            "Pick an SAE folder: resid_post/, mlp_out/ or attn_out/."
        )


def from_gemma_scope_2(
    path_or_repo: str | os.PathLike,
    sae_id: str | None = None,
    *,
    revision: str | None = None,
    k: int | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> SAEPreTrainedModel:
    """A Gemma Scope 2 SAE (``params.safetensors`` + ``config.json``) as a :class:`JumpReLUSAE`.

    Args:
        path_or_repo: a Hub repo id (``"google/gemma-scope-2-270m-pt"``; only the SAE's two files are downloaded),
            a local clone of one, or the SAE's own folder.
        sae_id: the SAE's folder inside it, e.g. ``"resid_post/layer_12_width_16k_l0_small"`` (None:
            ``path_or_repo`` is that folder).
        k: cap on active latents ``encode`` returns (default d_sae: exact; see :class:`JumpReLUSAEConfig`).
        dtype: the model's dtype (default: the file's).
        config_overrides: config fields to set; by default ``hook_layer`` / ``hook_site`` come from the config's
            ``hf_hook_point_in`` and ``base_model`` from its ``model_name`` (else the repo name:
            ``gemma-scope-2-1b-pt`` -> ``google/gemma-3-1b-pt``).
    """
    where = f"{path_or_repo}" + (f"/{sae_id.strip('/')}" if sae_id else "")
    if _TRANSCODER.search(str(sae_id or "")):
        _refuse_transcoder({}, where)  # before downloading anything
    folder = _local_folder(path_or_repo, sae_id, revision, [GEMMA_SCOPE_2_CONFIG, GEMMA_SCOPE_2_PARAMS])
    cfg = _published_config(folder, where.replace("\\", "/"))
    _refuse_transcoder(cfg, where)
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise SAEConversionError(
            f"{where}: architecture {cfg['architecture']!r}; hf-sae converts Gemma Scope 2's 'jump_relu' SAEs."
        )
    hook_point = cfg.get("hf_hook_point_in")
    found = hook_point_site(hook_point)
    if found is None and not {"hook_layer", "hook_site"} <= set(config_overrides):
        raise SAEConversionError(
            f"{where}: hook point {hook_point!r} is not a site hf-sae hooks (resid = model.layers.L.output, mlp = "
            "...post_feedforward_layernorm.output, attn_z = ...self_attn.o_proj.input). Pass hook_layer= and "
            "hook_site= (CLI: --hook-layer, --hook-site) to convert it anyway."
        )
    path = folder / GEMMA_SCOPE_2_PARAMS
    raw = _read_safetensors(path)
    missing = sorted(set(_NAMES) - set(raw))
    if missing:
        raise SAEConversionError(f"{path}: tensor(s) {missing} missing (found {sorted(raw)}); not a Gemma Scope 2 SAE.")
    unexpected = sorted(set(raw) - set(_NAMES))
    if unexpected:
        raise SAEConversionError(f"{path}: unexpected tensor(s) {unexpected} (a transcoder's skip connection?).")
    tensors = {_NAMES[name]: tensor for name, tensor in raw.items()}
    d_in, d_sae = tensors["W_enc"].shape
    _take(tensors, path, tuple(_NAMES.values()), {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)})
    _take(tensors, path, ("threshold",), {"threshold": (d_sae,)})
    if cfg.get("width") not in (None, d_sae):
        warnings.warn(f"{where}: config.json says width {cfg['width']} but w_enc has {d_sae} latents.", stacklevel=2)
    base_model = gemma_3_model_id(str(cfg.get("model_name") or "")) or gemma_3_model_id(str(path_or_repo))
    base_model = base_model or cfg.get("model_name")
    fields: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k or d_sae,
        "apply_b_dec_to_input": False,
        "source_format": "gemma-scope-2",
        "source": where,
    }
    if found is not None:
        fields.update(hook_layer=found[0], hook_site=found[1])
    if base_model:
        fields["base_model"] = str(base_model)
    model = _build("jumprelu_sae", _apply_overrides(fields, config_overrides))
    order = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
    return _finish(model, {name: tensors[name] for name in order}, dtype, path)

"""Qwen-Scope (Qwen's TopK SAEs on the residual stream of Qwen3 / Qwen3.5) -> :class:`HierarchicalSAE` (TopK).

The release, as published (``Qwen/SAE-Res-{model}-W{N}K-L0_{K}``, one repo per model, width and k):

* one file per decoder layer, ``layer{L}.sae.pt``, at the repo's root: a plain dict of four tensors,
  ``W_enc (d_sae, d_in)``, ``W_dec (d_in, d_sae)``, ``b_enc (d_sae,)``, ``b_dec (d_in,)``;
* TopK with k ∈ {50, 100} (the repo name's ``L0_{K}``), width ``N·1024`` (``W{N}K``), read at the output of decoder
  layer L (``model.layers.L``, the residual stream: hf-sae's ``resid``);
* encoder ``z = TopK(ReLU(W_enc·x + b_enc))`` with no ``b_dec`` subtracted first, decoder ``x̂ = W_dec·z + b_dec``
  (the model card's extraction code; SAELens reads it the same way: ``topk``, ``apply_b_dec_to_input=False``).

hf-sae's TopK subtracts ``b_dec`` before its encoder, so the conversion sets ``b_enc' = b_enc + W_enc·b_dec``
(exact: ``W_enc(x − b_dec) + b_enc' = W_enc·x + b_enc``). ``W_enc`` is already hf-sae's ``encoder.weight``
(d_sae, d_in); ``W_dec`` is transposed to hf-sae's (d_sae, d_in) rows, kept at their published norms (renormalising
would change the reconstruction). The ``.pt`` files are read with ``torch.load(..., weights_only=True)`` only: a file
that needs pickle to load is refused, never unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .convert import _apply_overrides, _build, _finish, _local_folder, _take
from .errors import SAEConversionError
from .modeling_sae import SAEPreTrainedModel

QWEN_SCOPE_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")
_REPO = re.compile(r"SAE-Res-(?P<model>.+?)-W(?P<width>\d+)K-L0_(?P<k>\d+)")
_LAYER_FILE = re.compile(r"layer(\d+)\.sae\.pt")


def parse_qwen_scope_name(name: str) -> dict[str, Any]:
    """``.../SAE-Res-Qwen3-1.7B-Base-W32K-L0_50`` -> ``{"base_model": "Qwen/Qwen3-1.7B-Base", "width": 32768,
    "k": 50}`` (empty when the name is not a Qwen-Scope repo's)."""
    match = _REPO.search(str(name).replace("\\", "/"))
    if not match:
        return {}
    return {
        "base_model": f"Qwen/{match.group('model')}",
        "width": int(match.group("width")) * 1024,
        "k": int(match.group("k")),
    }


def _layer_file(sae_id: str | int | None, source: str) -> str:
    """``layer12`` / ``12`` / ``layer12.sae.pt`` -> ``layer12.sae.pt``."""
    if sae_id is None:
        raise SAEConversionError(
            f"{source}: name the layer's SAE (sae_id='layer12' or 'layer12.sae.pt'); a Qwen-Scope repo holds one "
            "layer{L}.sae.pt per decoder layer."
        )
    text = str(sae_id).strip("/")
    if re.fullmatch(r"\d+", text):
        return f"layer{text}.sae.pt"
    if re.fullmatch(r"layer\d+", text):
        return f"{text}.sae.pt"
    if _LAYER_FILE.fullmatch(text):
        return text
    raise SAEConversionError(f"sae_id={sae_id!r} is not a Qwen-Scope layer; use 'layer12' or 'layer12.sae.pt'.")


def read_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``-d dict of tensors, loaded with ``weights_only=True`` (memory-mapped); anything that needs
    pickle to load (code objects, custom classes) is refused with the reason."""
    if not path.is_file():
        raise SAEConversionError(f"{path}: missing; a Qwen-Scope SAE is a layer{{L}}.sae.pt file.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SAEConversionError(
            f"{path}: refused: this file needs pickle to load (torch.load(weights_only=True) says: {first}), and "
            "hf-sae never unpickles downloaded files (pickle runs arbitrary code). Convert it to safetensors in a "
            "trusted environment first."
        ) from None
    except Exception as err:  # truncated zip, not a torch file at all
        raise SAEConversionError(
            f"{path}: cannot be read as a torch.save file ({err}); truncated or corrupt? Download it again."
        ) from err
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise SAEConversionError(
            f"{path}: expected a dict of tensors {list(QWEN_SCOPE_NAMES)}, got {type(loaded).__name__}"
            + (f" with keys {sorted(map(str, loaded))}" if isinstance(loaded, dict) else "")
            + "."
        )
    return loaded


def from_qwen_scope(
    path_or_repo: str | os.PathLike,
    sae_id: str | int | None = None,
    *,
    revision: str | None = None,
    k: int | None = None,
    dtype: torch.dtype | str | None = None,
    **config_overrides: Any,
) -> SAEPreTrainedModel:
    """A Qwen-Scope SAE (``layer{L}.sae.pt``) as a TopK :class:`HierarchicalSAE` (``hierarchical=False``).

    Args:
        path_or_repo: a Hub repo id (``"Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"``; only the one file is
            downloaded), a local clone of one, or the ``layer{L}.sae.pt`` file itself.
        sae_id: the layer's SAE in the repo: ``"layer12"``, ``12`` or ``"layer12.sae.pt"`` (None when
            ``path_or_repo`` is the file).
        k: the TopK k (default: the repo name's ``L0_{K}``; required when the name does not say).
        dtype: the model's dtype (default: the file's).
        config_overrides: config fields to set (``base_model``, ``hook_layer``, ...); by default the base model is
            the repo name's (``SAE-Res-Qwen3-8B-Base-...`` -> ``Qwen/Qwen3-8B-Base``), the site ``resid`` at the
            file's layer.
    """
    source = Path(path_or_repo)
    if source.is_file():
        path, name = source, str(source)
    else:
        filename = _layer_file(sae_id, str(path_or_repo))
        path = _local_folder(path_or_repo, None, revision, [filename]) / filename
        name = f"{path_or_repo}/{filename}"
    tensors = read_weights_only(path)
    if "W_enc" not in tensors:
        raise SAEConversionError(f"{path}: no W_enc tensor (found {sorted(tensors)}); not a Qwen-Scope SAE.")
    d_sae, d_in = tensors["W_enc"].shape
    _take(tensors, path, QWEN_SCOPE_NAMES, {"W_dec": (d_in, d_sae), "b_enc": (d_sae,), "b_dec": (d_in,)})
    unexpected = sorted(set(tensors) - set(QWEN_SCOPE_NAMES))
    if unexpected:
        raise SAEConversionError(f"{path}: unexpected tensor(s) {unexpected} for a Qwen-Scope TopK SAE.")
    published = parse_qwen_scope_name(str(path_or_repo))
    if published and published["width"] != d_sae:
        warnings.warn(
            f"{path}: the repo name says width {published['width']} but W_enc has {d_sae} latents; using {d_sae}.",
            stacklevel=2,
        )
    k = k or published.get("k")
    if not isinstance(k, int) or not 1 <= k <= d_sae:
        raise SAEConversionError(
            f"{name}: the TopK k is {k!r}; pass k= (an integer in 1..{d_sae}: Qwen-Scope publishes 50 and 100, named "
            "in the repo as L0_50 / L0_100)."
        )
    layer = int(_LAYER_FILE.search(path.name).group(1)) if _LAYER_FILE.search(path.name) else None
    fields: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "hierarchical": False,
        "auxk": False,
        "hook_site": "resid",
        "source_format": "qwen-scope",
        "source": name,
    }
    if layer is not None:
        fields["hook_layer"] = layer
    if "base_model" in published:
        fields["base_model"] = published["base_model"]
    model = _build("topk", _apply_overrides(fields, config_overrides))
    source_dtype = tensors["W_enc"].dtype
    W_enc, W_dec, b_enc, b_dec = (tensors[name].to(torch.float64) for name in QWEN_SCOPE_NAMES)
    state = {
        "encoder.weight": W_enc,
        "encoder.bias": b_enc + W_enc @ b_dec,  # hf-sae subtracts b_dec before the encoder; Qwen-Scope does not
        "W_dec": W_dec.t().contiguous(),
        "b_dec": b_dec,
    }
    return _finish(model, {n: t.to(source_dtype) for n, t in state.items()}, dtype, path)

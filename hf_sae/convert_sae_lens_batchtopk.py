"""SAELens BatchTopK, Matryoshka BatchTopK and JumpReLU training folders -> hf-sae's trainable classes.

:func:`hf_sae.convert.from_sae_lens` calls these for the folders SAELens writes for those architectures:

* a training checkpoint (``save_model``: ``architecture`` ``batchtopk`` / ``matryoshka_batchtopk``, weights with the
  scalar ``topk_threshold``) and the inference folder SAELens publishes for them (``save_inference_model``: a
  ``jumprelu`` cfg whose ``metadata.training_architecture`` names the recipe, one threshold repeated per latent)
  -> :class:`~hf_sae.BatchTopKSAE` / :class:`~hf_sae.MatryoshkaSAE` with θ = that threshold, k from the training
  details, the Matryoshka group sizes from ``matryoshka_widths``;
* a JumpReLU training checkpoint -> :class:`~hf_sae.JumpReLUSAE` that also records the recipe's bandwidth, λ, its
  warm-up and the initial threshold (``bandwidth``, ``l0_coefficient``, ``l0_warmup_steps``, ``initial_threshold``).

Exactness: ``rescale_acts_by_decoder_norm`` of a training checkpoint is folded into unit decoder rows as for TopK
(the threshold is in the rescaled units, so it stays); ``apply_b_dec_to_input=False`` becomes
b_enc' = b_enc + b_dec·W_enc (hf-sae's BatchTopK encoder subtracts b_dec). The inference folder's weights are already
folded by SAELens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import SAEConversionError

BATCHTOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")


def sae_lens_training_details(cfg: dict[str, Any]) -> dict[str, Any]:
    """The training fields of a SAELens cfg.json: top-level ones of a checkpoint over ``metadata``'s
    ``training_architecture_details`` of an inference folder."""
    metadata = cfg.get("metadata") or {}
    return {**(metadata.get("training_architecture_details") or {}), **cfg}


def batchtopk_family_of(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str | None:
    """``"batchtopk"`` / ``"matryoshka_batchtopk"`` when the folder holds such an SAE (a training checkpoint, or an
    inference folder with one threshold for every latent), else None."""
    architecture = cfg.get("architecture")
    if architecture in BATCHTOPK_FAMILY:
        return architecture
    trained_as = (cfg.get("metadata") or {}).get("training_architecture")
    threshold = tensors.get("threshold")
    if architecture == "jumprelu" and trained_as in BATCHTOPK_FAMILY and threshold is not None and threshold.numel():
        if bool((threshold == threshold.reshape(-1)[0]).all()):
            return trained_as
    return None


def batchtopk_weight_names(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The tensors of the folder: a checkpoint's scalar ``topk_threshold``, an inference folder's ``threshold``."""
    threshold = "topk_threshold" if cfg.get("architecture") in BATCHTOPK_FAMILY else "threshold"
    return ("W_enc", "W_dec", "b_enc", "b_dec", threshold)


def _integer(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() or value < 1:
        raise SAEConversionError(
            f"{where}: {name}={value!r}; hf-sae's BatchTopK needs a whole mean L0 k >= 1 (a fractional k cannot be "
            "represented)."
        )
    return int(value)


def batchtopk_fields_and_state(
    family: str,
    cfg: dict[str, Any],
    weights: dict[str, torch.Tensor],
    where: str,
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture name, config fields, state dict) of the hf-sae SAE; ``weights`` are float64 (names as in the
    folder), d_in / d_sae / provenance come from the caller."""
    details = sae_lens_training_details(cfg)
    d_sae = cfg["d_sae"]
    k = _integer(details.get("k"), "k", where)
    if k > d_sae:
        raise SAEConversionError(f"{where}: k={k} is larger than d_sae={d_sae}.")
    W_enc, b_enc, W_dec, b_dec = weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"]
    checkpoint = cfg.get("architecture") in BATCHTOPK_FAMILY
    threshold = (weights["topk_threshold"] if checkpoint else weights["threshold"]).reshape(-1)[0]
    if checkpoint and details.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    rate = float(details.get("topk_threshold_lr") or 0.01)
    fields: dict[str, Any] = {"k": k, "auxk": False, "threshold_lr": rate}
    if family == "matryoshka_batchtopk":
        widths = [int(w) for w in details.get("matryoshka_widths") or []]
        if not widths or widths[-1] != d_sae:
            widths.append(d_sae)  # SAELens adds the whole dictionary as the last level too
        fields["group_sizes"] = [b - a for a, b in zip([0, *widths[:-1]], widths)]
    state = {
        "encoder.weight": W_enc.t().contiguous(),
        "encoder.bias": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "threshold": threshold.reshape(()),
        # the estimate counts as settled: further training continues it as the running average
        "threshold_batches": torch.tensor(math.ceil(1.0 / rate), dtype=torch.float64),
    }
    return ("matryoshka_sae" if family == "matryoshka_batchtopk" else "batchtopk_sae"), fields, state


def jumprelu_training_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a SAELens JumpReLU training checkpoint as JumpReLUSAEConfig fields (empty for other folders).
    Only the ``step`` sparsity loss (the paper's L0) is hf-sae's; a ``tanh`` / ``quadratic`` one is not recorded."""
    if cfg.get("architecture") != "jumprelu" or "jumprelu_bandwidth" not in cfg:
        return {}
    fields = {"bandwidth": float(cfg["jumprelu_bandwidth"])}
    if cfg.get("jumprelu_sparsity_loss_mode", "step") == "step":
        fields["l0_coefficient"] = float(cfg.get("l0_coefficient", 1.0))
        fields["l0_warmup_steps"] = int(cfg.get("l0_warm_up_steps", 0))
    if cfg.get("jumprelu_init_threshold"):
        fields["initial_threshold"] = float(cfg["jumprelu_init_threshold"])
    return fields

"""The frozen language model a run reads: its dtype, loading it (the embedded Gemma 3 270M or any causal LM), its
name, and the layers the SAEs read."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from hf_sae.errors import ModelLoadError, TrainConfigError
from hf_sae.hardware import has_native_bf16
from hf_sae.sites import num_layers

from .config import EMBEDDED, EMBEDDED_EXTENDED, SAESpec, TrainConfig
from .small_gemma import load_small_gemma


def lm_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``--lm-dtype``; auto: bfloat16 on GPU and on CPUs with native bfloat16 (AVX512-BF16 / AMX), else float32."""
    if cfg.lm_dtype != "auto":
        return getattr(torch, cfg.lm_dtype)
    return torch.bfloat16 if has_native_bf16(device) else torch.float32


def load_language_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The frozen language model (eval, no grad, in ``--lm-dtype``) on ``device``, and its tokenizer."""
    dtype = lm_dtype(cfg, device)
    if cfg.model == EMBEDDED:
        model, tokenizer = load_small_gemma(dtype=dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(
                f"--model {cfg.model}: cannot load it as a causal language model ({first_line}). Check the Hub id or "
                "local folder (it needs config.json, weights and a tokenizer), log in for gated models "
                "(`hf auth login`), or use --model embedded for the bundled Gemma 3 270M."
            ) from None
    model.requires_grad_(False)
    return model.eval().to(device), tokenizer


def resolve_layers(cfg: TrainConfig, model: nn.Module) -> list[SAESpec]:
    """Fill in the default layer (the middle one, (n - 1) // 2) and check every layer against the model."""
    n = num_layers(model)
    for spec in cfg.saes:
        if spec.layer is None:
            spec.layer = (n - 1) // 2
        if spec.layer >= n:
            raise TrainConfigError(
                f"--layer {spec.layer} is out of range: {cfg.model} has {n} decoder layers (0..{n - 1}). Pass a "
                f"layer in 0..{n - 1}, e.g. --layer {(n - 1) // 2} (the middle)."
            )
    return cfg.saes


def model_id(cfg: TrainConfig, model: nn.Module) -> str:
    """The model's Hub id or path, as the SAE's config and card record it."""
    return str(getattr(model, "name_or_path", "") or cfg.model)


def dataset_id(cfg: TrainConfig) -> str:
    """The training data's name, as the SAE's config and card record it."""
    if cfg.dataset == EMBEDDED:
        return "hf-sae embedded English corpus (training/corpus.py)"
    if cfg.dataset == EMBEDDED_EXTENDED:
        return "hf-sae embedded English corpus plus the Brown corpus (training/corpus.py, variant 'extended')"
    return cfg.dataset

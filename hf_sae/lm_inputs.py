"""Feeding texts to a language model for evaluation: token lists, padded batches, which tokens count, the loss.

The one implementation behind :mod:`hf_sae.evaluation` (LM loss with an SAE spliced in, top features) and
:mod:`hf_sae.flow.evaluation` (feature-flow checks on data)::

    lists, tokenizer = tokenize_texts(model, texts, tokenizer, max_length=128)
    excluded = excluded_token_ids(model, [sae.config])              # BOS and the SAE's excluded ids
    for first, input_ids, attention_mask in batches(lists, 8, model_device(model)):
        kept = kept_tokens(input_ids, attention_mask, excluded)    # (B, T) real, not excluded
        counted = counted_predictions(kept, attention_mask)        # (B, T - 1) predictions to average
        loss = next_token_loss_sum(model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, counted)

Texts may be strings (tokenized with ``tokenizer``, by default ``AutoTokenizer`` of the model's name), a (B, T)
tensor of token ids, a list of id lists, or a dict / ``BatchEncoding`` with ``input_ids`` and ``attention_mask``.
BOS (``model.config.bos_token_id``) and the SAEs' ``excluded_token_ids`` are neither spliced nor counted: their
activations are outliers an SAE is not trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer

from .errors import EvaluationError
from .sites import model_name

Texts = str | Sequence[str] | Tensor | Sequence[Sequence[int]] | Mapping[str, Any]


# ------------------------------------------------------------------------------------------------------- tokens
def tokenizer_for(model: nn.Module, tokenizer: Any = None) -> Any:
    """``tokenizer`` if given, else ``AutoTokenizer`` of the model's ``name_or_path``."""
    if tokenizer is not None:
        return tokenizer
    name = model_name(model)
    if not name:
        raise EvaluationError(
            "texts are strings but no tokenizer was given and the model has no name_or_path to load one from. "
            "Pass tokenizer=AutoTokenizer.from_pretrained(...) or token ids."
        )
    return AutoTokenizer.from_pretrained(name)


def tokenize_texts(
    model: nn.Module, texts: Texts, tokenizer: Any = None, max_length: int | None = None
) -> tuple[list[list[int]], Any]:
    """Every text as a list of token ids (BOS included when the tokenizer adds it, padding removed, at most
    ``max_length`` tokens), and the tokenizer: the one given, or the model's when ``texts`` are strings.

    Raises :class:`EvaluationError` when no tokens are left or strings come without a way to tokenize them.
    """
    if isinstance(texts, Mapping):
        ids, mask = torch.as_tensor(texts["input_ids"]), texts.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        lists = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    elif isinstance(texts, Tensor):
        lists = [row.tolist() for row in (texts if texts.ndim == 2 else texts.unsqueeze(0))]
    else:
        items = [texts] if isinstance(texts, str) else list(texts)
        if items and all(isinstance(item, str) for item in items):
            tokenizer = tokenizer_for(model, tokenizer)
            lists = [tokenizer(item)["input_ids"] for item in items]
        else:
            lists = [list(map(int, item)) for item in items]
    lists = [ids[:max_length] if max_length else ids for ids in lists]
    lists = [ids for ids in lists if ids]
    if not lists:
        raise EvaluationError("no tokens to evaluate: texts is empty (or every text tokenized to nothing).")
    return lists, tokenizer


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """The tokens of ``ids`` as strings (the ids themselves as strings without a tokenizer)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    return list(tokenizer.convert_ids_to_tokens(ids))


# ------------------------------------------------------------------------------------------------------ batches
def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters are: where its inputs go."""
    return next(model.parameters()).device


def batches(lists: list[list[int]], batch_size: int, device: torch.device) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(index of the batch's first text, input_ids (B, T), attention_mask (B, T)), right-padded with id 0."""
    for first in range(0, len(lists), batch_size):
        chunk = lists[first : first + batch_size]
        length = max(len(ids) for ids in chunk)
        input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        yield first, input_ids.to(device), attention_mask.to(device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then back to the mode it was in (also when the block raises)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ which tokens count
def excluded_token_ids(
    model: nn.Module, configs: Iterable[Any], exclude_token_ids: Sequence[int] | None = None
) -> list[int]:
    """The sorted token ids neither edited nor counted: ``exclude_token_ids`` when given, else the
    ``excluded_token_ids`` of every SAE config in ``configs`` and the model's BOS."""
    if exclude_token_ids is not None:
        return sorted(set(exclude_token_ids))
    excluded = set()
    for config in configs:
        excluded |= set(config.excluded_token_ids or [])
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if isinstance(bos, int):
        excluded.add(bos)
    return sorted(excluded)


def kept_tokens(input_ids: Tensor, attention_mask: Tensor, excluded: list[int]) -> Tensor:
    """(B, T) bool: real tokens (not padding) that are not excluded (BOS, ...)."""
    kept = attention_mask.bool()
    if excluded:
        kept &= ~torch.isin(input_ids, torch.tensor(excluded, device=input_ids.device))
    return kept


def counted_predictions(kept: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T - 1) bool: the predictions at t (of token t + 1) to average, where token t is kept and t + 1 is real."""
    return kept[:, :-1] & attention_mask[:, 1:].bool()


def next_token_loss_sum(logits: Tensor, input_ids: Tensor, counted: Tensor) -> Tensor:
    """Sum of CE(logits[:, t], input_ids[:, t + 1]) over the positions t where ``counted[:, t]`` (B, T - 1)."""
    mask = counted > 0  # select the counted rows first: (n, vocab) in float32, never (B, vocab, T) transposed copies
    return F.cross_entropy(logits[:, :-1][mask].float(), input_ids[:, 1:][mask], reduction="sum")

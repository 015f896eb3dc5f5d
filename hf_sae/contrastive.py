"""Contrastive steering vectors: the difference of mean activations between two sets of prompts.

The baseline of activation steering (Turner et al. 2023, "activation addition"; Rimsky et al. 2024, "contrastive
activation addition"; the ``steering-vectors`` and ``repeng`` packages): at one site,

    v = mean_{p in positive} a(p) - mean_{n in negative} a(n),

a(p) the activation at the prompt's last real token (``reduce="last"``, the CAA convention) or the mean over its
real tokens other than BOS / excluded ids (``reduce="mean"``). ``hf_sae.steer(model, v, strength=s)`` then adds s·v
at the steered positions through the same hooks as SAE steering, so the two compare on equal terms (same positions,
same BOS handling, same sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import SteeringError
from .lm_inputs import Texts, batches, eval_mode, excluded_token_ids, kept_tokens, model_device, tokenize_texts
from .sites import capture_activations, resolve_site
from .steering import SteeringVector

REDUCTIONS = ("last", "mean")


@torch.no_grad()
def prompt_activations(
    model: nn.Module,
    layer: int,
    site: str,
    prompts: Texts,
    *,
    tokenizer: Any = None,
    reduce: str = "last",
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
) -> Tensor:
    """(n_prompts, d) float64: each prompt's activation at (``layer``, ``site``), reduced over its tokens by ``reduce``
    (``"last"``: the last real token; ``"mean"``: the mean over real tokens that are not BOS / excluded)."""
    if reduce not in REDUCTIONS:
        raise SteeringError(f"reduce={reduce!r} is unknown; use one of {list(REDUCTIONS)}.")
    lists, _ = tokenize_texts(model, prompts, tokenizer, max_length)
    where = resolve_site(model, layer, site)
    excluded = excluded_token_ids(model, [], exclude_token_ids)
    rows = []
    with eval_mode(model):
        for _, input_ids, attention_mask in batches(lists, batch_size, model_device(model)):
            activation = capture_activations(model, [where], input_ids=input_ids, attention_mask=attention_mask)
            activation = activation[where.key].double()  # (B, T, d)
            if reduce == "last":
                last = attention_mask.sum(1) - 1  # right padding: the last real token
                rows.append(activation[torch.arange(activation.shape[0]), last.to(activation.device)])
                continue
            kept = kept_tokens(input_ids, attention_mask, excluded).to(activation.device)
            counts = kept.sum(1, keepdim=True)
            if bool((counts == 0).any()):
                raise SteeringError("a prompt has no tokens besides BOS / excluded ones; reduce='mean' needs one.")
            rows.append((activation * kept.unsqueeze(-1)).sum(1) / counts)
    return torch.cat(rows)


def contrastive_vector(
    model: nn.Module,
    layer: int,
    site: str,
    positive: Texts,
    negative: Texts,
    *,
    tokenizer: Any = None,
    reduce: str = "last",
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
) -> SteeringVector:
    """The difference-of-means steering vector mean a(positive) − mean a(negative) at (``layer``, ``site``).

    Args:
        positive, negative: prompts (strings with ``tokenizer`` or the model's own, or token-id lists).
        reduce: ``"last"`` (each prompt's last real token, as in contrastive activation addition) or ``"mean"``
            (the mean over its tokens, BOS and ``exclude_token_ids`` left out).

    Returns a :class:`~hf_sae.steering.SteeringVector`: ``hf_sae.steer(model, v, strength=4.0)`` adds 4·v.

    Example::

        v = hf_sae.contrastive_vector(model, 8, "resid", ["I love this", "What a joy"], ["I hate this", "How awful"])
        out = hf_sae.steer(model, v, strength=4.0, positions="generated").generate(**inputs)
    """
    options = dict(
        tokenizer=tokenizer,
        reduce=reduce,
        batch_size=batch_size,
        max_length=max_length,
        exclude_token_ids=exclude_token_ids,
    )
    pos = prompt_activations(model, layer, site, positive, **options)
    neg = prompt_activations(model, layer, site, negative, **options)
    vector = (pos.mean(0) - neg.mean(0)).float().cpu()
    description = f"contrastive: {pos.shape[0]} positive - {neg.shape[0]} negative prompts, reduce={reduce!r}"
    return SteeringVector(vector, layer, site, description)

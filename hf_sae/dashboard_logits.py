"""The output tokens a feature promotes and suppresses: its decoder direction read by the unembedding.

A feature adds ``a · d_f`` to the residual stream (d_f = ``W_dec[f]`` in model units). What the LM head makes of it
is ``W_U · norm(h + a·d_f)``: the final norm is not linear, so, as SAEDashboard and Neuronpedia do, we read the
direct effect ``W_U · (g ⊙ d_f)`` where ``g`` is the final norm's per-dimension gain (RMSNorm: ``weight``; Gemma's
``1 + weight``), taken from the module itself (its output on a vector of ones, whose RMS is 1, so the convention of
each model's norm is respected; a ``LayerNorm`` also removes the mean of d_f first). The norm's ``1 / rms(h)`` is a
positive number per token and Gemma's final logit soft-capping is increasing, so neither changes which tokens a
feature promotes or suppresses or their order; the values shown are per unit of feature activation, before them.

The product is (d_sae, vocab), 16k × 262k for Gemma 3: it is computed in blocks of features, keeping the top ``n``
of each row. ``dtype=torch.bfloat16`` ranks the candidates in bfloat16 (~3x faster on CPUs with AMX) and scores the
best ``4n + 16`` of each row again in float32, so the values are float32 and the order is float32's unless
bfloat16 rounding moves a token from outside those candidates into the top ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import EvaluationError
from .sites import decoder_stack


@dataclass
class LogitEffects:
    """Top promoted / suppressed tokens of each feature.

    Attributes:
        features: (F,) the feature ids the rows belong to.
        promoted_ids, promoted_values: (F, n) the largest entries of ``W_U · (g ⊙ d_f)``, largest first.
        suppressed_ids, suppressed_values: (F, n) the smallest, most negative first.
    """

    features: Tensor
    promoted_ids: Tensor
    promoted_values: Tensor
    suppressed_ids: Tensor
    suppressed_values: Tensor


def unembedding(model: nn.Module) -> Tensor:
    """W_U (vocab, d_model): the weight of the model's output embeddings (the LM head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor):
        raise EvaluationError(
            f"{type(model).__name__} has no output embeddings (LM head) to read logit effects from; pass a "
            "*ForCausalLM model (e.g. AutoModelForCausalLM.from_pretrained(...))."
        )
    return weight.detach()


@torch.no_grad()
def final_norm_directions(model: nn.Module, directions: Tensor) -> Tensor:
    """``directions`` (F, d_model) as the final norm scales them: g ⊙ d (mean removed first for a LayerNorm); the
    directions unchanged when the model has no final ``norm``."""
    norm = getattr(decoder_stack(model), "norm", None)
    if not isinstance(norm, nn.Module):
        return directions
    if isinstance(norm, nn.LayerNorm):
        directions = directions - directions.mean(-1, keepdim=True)
        weight = norm.weight if norm.weight is not None else torch.ones(directions.shape[-1])
        return directions * weight.detach().to(directions)
    parameter = next(norm.parameters(), None)
    ones = torch.ones(1, directions.shape[-1], device=directions.device)
    if parameter is not None:
        ones = ones.to(device=parameter.device, dtype=parameter.dtype)
    gain = norm(ones).reshape(-1).float()  # RMS of ones is 1: the output is the gain (up to 1/sqrt(1 + eps))
    return directions * gain.to(directions)


@torch.no_grad()
def logit_effects(
    model: nn.Module,
    sae: nn.Module,
    *,
    n: int = 10,
    features: Tensor | None = None,
    block_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> LogitEffects:
    """The ``n`` most promoted and most suppressed tokens of each of ``features`` (default all) of ``sae``
    (module docstring for what is computed and how the final norm is treated)."""
    d_sae = sae.config.d_sae
    features = torch.arange(d_sae) if features is None else torch.as_tensor(features, dtype=torch.long).reshape(-1)
    w_u = unembedding(model)
    if w_u.shape[1] != sae.config.d_in:
        raise EvaluationError(
            f"the LM head reads width {w_u.shape[1]} but the SAE writes d_in={sae.config.d_in} (site "
            f"{sae.config.hook_site!r}): logit effects need an SAE of a d_model site (resid, mlp, attn)."
        )
    scale = 1.0 if sae.config.activation_scale_folded else 1.0 / float(sae.config.activation_scale)
    w_u_fast = w_u.to(dtype)
    n = min(n, w_u.shape[0])
    candidates = n if dtype == torch.float32 else min(4 * n + 16, w_u.shape[0])
    out = {name: [] for name in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")}
    decoder = sae.W_dec.detach()
    for start in range(0, features.numel(), block_size):
        ids = features[start : start + block_size]
        directions = final_norm_directions(model, decoder[ids.to(decoder.device)].float() * scale).to(w_u.device)
        logits = directions.to(dtype) @ w_u_fast.T  # (block, vocab)
        for name, largest in (("promoted", True), ("suppressed", False)):
            top = logits.topk(candidates, dim=1, largest=largest).indices
            if dtype != torch.float32:  # score the candidates again in float32 and keep the best n
                exact = torch.einsum("fd,fcd->fc", directions.float(), w_u[top].float())
                order = exact.topk(n, dim=1, largest=largest).indices
                top, values = top.gather(1, order), exact.gather(1, order)
            else:
                values = logits.gather(1, top)
            out[f"{name}_ids"].append(top.cpu())
            out[f"{name}_values"].append(values.float().cpu())
    return LogitEffects(features=features, **{name: torch.cat(parts) for name, parts in out.items()})

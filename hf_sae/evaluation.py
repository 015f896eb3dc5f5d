"""Evaluating an SAE inside its language model, and finding features to steer.

* :func:`lm_loss_with_sae`: next-token loss of the clean model, with the SAE spliced in (the activation at its site
  replaced by the reconstruction) and with the site zero-ablated, and the CE-loss-recovered score
  ``1 - (spliced - clean) / (ablated - clean)`` (1 = the SAE loses nothing, 0 = as bad as deleting the activation).
* :func:`top_features`: the features most active on a text, with their per-token activations.
* :func:`max_activating_examples`: the contexts (over many texts) where one feature fires most.

Texts may be strings (tokenized with ``tokenizer``, by default ``AutoTokenizer`` of the model's name), a (B, T)
tensor of token ids, a list of id lists, or a dict / ``BatchEncoding`` with ``input_ids`` and ``attention_mask``
(read by :mod:`hf_sae.lm_inputs`). BOS (``model.config.bos_token_id``) and the SAE's ``excluded_token_ids`` are
neither spliced nor counted: their activations are outliers an SAE is not trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import EvaluationError
from .lm_inputs import (
    Texts,
    batches,
    counted_predictions,
    eval_mode,
    excluded_token_ids,
    kept_tokens,
    model_device,
    next_token_loss_sum,
    token_strings,
    tokenize_texts,
)
from .sites import capture_activations, resolve_sae_site
from .steering import ActivationPatch, attach


# ------------------------------------------------------------------------------------------------------ LM loss
class LossComparison:
    """Base of the results that compare next-token losses (:class:`LMLossResult`, the feature-flow skip-layer
    result): each defines :attr:`delta_loss`; :meth:`as_dict` gives every field, then ``delta_loss`` and
    ``n_tokens``."""

    @property
    def delta_loss(self) -> float:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must define delta_loss")

    def as_dict(self) -> dict[str, float]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "n_tokens"}
        return {**values, "delta_loss": self.delta_loss, "n_tokens": self.n_tokens}


@dataclass
class LMLossResult(LossComparison):
    """Mean next-token cross-entropy (nats) over the same tokens under three conditions.

    Attributes:
        clean_loss: the unmodified model.
        spliced_loss: the SAE's reconstruction in place of the activation at its site.
        ablated_loss: zeros in place of the activation (zero-ablation).
        ce_loss_recovered: 1 - (spliced - clean) / (ablated - clean).
        n_tokens: number of predictions averaged over.
    """

    clean_loss: float
    spliced_loss: float
    ablated_loss: float
    ce_loss_recovered: float
    n_tokens: int

    @property
    def delta_loss(self) -> float:
        """spliced_loss - clean_loss (the "delta LM loss" of Gemma Scope)."""
        return self.spliced_loss - self.clean_loss


def ce_loss_recovered(clean_loss: float, spliced_loss: float, ablated_loss: float) -> float:
    """1 - (spliced - clean) / (ablated - clean); NaN when ablating changes nothing (ablated == clean)."""
    gap = ablated_loss - clean_loss
    return float("nan") if gap == 0 else 1.0 - (spliced_loss - clean_loss) / gap


@torch.no_grad()
def lm_loss_with_sae(
    model: nn.Module,
    sae: nn.Module,
    texts: Texts,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    k: int | None = None,
    exclude_token_ids: Sequence[int] | None = None,
    clean_loss: float | None = None,
    progress: bool = False,
) -> LMLossResult:
    """Clean, spliced and zero-ablated LM loss of ``model`` on ``texts``, and the CE loss recovered by ``sae``.

    The prediction at position t (of token t + 1) is counted when tokens t and t + 1 are real (not padding) and token
    t is not excluded (BOS and ``sae.config.excluded_token_ids`` by default, or ``exclude_token_ids``). The splice
    and the ablation apply at every real, non-excluded position.

    ``clean_loss``: the ``clean_loss`` of an earlier result on the same texts and excluded ids (e.g. another SAE on
    the same model): the clean forwards, a third of the work, are skipped and that value is used. ``progress``: a
    one-line bar over the forwards (on a terminal); with a 262k-vocabulary LM head each forward takes seconds on CPU.
    """
    excluded = excluded_token_ids(model, [sae.config], exclude_token_ids)
    lists, _ = tokenize_texts(model, texts, tokenizer, max_length)
    totals = torch.zeros(3, dtype=torch.float64)
    n_tokens = 0
    conditions = 2 if clean_loss is not None else 3
    bar = tqdm(
        total=conditions * len(lists),
        desc="LM loss with the SAE spliced in",
        unit="window",
        leave=False,
        dynamic_ncols=True,
        disable=None if progress else True,
    )
    with eval_mode(model), bar:
        for _, input_ids, attention_mask in batches(lists, batch_size, model_device(model)):
            counted = counted_predictions(kept_tokens(input_ids, attention_mask, excluded), attention_mask)
            n_tokens += int(counted.sum())
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if clean_loss is None:
                totals[0] += float(next_token_loss_sum(model(**inputs).logits, input_ids, counted))
                bar.update(input_ids.shape[0])
            with attach(model, sae, splice=True, k=k, exclude_token_ids=excluded):
                totals[1] += float(next_token_loss_sum(model(**inputs).logits, input_ids, counted))
            bar.update(input_ids.shape[0])
            with ActivationPatch(model, sae, torch.zeros_like, exclude_token_ids=excluded):
                totals[2] += float(next_token_loss_sum(model(**inputs).logits, input_ids, counted))
            bar.update(input_ids.shape[0])
    if n_tokens == 0:
        raise EvaluationError("no next-token predictions to average: every text is shorter than 2 counted tokens.")
    spliced, ablated = (float(total) / n_tokens for total in totals[1:])
    clean = float(totals[0]) / n_tokens if clean_loss is None else float(clean_loss)
    return LMLossResult(clean, spliced, ablated, ce_loss_recovered(clean, spliced, ablated), n_tokens)


# ------------------------------------------------------------------------------------------------ finding features
def _feature_activations(model: nn.Module, sae: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, d_sae) dense SAE latents at the SAE's site (zeros outside each token's top k)."""
    site = resolve_sae_site(model, sae)
    activation = capture_activations(model, [site], input_ids=input_ids, attention_mask=attention_mask)[site.key]
    x = activation.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return sae.encode(x).to_dense(sae.config.d_sae)


@dataclass
class TopFeatures:
    """The most active features on one text.

    Attributes:
        tokens: the T tokens (strings; token ids as strings without a tokenizer).
        feature_ids: (n,) feature ids, most active first.
        max_activations: (n,) each feature's largest activation over the counted tokens.
        activations: (n, T) each feature's activation at every token (0 where it is not in the token's top k).
    """

    tokens: list[str]
    feature_ids: Tensor
    max_activations: Tensor
    activations: Tensor

    def __str__(self) -> str:
        lines = [f"{'feature':>8}  {'max':>8}  top tokens"]
        for feature, peak, row in zip(
            self.feature_ids.tolist(), self.max_activations.tolist(), self.activations, strict=True
        ):
            order = row.argsort(descending=True)[:3].tolist()
            tokens = ", ".join(f"{self.tokens[t]!r}:{row[t]:.2f}" for t in order if row[t] > 0)
            lines.append(f"{feature:>8}  {peak:>8.3f}  {tokens}")
        return "\n".join(lines)


@torch.no_grad()
def top_features(
    model: nn.Module,
    sae: nn.Module,
    text: str | Tensor | Sequence[int],
    *,
    tokenizer: Any = None,
    n: int = 10,
    by: str = "max",
    exclude_token_ids: Sequence[int] | None = None,
) -> TopFeatures:
    """Which features fire on ``text``: the ``n`` features with the largest ``by`` ("max" or "sum") activation
    over its tokens (BOS and excluded tokens not counted), with their per-token activations."""
    if by not in ("max", "sum"):
        raise EvaluationError(f"by={by!r} is unknown; use 'max' (peak activation) or 'sum' (total over tokens).")
    if isinstance(text, str):
        texts: Texts = text
    else:
        texts = [list(map(int, text.flatten().tolist() if isinstance(text, Tensor) else text))]
    lists, tokenizer = tokenize_texts(model, texts, tokenizer)
    ids = lists[0]
    _, input_ids, attention_mask = next(batches([ids], 1, model_device(model)))
    dense = _feature_activations(model, sae, input_ids, attention_mask)[0]  # (T, d_sae)
    kept = kept_tokens(input_ids, attention_mask, excluded_token_ids(model, [sae.config], exclude_token_ids))[0]
    counted = dense * kept.unsqueeze(-1).to(device=dense.device, dtype=dense.dtype)
    score = counted.amax(0) if by == "max" else counted.sum(0)
    n = min(n, sae.config.d_sae)
    feature_ids = score.topk(n).indices
    return TopFeatures(
        tokens=token_strings(tokenizer, ids),
        feature_ids=feature_ids.cpu(),
        max_activations=counted.amax(0)[feature_ids].float().cpu(),
        activations=dense[:, feature_ids].T.float().cpu(),
    )


@dataclass
class FeatureExample:
    """One context where a feature fires.

    Attributes:
        text_index: index of the text in ``texts``.
        position: token position of the peak activation in that text.
        activation: the peak activation.
        tokens: the tokens of the window around the peak (``context`` before, ``context`` after).
        activations: the feature's activation at each token of the window.
        peak: index of the peak token inside ``tokens``.
    """

    text_index: int
    position: int
    activation: float
    tokens: list[str] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)
    peak: int = 0

    def __str__(self) -> str:
        marked = [f"[[{t}]]" if i == self.peak else t for i, t in enumerate(self.tokens)]
        return f"{self.activation:8.3f}  text {self.text_index} @ {self.position}: {' '.join(marked)}"


@torch.no_grad()
def max_activating_examples(
    model: nn.Module,
    sae: nn.Module,
    feature: int,
    texts: Texts,
    *,
    tokenizer: Any = None,
    n: int = 10,
    context: int = 8,
    batch_size: int = 8,
    max_length: int | None = 128,
    exclude_token_ids: Sequence[int] | None = None,
) -> list[FeatureExample]:
    """The ``n`` texts where ``feature`` fires most (one example per text, at its peak token), strongest first.

    Texts where the feature never fires are left out, so fewer than ``n`` examples may come back.
    """
    d_sae = sae.config.d_sae
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise EvaluationError(
            f"feature {feature!r} is out of range: this SAE has d_sae={d_sae} latents, ids 0..{d_sae - 1}."
        )
    lists, tokenizer = tokenize_texts(model, texts, tokenizer, max_length)
    excluded = excluded_token_ids(model, [sae.config], exclude_token_ids)
    site = resolve_sae_site(model, sae)
    peaks: list[tuple[float, int, int, list[float]]] = []
    for first, input_ids, attention_mask in batches(lists, batch_size, model_device(model)):
        activation = capture_activations(model, [site], input_ids=input_ids, attention_mask=attention_mask)[site.key]
        latents = sae.encode(activation.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype))
        values = (latents.values * (latents.indices == feature)).sum(-1).float()  # (B, T)
        values = values * kept_tokens(input_ids, attention_mask, excluded).to(values.device)
        best, position = values.max(dim=1)
        for row in range(values.shape[0]):
            if best[row] > 0:
                peaks.append((float(best[row]), first + row, int(position[row]), values[row].tolist()))
    peaks.sort(key=lambda peak: -peak[0])
    examples = []
    for activation, text_index, position, row in peaks[:n]:
        ids = lists[text_index]
        lo, hi = max(0, position - context), min(len(ids), position + context + 1)
        examples.append(
            FeatureExample(
                text_index=text_index,
                position=position,
                activation=activation,
                tokens=token_strings(tokenizer, ids[lo:hi]),
                activations=row[lo:hi],
                peak=position - lo,
            )
        )
    return examples

"""Evaluating an SAE inside its language model, and finding features to steer.

* :func:`lm_loss_with_sae`: next-token loss of the clean model, with the SAE spliced in (the activation at its site
  replaced by the reconstruction), with the site zero-ablated and mean-ablated, and the CE-loss-recovered scores
  ``1 - (spliced - clean) / (ablated - clean)`` (1 = the SAE loses nothing, 0 = as bad as the ablation).
* :func:`feature_stats`: each latent's firing density, mean and max activation on held-out texts
  (:class:`hf_sae.latent_stats.FeatureStats`, the reference scales of steering units).
* :func:`top_features`: the features most active on a text, with their per-token activations.
* :func:`max_activating_examples`: the contexts (over many texts) where one feature fires most.

Texts may be strings (tokenized with ``tokenizer``, by default ``AutoTokenizer`` of the model's name), a (B, T)
tensor of token ids, a list of id lists, or a dict / ``BatchEncoding`` with ``input_ids`` and ``attention_mask``
(read by :mod:`hf_sae.lm_inputs`). BOS (``model.config.bos_token_id``) and the SAE's ``excluded_token_ids`` are
neither spliced nor counted: their activations are outliers an SAE is not trained on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import EvaluationError
from .latent_stats import FeatureStats, FeatureStatsAccumulator
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
    """Mean next-token cross-entropy (nats) over the same tokens under four conditions.

    Attributes:
        clean_loss: the unmodified model.
        spliced_loss: the SAE's reconstruction in place of the activation at its site.
        ablated_loss: zeros in place of the activation (zero-ablation).
        ce_loss_recovered: 1 - (spliced - clean) / (ablated - clean).
        n_tokens: number of predictions averaged over.
        mean_ablated_loss: the mean activation (over the same texts' counted tokens) in place of the activation
            (mean-ablation, the milder baseline: it keeps the activation's constant part).
        ce_loss_recovered_mean: 1 - (spliced - clean) / (mean_ablated - clean).
    """

    clean_loss: float
    spliced_loss: float
    ablated_loss: float
    ce_loss_recovered: float
    n_tokens: int
    mean_ablated_loss: float = math.nan
    ce_loss_recovered_mean: float = math.nan

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
    mean_activation: Tensor | None = None,
    progress: bool = False,
) -> LMLossResult:
    """Clean, spliced, zero-ablated and mean-ablated LM loss of ``model`` on ``texts``, and the CE loss recovered by
    ``sae`` against each ablation.

    The prediction at position t (of token t + 1) is counted when tokens t and t + 1 are real (not padding) and token
    t is not excluded (BOS and ``sae.config.excluded_token_ids`` by default, or ``exclude_token_ids``). The splice
    and the ablations apply at every real, non-excluded position. Mean ablation puts the mean activation of those
    positions (over all of ``texts``, measured in the first pass) in place of the activation, or ``mean_activation``
    (d_in,) when given.

    ``clean_loss``: the ``clean_loss`` of an earlier result on the same texts and excluded ids (e.g. another SAE on
    the same model): the clean forwards are skipped and that value is used (the mean activation then comes from
    forwards that stop at the site). ``progress``: a one-line bar over the forwards (on a terminal); with a
    262k-vocabulary LM head each forward takes seconds on CPU.
    """
    excluded = excluded_token_ids(model, [sae.config], exclude_token_ids)
    lists, _ = tokenize_texts(model, texts, tokenizer, max_length)
    site = resolve_sae_site(model, sae)
    totals = torch.zeros(4, dtype=torch.float64)
    n_tokens = 0
    conditions = 3 + (clean_loss is None)
    bar = tqdm(
        total=conditions * len(lists),
        desc="LM loss with the SAE spliced in",
        unit="window",
        leave=False,
        dynamic_ncols=True,
        disable=None if progress else True,
    )
    device = model_device(model)
    activation_sum, activation_count = torch.zeros((), dtype=torch.float64), 0
    with eval_mode(model), bar:
        for _, input_ids, attention_mask in batches(lists, batch_size, device):  # pass 1: clean loss, mean activation
            kept = kept_tokens(input_ids, attention_mask, excluded)
            counted = counted_predictions(kept, attention_mask)
            n_tokens += int(counted.sum())
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            activation = None
            if clean_loss is None:
                with _SiteRecorder(model, sae) as recorder:
                    logits = model(**inputs).logits
                totals[0] += float(next_token_loss_sum(logits, input_ids, counted))
                activation = recorder.activation
                bar.update(input_ids.shape[0])
            elif mean_activation is None:
                activation = capture_activations(model, [site], **inputs)[site.key]
            if mean_activation is None:
                rows = activation[kept.to(activation.device)].double()
                activation_sum = activation_sum + rows.sum(0)
                activation_count += rows.shape[0]
        if mean_activation is None:
            mean_activation = activation_sum / max(activation_count, 1)
        mean = mean_activation.reshape(-1)
        for _, input_ids, attention_mask in batches(lists, batch_size, device):  # pass 2: splice and ablations
            counted = counted_predictions(kept_tokens(input_ids, attention_mask, excluded), attention_mask)
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            patches = (
                (1, lambda: attach(model, sae, splice=True, k=k, exclude_token_ids=excluded)),
                (2, lambda: ActivationPatch(model, sae, torch.zeros_like, exclude_token_ids=excluded)),
                (3, lambda: ActivationPatch(model, sae, _constant(mean), exclude_token_ids=excluded)),
            )
            for index, patch in patches:
                with patch():
                    totals[index] += float(next_token_loss_sum(model(**inputs).logits, input_ids, counted))
                bar.update(input_ids.shape[0])
    if n_tokens == 0:
        raise EvaluationError("no next-token predictions to average: every text is shorter than 2 counted tokens.")
    spliced, ablated, mean_ablated = (float(total) / n_tokens for total in totals[1:])
    clean = float(totals[0]) / n_tokens if clean_loss is None else float(clean_loss)
    return LMLossResult(
        clean,
        spliced,
        ablated,
        ce_loss_recovered(clean, spliced, ablated),
        n_tokens,
        mean_ablated,
        ce_loss_recovered(clean, spliced, mean_ablated),
    )


def _constant(vector: Tensor):
    """fn(h) = ``vector`` broadcast to h's shape, dtype and device (mean ablation)."""

    def replace(activation: Tensor) -> Tensor:
        return vector.to(device=activation.device, dtype=activation.dtype).expand_as(activation)

    return replace


class _SiteRecorder:
    """Keeps the activation at an SAE's site of the last forward (``.activation``, (B, T, d_in)); changes nothing."""

    def __init__(self, model: nn.Module, sae: nn.Module):
        self.activation: Tensor | None = None
        self._handle = resolve_sae_site(model, sae).register(self._record)

    def _record(self, activation: Tensor) -> None:
        self.activation = activation.detach()

    def __enter__(self) -> _SiteRecorder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.remove()


@torch.no_grad()
def feature_stats(
    model: nn.Module,
    sae: nn.Module,
    texts: Texts,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    k: int | None = None,
    exclude_token_ids: Sequence[int] | None = None,
    progress: bool = False,
    store: bool = True,
    source: str = "",
) -> FeatureStats:
    """Each latent's firing density, mean activation (where it fires) and max activation, and the site's mean
    activation and mean norm, over the real, non-excluded tokens of ``texts`` (BOS and ``excluded_token_ids`` left
    out, as in training); see :mod:`hf_sae.latent_stats`.

    With ``store`` (the default) the result becomes ``sae.feature_stats``: ``sae.save_pretrained`` writes it beside
    the weights and steering can then take strengths in ``units="max" | "mean" | "residual_norm"``. Forwards stop at
    the SAE's site (no LM head). ``k``: the budget (default the SAE's k).
    """
    lists, _ = tokenize_texts(model, texts, tokenizer, max_length)
    excluded = excluded_token_ids(model, [sae.config], exclude_token_ids)
    site = resolve_sae_site(model, sae)
    accumulator = FeatureStatsAccumulator(sae.config.d_sae, sae.config.d_in, k, source or "hf_sae.feature_stats")
    bar = tqdm(
        total=len(lists), desc="feature statistics", unit="text", leave=False, disable=None if progress else True
    )
    with eval_mode(model), bar:
        for _, input_ids, attention_mask in batches(lists, batch_size, model_device(model)):
            activation = capture_activations(model, [site], input_ids=input_ids, attention_mask=attention_mask)[
                site.key
            ]
            rows = activation[kept_tokens(input_ids, attention_mask, excluded).to(activation.device)]
            rows = rows.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
            if rows.shape[0]:
                latents = sae.encode(rows, k)
                accumulator.update(rows, latents.values, latents.indices)
            bar.update(input_ids.shape[0])
    if accumulator.n == 0:
        raise EvaluationError("no tokens to measure: every token of texts is padding, BOS or excluded.")
    stats = accumulator.result()
    if store:
        sae.feature_stats = stats
    return stats


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
        activations: (n, T) each feature's activation at every token (0 where it is not in the token's top k, and at
            BOS / excluded tokens, which are not ranked either).
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
        activations=counted[:, feature_ids].T.float().cpu(),
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

"""What a feature dashboard needs from one pass over the text, kept per feature without per-feature Python loops.

:class:`FeatureActivationCollector` takes the SAE latents of successive batches of tokens and keeps, for every
latent at once (tensor operations over the batch's fired (token, feature) pairs):

* the running top-``n`` contexts: the ``n`` windows where the feature fires most, one example per window (at its peak
  token; ties go to the earlier token), as in :func:`hf_sae.evaluation.max_activating_examples`;
* an activation histogram of its non-zero values over ``bins`` equal bins on ``[0, 2^e)``, where ``2^e`` is the
  smallest power of two above its largest value. The range grows as larger values arrive by merging neighbouring
  bins (powers of two nest exactly), so the result equals a direct histogram over those bins, whatever the batching;
* how often it fires (density) and the sum of its values (mean where it fires);
* every fired (token, feature, value) triple, so that the contexts can show the feature's value at each token.

A window's tokens must all come in one :meth:`FeatureActivationCollector.update` (the per-window deduplication is
within an update); the dashboard builder feeds whole windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_NO_RANGE = -(2**20)
"""The exponent of a latent that has not fired yet (its histogram is empty)."""


def _rank_in_group(sorted_groups: Tensor) -> Tensor:
    """(P,) position of each element inside its run of equal values of ``sorted_groups`` (0 for the first)."""
    position = torch.arange(sorted_groups.shape[0], device=sorted_groups.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = torch.where(starts, position, torch.zeros_like(position)).cummax(0).values
    return position - first


@dataclass
class FeatureActivations:
    """The result of one pass (see the module docstring).

    Attributes:
        top_values: (d_sae, n) float32 peak values of each feature's top windows, largest first; -inf where it
            fired in fewer than n windows.
        top_tokens: (d_sae, n) int64 the (global) token index of each peak; -1 in unused slots.
        top_windows: (d_sae, n) int64 the window of each peak; -1 in unused slots.
        histogram: (d_sae, bins) int64 counts of the non-zero values in ``bins`` equal bins on [0, histogram_top).
        histogram_top: (d_sae,) float64 the histogram's upper edge 2^e (0 for a feature that never fired).
        count: (d_sae,) int64 number of tokens where the feature fired.
        total: (d_sae,) float64 sum of its values.
        n_tokens: number of tokens seen.
        pair_keys: (P,) int64 sorted ``token * d_sae + feature`` of every fired pair; pair_values (P,) their values.
    """

    top_values: Tensor
    top_tokens: Tensor
    top_windows: Tensor
    histogram: Tensor
    histogram_top: Tensor
    count: Tensor
    total: Tensor
    n_tokens: int
    pair_keys: Tensor
    pair_values: Tensor

    @property
    def d_sae(self) -> int:
        return int(self.count.shape[0])

    @property
    def density(self) -> Tensor:
        """(d_sae,) fraction of the tokens where each feature fired."""
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> Tensor:
        """(d_sae,) mean value where the feature fired (0 for a feature that never fired)."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.zeros_like(self.total))

    def values_at(self, tokens: Tensor, features: Tensor) -> Tensor:
        """The value of ``features`` at ``tokens`` (broadcast together; global token indices, -1 = none), 0 where the
        feature did not fire."""
        tokens, features = torch.broadcast_tensors(tokens.long(), features.long())
        keys = tokens * self.d_sae + features
        where = torch.searchsorted(self.pair_keys, keys.reshape(-1)).clamp_max(max(self.pair_keys.numel() - 1, 0))
        if self.pair_keys.numel() == 0:
            return torch.zeros(keys.shape, dtype=torch.float32)
        found = (self.pair_keys[where] == keys.reshape(-1)) & (tokens.reshape(-1) >= 0)
        return torch.where(found, self.pair_values[where], torch.zeros(())).reshape(keys.shape)


class FeatureActivationCollector:
    """Accumulates :class:`FeatureActivations` over batches of latents (module docstring).

    Args:
        d_sae: number of latents.
        n_examples: contexts kept per feature.
        bins: histogram bins per feature (a power of two, so that the range can double by merging bins).
    """

    def __init__(self, d_sae: int, n_examples: int = 10, bins: int = 32):
        if bins < 1 or bins & (bins - 1):
            raise ValueError(f"bins={bins} must be a power of two (1, 2, 4, ..., e.g. 32).")
        if n_examples < 1:
            raise ValueError(f"n_examples={n_examples} must be at least 1.")
        self.d_sae, self.n_examples, self.bins = d_sae, n_examples, bins
        self._log2_bins = int(math.log2(bins))
        self.top_values = torch.full((d_sae, n_examples), -math.inf)
        self.top_tokens = torch.full((d_sae, n_examples), -1, dtype=torch.long)
        self.top_windows = torch.full((d_sae, n_examples), -1, dtype=torch.long)
        self.histogram = torch.zeros(d_sae, bins, dtype=torch.long)
        self.exponent = torch.full((d_sae,), _NO_RANGE, dtype=torch.long)
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.n_tokens = 0
        self._pairs: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor, tokens: Tensor, windows: Tensor) -> None:
        """values / indices: (N, k) latents of N counted tokens (values > 0 fire); tokens: (N,) their global token
        indices, ascending within the call and above those of earlier calls; windows: (N,) the window of each
        (every token of a window in this one call)."""
        values = values.reshape(-1, values.shape[-1]).detach().float().cpu()
        indices = indices.reshape(-1, indices.shape[-1]).cpu()
        tokens, windows = tokens.reshape(-1).long().cpu(), windows.reshape(-1).long().cpu()
        self.n_tokens += values.shape[0]
        fired = values > 0
        rows = fired.nonzero(as_tuple=True)[0]
        value, feature = values[fired], indices[fired].long()
        if not value.numel():
            return
        token, window = tokens[rows], windows[rows]
        self._pairs.append((token * self.d_sae + feature, value))
        self.count += torch.bincount(feature, minlength=self.d_sae)
        self.total.index_add_(0, feature, value.double())
        self._update_histogram(feature, value)
        self._update_top(feature, value, token, window)

    def _update_histogram(self, feature: Tensor, value: Tensor) -> None:
        peak = torch.zeros(self.d_sae).scatter_reduce_(0, feature, value, reduce="amax")
        touched = peak > 0
        _, exponent = torch.frexp(peak)  # peak = m * 2^e with m in [0.5, 1): every value is below 2^e
        new = torch.where(touched, torch.maximum(self.exponent, exponent.long()), self.exponent)
        shift = new - self.exponent
        for step in shift[shift > 0].unique().tolist():  # a handful of distinct range changes, not one per feature
            rows = (shift == step).nonzero(as_tuple=True)[0]
            counts = self.histogram[rows]
            merged = torch.zeros_like(counts)
            if step >= self._log2_bins:  # the old range fits in the new first bin
                merged[:, 0] = counts.sum(1)
            else:
                group = 1 << step
                merged[:, : self.bins // group] = counts.view(-1, self.bins // group, group).sum(-1)
            self.histogram[rows] = merged
        self.exponent = new
        scaled = torch.ldexp(value.double(), (self._log2_bins - self.exponent[feature]).double())  # exact
        bin_ = scaled.floor().long().clamp_(0, self.bins - 1)
        self.histogram.view(-1).index_add_(0, feature * self.bins + bin_, torch.ones_like(bin_))

    def _update_top(self, feature: Tensor, value: Tensor, token: Tensor, window: Tensor) -> None:
        # One stable sort on an int64 key (group, then value descending; the pairs come in token order, so ties keep
        # the earlier token): values are positive, so their float32 bit patterns sort as they do.
        descending = (2**31 - 1) - value.view(torch.int32).long()
        group = feature * (int(window.max()) - int(window.min()) + 1) + (window - window.min())
        order = torch.argsort((group << 31) | descending, stable=True)
        peak = order[_rank_in_group(group[order]) == 0]  # one example per (feature, window): its peak
        peak = peak.sort().values  # back to token order, for the ties of the next sort
        feature, value, token, window = feature[peak], value[peak], token[peak], window[peak]
        order = torch.argsort((feature << 31) | descending[peak], stable=True)
        feature, value, token, window = feature[order], value[order], token[order], window[order]
        keep = _rank_in_group(feature) < self.n_examples
        rank = _rank_in_group(feature)[keep]
        feature = feature[keep]
        new_values = torch.full_like(self.top_values, -math.inf)
        new_tokens = torch.full_like(self.top_tokens, -1)
        new_windows = torch.full_like(self.top_windows, -1)
        new_values[feature, rank], new_tokens[feature, rank] = value[keep], token[keep]
        new_windows[feature, rank] = window[keep]
        values = torch.cat([self.top_values, new_values], 1)  # earlier tokens first: a stable sort keeps them first
        order = torch.argsort(-values, dim=1, stable=True)[:, : self.n_examples]
        self.top_values = values.gather(1, order)
        self.top_tokens = torch.cat([self.top_tokens, new_tokens], 1).gather(1, order)
        self.top_windows = torch.cat([self.top_windows, new_windows], 1).gather(1, order)

    def result(self) -> FeatureActivations:
        if self._pairs:
            keys = torch.cat([k for k, _ in self._pairs])
            values = torch.cat([v for _, v in self._pairs])
            order = torch.argsort(keys)
            keys, values = keys[order], values[order]
        else:
            keys, values = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        top = torch.where(self.count > 0, torch.ldexp(torch.ones(()), self.exponent.double()), torch.zeros(()))
        return FeatureActivations(
            top_values=self.top_values.clone(),
            top_tokens=self.top_tokens.clone(),
            top_windows=self.top_windows.clone(),
            histogram=self.histogram.clone(),
            histogram_top=top.double(),
            count=self.count.clone(),
            total=self.total.clone(),
            n_tokens=self.n_tokens,
            pair_keys=keys,
            pair_values=values,
        )

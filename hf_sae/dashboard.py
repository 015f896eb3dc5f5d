"""A feature dashboard for one SAE: a self-contained static site built from one pass over held-out text.

    from hf_sae.dashboard import build_dashboard
    dashboard = build_dashboard(model, sae, texts, "dash/", tokenizer=tokenizer, flow=flow)
    # open dash/index.html: no server and no network needed

For every feature the site shows its top activating contexts (the windows where it fires most, one example per
window, its value at every token highlighted), an activation histogram, its firing density, mean and max, the output
tokens its decoder direction promotes and suppresses (:mod:`hf_sae.dashboard_logits`: ``W_U · (g ⊙ W_dec[f])`` with
the final norm's gain g) and, when a :class:`~hf_sae.flow.FeatureFlow` is given, its flow-graph neighbours
(:mod:`hf_sae.dashboard_flow`); the index lists every feature sorted by firing density, with a search box (a feature
id, or text of its top tokens).

How: texts are tokenized (BOS added by the tokenizer), cut into windows of ``context_length`` tokens (a long text
continues in the next window, which starts with BOS again, as training windows do), and run through the model once,
each forward stopping at the SAE's site. BOS, padding and the SAE's ``excluded_token_ids`` are never counted. The
latents of each batch go to :class:`~hf_sae.dashboard_collect.FeatureActivationCollector`, which keeps the running
top contexts and histograms of all features with tensor operations. ``hf-sae dashboard`` is the command-line form.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._io import atomic_dir, remove_tree
from .dashboard_collect import FeatureActivationCollector, FeatureActivations
from .dashboard_flow import flow_neighbours
from .dashboard_logits import LogitEffects, logit_effects
from .dashboard_page import write_site
from .errors import EvaluationError
from .lm_inputs import Texts, batches, eval_mode, excluded_token_ids, kept_tokens, model_device, tokenize_texts
from .sites import capture_activations, model_name, resolve_sae_site


@dataclass
class Dashboard:
    """What :func:`build_dashboard` wrote and measured.

    Attributes:
        path: the site's folder (open ``path / "index.html"``).
        activations: the per-feature results of the pass (top contexts, histograms, counts).
        logits: the promoted / suppressed tokens of the features with a page.
        windows: the token ids of every window, in order (``activations.top_tokens`` index their concatenation).
        n_tokens: the number of counted tokens.
    """

    path: Path
    activations: FeatureActivations
    logits: LogitEffects
    windows: list[list[int]]
    n_tokens: int

    @property
    def index_html(self) -> Path:
        return self.path / "index.html"


def split_windows(lists: Sequence[Sequence[int]], context_length: int, bos: int | None) -> list[list[int]]:
    """Each token list cut into windows of at most ``context_length`` tokens; a window that continues a text starts
    with ``bos`` again (when the text started with it), so every window looks like the start of a text."""
    if context_length < 2:
        raise EvaluationError(f"context_length={context_length} must be at least 2 tokens.")
    windows = []
    for ids in lists:
        ids = list(ids)
        lead = [bos] if bos is not None and ids and ids[0] == bos else []
        body, step = ids[len(lead) :], context_length - len(lead)
        windows.extend(lead + body[start : start + step] for start in range(0, len(body), step))
    return windows


def _take_tokens(windows: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The first windows holding at least ``max_tokens`` tokens in all (all of them when None)."""
    if max_tokens is None:
        return windows
    taken, total = [], 0
    for window in windows:
        if total >= max_tokens:
            break
        taken.append(window)
        total += len(window)
    return taken


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    sae: nn.Module,
    windows: list[list[int]],
    *,
    n_examples: int = 10,
    bins: int = 32,
    batch_size: int = 8,
    exclude_token_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> FeatureActivations:
    """The one pass: every window through the model up to the SAE's site, its counted tokens encoded, the latents
    collected (a progress bar over tokens on a terminal)."""
    excluded = excluded_token_ids(model, [sae.config], exclude_token_ids)
    site = resolve_sae_site(model, sae)
    collector = FeatureActivationCollector(sae.config.d_sae, n_examples, bins)
    starts = torch.tensor([0] + [len(w) for w in windows]).cumsum(0)
    bar = tqdm(
        total=int(starts[-1]), desc="feature dashboard", unit="tok", unit_scale=True, disable=None if progress else True
    )
    with eval_mode(model), bar:
        for first, input_ids, attention_mask in batches(windows, batch_size, model_device(model)):
            activation = capture_activations(model, [site], input_ids=input_ids, attention_mask=attention_mask)[
                site.key
            ]
            kept = kept_tokens(input_ids, attention_mask, excluded)
            rows = activation[kept.to(activation.device)].to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
            row, position = kept.cpu().nonzero(as_tuple=True)
            if rows.shape[0]:
                latents = sae.encode(rows)
                collector.update(latents.values, latents.indices, starts[first + row] + position, first + row)
            bar.update(int(attention_mask.sum()))
    if collector.n_tokens == 0:
        raise EvaluationError("no tokens to show: every token of texts is padding, BOS or excluded.")
    return collector.result()


def token_texts(tokenizer: Any, ids: Tensor | Sequence[int]) -> dict[str, str]:
    """{str(id): the token's text} for the distinct ``ids`` (``decode([id])``; " id" without a tokenizer)."""
    distinct = sorted(set(torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()))
    if tokenizer is None:
        return {str(i): f" {i}" for i in distinct}
    texts = tokenizer.batch_decode([[i] for i in distinct])
    return {str(i): text for i, text in zip(distinct, texts, strict=True)}


def _rounded(values: Tensor, digits: int = 4) -> list:
    """``values`` as (nested) float lists rounded to ``digits`` significant digits, so that the data files stay small
    (rounded in float64: each result prints as its short decimal)."""
    values = values.double()
    magnitude = values.abs().clamp_min(1e-30).log10().floor()
    scale = torch.pow(10.0, digits - 1 - magnitude)
    return torch.where(values == 0, values, (values * scale).round() / scale).tolist()


def _pages(
    result: FeatureActivations,
    logits: LogitEffects,
    windows: list[list[int]],
    features: Tensor,
    context_before: int,
    context_after: int,
    neighbours: tuple[list[list[dict]], list[str]] | None,
) -> tuple[dict[int, dict], Tensor]:
    """{feature: page data} and the token ids the contexts show. Tensors become lists once, up front: the loop
    below only assembles them."""
    lengths = torch.tensor([len(w) for w in windows])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    peaks, window = result.top_tokens[features], result.top_windows[features].clamp_min(0)  # (F, n)
    lo = torch.maximum(peaks - context_before, starts[window])
    hi = torch.minimum(peaks + context_after + 1, starts[window + 1])
    width = context_before + context_after + 1
    positions = lo.unsqueeze(-1) + torch.arange(width)  # (F, n, width)
    inside = (positions < hi.unsqueeze(-1)) & (peaks >= 0).unsqueeze(-1)
    values = _rounded(result.values_at(torch.where(inside, positions, -1), features.view(-1, 1, 1)))
    shown = inside.sum(-1).tolist()
    peak_values = _rounded(result.top_values[features].clamp_min(0), 5)
    columns = (
        peaks.tolist(),
        lo.tolist(),
        result.histogram[features].tolist(),
        result.histogram_top[features].tolist(),
    )
    promoted = (logits.promoted_ids.tolist(), _rounded(logits.promoted_values))
    suppressed = (logits.suppressed_ids.tolist(), _rounded(logits.suppressed_values))
    flow_lists, classes = neighbours if neighbours is not None else (None, None)
    pages = {}
    for row, feature in enumerate(features.tolist()):
        row_peaks, row_lo, histogram, top = (column[row] for column in columns)
        contexts = [
            [row_lo[i], peak, peak_values[row][i], values[row][i][: shown[row][i]]]
            for i, peak in enumerate(row_peaks)
            if peak >= 0
        ]
        page = {
            "contexts": contexts,
            "hist": histogram,
            "hist_top": top,
            "promoted": [list(pair) for pair in zip(promoted[0][row], promoted[1][row])],
            "suppressed": [list(pair) for pair in zip(suppressed[0][row], suppressed[1][row])],
        }
        if flow_lists is not None:
            page["flow"] = [{**n, "cosine": round(n["cosine"], 4)} for n in flow_lists[feature]]
            page["cls"] = classes[feature]
        pages[feature] = page
    return pages, torch.cat([logits.promoted_ids.reshape(-1), logits.suppressed_ids.reshape(-1)])


def _labels(result: FeatureActivations, logits: LogitEffects, texts: dict[str, str], tokens: Tensor) -> dict[int, str]:
    """The index's searchable text of each feature with a page: its peak tokens, then its top promoted tokens."""
    peaks = result.top_tokens[logits.features, :3]
    peak_ids = torch.where(peaks >= 0, tokens[peaks.clamp_min(0)], -1).tolist()
    shown = [[repr(texts[str(i)].strip() or texts[str(i)])[1:-1] for i in row if i >= 0] for row in peak_ids]
    promoted = [
        [repr(texts[str(i)].strip() or texts[str(i)])[1:-1] for i in row] for row in logits.promoted_ids[:, :3].tolist()
    ]
    return {
        feature: " ".join(peak) + "  →  " + " ".join(top)
        for feature, peak, top in zip(logits.features.tolist(), shown, promoted)
    }


def build_dashboard(
    model: nn.Module,
    sae: nn.Module,
    texts: Texts,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    flow: Any = None,
    features: Sequence[int] | None = None,
    n_examples: int = 10,
    context_length: int = 128,
    context_before: int = 12,
    context_after: int = 4,
    max_tokens: int | None = None,
    batch_size: int = 8,
    bins: int = 32,
    n_logits: int = 10,
    logit_dtype: torch.dtype = torch.float32,
    exclude_token_ids: Sequence[int] | None = None,
    title: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dashboard:
    """Write the dashboard of ``sae`` (on ``model``, a ``*ForCausalLM``) over ``texts`` into the folder ``out``.

    Args:
        texts: held-out text (strings, tokenized with ``tokenizer`` or the model's own; or token ids), see
            :mod:`hf_sae.lm_inputs`.
        flow: a :class:`~hf_sae.flow.FeatureFlow` holding this SAE: each page lists its flow-graph neighbours.
        features: the features that get a page (default: every feature that fired); every feature is in the index.
        n_examples: top contexts per feature (one per window).
        context_length: tokens per window fed to the model.
        context_before, context_after: tokens shown around each peak.
        max_tokens: stop after the windows holding this many tokens.
        bins: histogram bins (a power of two).
        n_logits: promoted and suppressed tokens per feature; ``logit_dtype=torch.bfloat16`` ranks them faster.
        overwrite: replace an existing ``out`` (otherwise a non-empty ``out`` is refused).
    The site is written into a temporary folder beside ``out`` and renamed into place when complete.
    """
    out = Path(out)
    _check_out(out, overwrite)
    lists, tokenizer = tokenize_texts(model, texts, tokenizer)
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    windows = _take_tokens(split_windows(lists, context_length, bos if isinstance(bos, int) else None), max_tokens)
    result = collect_activations(
        model,
        sae,
        windows,
        n_examples=n_examples,
        bins=bins,
        batch_size=batch_size,
        exclude_token_ids=exclude_token_ids,
        progress=progress,
    )
    return write_dashboard(
        model,
        sae,
        result,
        windows,
        out,
        tokenizer=tokenizer,
        flow=flow,
        features=features,
        context_before=context_before,
        context_after=context_after,
        n_logits=n_logits,
        logit_dtype=logit_dtype,
        title=title,
        overwrite=overwrite,
    )


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise EvaluationError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or another folder.")


def write_dashboard(
    model: nn.Module,
    sae: nn.Module,
    result: FeatureActivations,
    windows: list[list[int]],
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    flow: Any = None,
    features: Sequence[int] | None = None,
    context_before: int = 12,
    context_after: int = 4,
    n_logits: int = 10,
    logit_dtype: torch.dtype = torch.float32,
    title: str | None = None,
    overwrite: bool = False,
) -> Dashboard:
    """Everything after the pass (:func:`collect_activations` over ``windows``): logit effects, flow neighbours,
    the pages, the index, written into ``out`` (arguments as in :func:`build_dashboard`)."""
    out = Path(out)
    _check_out(out, overwrite)
    shown = (result.count > 0).nonzero(as_tuple=True)[0] if features is None else torch.as_tensor(features).long()
    if shown.numel() and not 0 <= int(shown.min()) <= int(shown.max()) < sae.config.d_sae:
        raise EvaluationError(f"features must be ids in 0..{sae.config.d_sae - 1}, got {shown.tolist()[:8]}...")
    logits = logit_effects(model, sae, n=n_logits, features=shown, dtype=logit_dtype)
    neighbours = flow_neighbours(flow, sae) if flow is not None else None
    pages, logit_ids = _pages(result, logits, windows, shown, context_before, context_after, neighbours)
    tokens = torch.tensor([t for w in windows for t in w], dtype=torch.long)
    texts_of = token_texts(tokenizer, torch.cat([tokens, logit_ids]))
    labels = _labels(result, logits, texts_of, tokens)
    order = torch.argsort(-result.density, stable=True)  # most frequent first, ties by id
    numbers = torch.stack([result.density, result.top_values[:, 0].clamp_min(0).double(), result.mean_activation], 1)
    rows = [[f, *values, labels.get(f, "")] for f, values in zip(order.tolist(), _rounded(numbers[order]))]
    config = sae.config
    title = title or f"{type(sae).__name__} · layer {config.hook_layer} {config.hook_site}"
    dead = int((result.count == 0).sum())
    meta = {
        "d_sae": config.d_sae,
        "n_tokens": result.n_tokens,
        "short": f"{model_name(model) or type(model).__name__} · {result.n_tokens:,} held-out tokens",
        "lines": [
            f"{type(sae).__name__}: d_in {config.d_in}, d_sae {config.d_sae:,}, k {config.k}",
            f"model {model_name(model) or config.base_model or type(model).__name__}, layer {config.hook_layer}, "
            f"site {config.hook_site}",
            f"{result.n_tokens:,} counted tokens in {len(windows):,} windows of ≤ {max(map(len, windows))} tokens "
            "(BOS and excluded tokens not counted)",
            f"{dead:,} of {config.d_sae:,} features ({100 * dead / config.d_sae:.1f}%) never fired",
        ],
    }
    if out.exists() and overwrite:
        remove_tree(out)
    with atomic_dir(out) as staging:
        write_site(staging, {"meta": meta, "features": rows}, {"ids": tokens.tolist(), "text": texts_of}, pages, title)
    return Dashboard(out, result, logits, windows, result.n_tokens)

"""Steering you can evaluate: generate over a grid of strengths and measure what each one does.

For every strength s (and the unsteered model, s = 0), :func:`steering_sweep` generates a continuation G of each
prompt P under the steering and scores the predictions that produced G — positions t = |P|−1 … |P|+|G|−2, the
distributions generation drew from — with p^s the steered model's next-token distribution (generate's own logits,
so KV-cache and ``positions`` exactly as in use) and p^c the unsteered model's on the same tokens:

* ``kl``:              mean_t KL(p^s_t ‖ p^c_t) = Σ_v p^s_t(v) (log p^s_t(v) − log p^c_t(v))   (nats; 0 unsteered)
* ``target_logprob``:  mean_t log Σ_{v ∈ targets} p^s_t(v)     (how much the steering pushes towards the targets)
* ``fluency_loss``:    mean_t −log p^c_t(G_t)                   (the unsteered model's loss on the steered text)
* ``target_rate``:     the fraction of generated tokens that are target tokens.

Means are over every scored token of every prompt (token-weighted); a continuation ends at its first EOS (kept)
and nothing after it counts. Target words become the first token of the word with and without a leading space.
The table and the plot (strength on x) show where the target rises while the fluency cost holds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._io import atomic_path
from .errors import SteeringError
from .lm_inputs import Texts, eval_mode, model_device, tokenize_texts, tokenizer_for
from .steering import SteeringHandle, SteeringVector, steer, strength_number

COLUMNS = ("strength", "kl", "target_logprob", "fluency_loss", "target_rate", "tokens")


@dataclass
class SweepRow:
    """The metrics of one strength (module docstring); ``texts``: the continuation of each prompt."""

    strength: float | str
    kl: float
    target_logprob: float
    fluency_loss: float
    target_rate: float
    tokens: int
    texts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*COLUMNS, "texts")}


@dataclass
class SweepResult:
    """Rows of a sweep: ``rows[0]`` is the unsteered model (strength 0), then each strength in order."""

    rows: list[SweepRow]
    prompts: list[str]
    what: str
    units: str
    targets: list[int]

    @property
    def baseline(self) -> SweepRow:
        return self.rows[0]

    @property
    def strength_units(self) -> str:
        """What the strengths are in: multiples of each feature's peak for "Nx" strings, else :attr:`units`."""
        return "multiples of each feature's peak" if any(isinstance(r.strength, str) for r in self.rows) else self.units

    def table(self, sample_chars: int = 60) -> str:
        """A fixed-width table: one line per strength with its metrics and the start of the first continuation."""
        head = f"{'strength':>12} {'KL':>8} {'log p(target)':>14} {'fluency loss':>13} {'target rate':>12}  sample"
        lines = [f"steering: {self.what} (strength units: {self.strength_units})", head]
        for row in self.rows:
            label = "0 (none)" if row is self.baseline else str(row.strength)
            sample = (row.texts[0] if row.texts else "").replace("\n", " ")[:sample_chars]
            lines.append(
                f"{label:>12} {row.kl:>8.3f} {row.target_logprob:>14.3f} {row.fluency_loss:>13.3f} "
                f"{row.target_rate:>12.3f}  {sample!r}"
            )
        return "\n".join(lines)

    __str__ = table

    def to_rows(self) -> list[dict[str, Any]]:
        return [row.as_dict() for row in self.rows]

    def pick(self, max_fluency_cost: float = 1.0) -> SweepRow:
        """The steered row with the highest target log-probability among those whose fluency loss is at most
        ``max_fluency_cost`` nats above the unsteered model's (the unsteered row when none qualifies)."""
        limit = self.baseline.fluency_loss + max_fluency_cost
        fluent = [row for row in self.rows[1:] if row.fluency_loss <= limit]
        return max(fluent, key=lambda row: row.target_logprob, default=self.baseline)

    def plot(self, path: str | Path, *, dpi: int = 130) -> Path:
        """Three panels against the strength: KL, target log-probability, fluency loss (the unsteered level dashed).
        PNG / SVG / PDF by the suffix; written atomically."""
        from matplotlib.figure import Figure

        path = Path(path)
        xs = [strength_number(row.strength) for row in self.rows]
        fig = Figure(figsize=(11, 3.4))
        panels = (("kl", "KL(steered ‖ clean)"), ("target_logprob", "log p(target)"), ("fluency_loss", "fluency loss"))
        for i, (name, label) in enumerate(panels):
            ax = fig.add_subplot(1, 3, i + 1)
            ax.plot(xs, [getattr(row, name) for row in self.rows], marker="o", color="#4C72B0")
            ax.axhline(getattr(self.baseline, name), color="#999999", linestyle="--", linewidth=0.8)
            ax.set_xlabel(f"strength ({self.strength_units})", fontsize=8)
            ax.set_title(label, fontsize=10)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        fig.suptitle(f"steering sweep: {self.what}", fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
        return path


def target_token_ids(targets: Sequence[str | int] | None, tokenizer: Any) -> list[int]:
    """Token ids of ``targets``: ids as given; a word as the first token of ``word`` and of ``" " + word``."""
    ids: set[int] = set()
    for target in targets or []:
        if isinstance(target, bool):
            raise SteeringError(f"target {target!r} must be a word or a token id.")
        if isinstance(target, int):
            ids.add(target)
            continue
        if not isinstance(target, str) or not target.strip():
            raise SteeringError(f"target {target!r} must be a non-empty word or a token id.")
        if tokenizer is None:
            raise SteeringError("target words need a tokenizer: pass tokenizer=... or give token ids.")
        for variant in (target.strip(), " " + target.strip()):
            encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if encoded:
                ids.add(int(encoded[0]))
    return sorted(ids)


@torch.no_grad()
def steering_sweep(
    model: nn.Module,
    sae: nn.Module | SteeringVector,
    features: int | Sequence[int] | None,
    strengths: Sequence[float | str],
    prompts: Texts,
    *,
    targets: Sequence[str | int] | None = None,
    mode: str = "add",
    units: str = "absolute",
    positions: str = "all",
    tokenizer: Any = None,
    max_new_tokens: int = 24,
    batch_size: int = 4,
    exclude_token_ids: Sequence[int] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> SweepResult:
    """Generate from ``prompts`` at each strength and report KL, target log-probability and fluency cost.

    Args:
        sae, features: the SAE and the feature id(s) steered together at each strength (``{f: s for f in
            features}``), or a :class:`~hf_sae.steering.SteeringVector` with ``features=None`` (then a strength
            multiplies the vector).
        strengths: the grid (numbers in ``units``, or strings such as ``"2x"``: multiples of each feature's peak).
        targets: words or token ids whose probability the steering should raise (optional).
        mode, units, positions, exclude_token_ids: as in :func:`hf_sae.steer`.
        max_new_tokens, generate_kwargs: the generation (greedy by default; ``generate_kwargs`` override, e.g.
            ``{"do_sample": True, "top_p": 0.9}`` with a seed set by the caller).

    Returns a :class:`SweepResult`; ``print(result)`` shows the table, ``result.plot("sweep.png")`` the figure.
    """
    if not strengths:
        raise SteeringError("strengths is empty: give the grid to sweep, e.g. [50, 100, 200, 400].")
    if isinstance(sae, SteeringVector):
        if features is not None:
            raise SteeringError("a steering vector is swept by strength alone: pass features=None.")
        what, units = repr(sae), "multiples of the vector"
    else:
        features = [features] if isinstance(features, int) else list(features or [])
        if not features:
            raise SteeringError("no features to sweep: pass a feature id or a list of them.")
        what = f"{mode} features {features} at layer {sae.config.hook_layer} {sae.config.hook_site}"
    lists, tokenizer = tokenize_texts(model, prompts, tokenizer)  # the model's tokenizer when prompts are strings
    if tokenizer is None and any(isinstance(target, str) for target in targets or []):
        tokenizer = tokenizer_for(model)  # target words need one too
    target_ids = target_token_ids(targets, tokenizer)
    generation = {"max_new_tokens": max_new_tokens, "do_sample": False, **(generate_kwargs or {})}
    options = {"positions": positions, "exclude_token_ids": exclude_token_ids}

    def make_handle(strength: float | str | None) -> SteeringHandle | None:
        if strength is None:
            return None
        if isinstance(sae, SteeringVector):
            return steer(model, sae, strength=strength_number(strength), **options)
        return steer(model, sae, dict.fromkeys(features, strength), mode=mode, units=units, **options)

    rows = []
    with eval_mode(model):
        for index, strength in enumerate([None, *strengths]):
            if progress:
                print(f"sweep {index}/{len(strengths)}: strength {strength}", flush=True)
            handle = functools.partial(make_handle, strength)
            rows.append(_score_strength(model, lists, handle, strength, target_ids, tokenizer, generation, batch_size))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else str(ids) for ids in lists]
    return SweepResult(rows, texts, what, units, target_ids)


def _left_padded(lists: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """input_ids (B, T) and attention_mask (B, T), left-padded with ``pad`` (generation appends on the right)."""
    length = max(len(ids) for ids in lists)
    input_ids = torch.full((len(lists), length), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(lists), length, dtype=torch.long)
    for row, ids in enumerate(lists):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def _score_strength(
    model: nn.Module,
    lists: list[list[int]],
    make_handle,
    strength: float | str | None,
    target_ids: list[int],
    tokenizer: Any,
    generation: dict[str, Any],
    batch_size: int,
) -> SweepRow:
    """Generate under one strength and accumulate the module docstring's sums over every prompt."""
    config = getattr(model, "generation_config", None)
    eos = _token_ids(getattr(config, "eos_token_id", None)) | _token_ids(getattr(model.config, "eos_token_id", None))
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (min(eos) if eos else 0)
    device = model_device(model)
    targets = torch.tensor(target_ids, dtype=torch.long, device=device)
    sums = torch.zeros(4, dtype=torch.float64)  # kl, target logprob, fluency, target hits
    count, texts = 0, []
    for first in range(0, len(lists), batch_size):
        input_ids, attention_mask = _left_padded(lists[first : first + batch_size], pad, device)
        prompt_length = input_ids.shape[1]
        handle = make_handle()
        try:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
                **generation,
            )
        finally:
            if handle is not None:
                handle.remove()
        generated = out.sequences[:, prompt_length:]  # (B, n)
        if generated.shape[1] == 0:
            continue
        steered = torch.stack(out.logits, 1).float().log_softmax(-1)  # (B, n, V): what generation drew from
        valid = _before_first_eos(generated, eos)  # (B, n)
        full_mask = torch.cat([attention_mask, valid.long()], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        clean_logits = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits
        clean = clean_logits[:, prompt_length - 1 : -1].float().log_softmax(-1)  # (B, n, V)
        vocab = min(steered.shape[-1], clean.shape[-1])
        steered, clean = steered[..., :vocab], clean[..., :vocab]
        kl = (steered.exp() * (steered - clean)).sum(-1)  # (B, n)
        fluency = -clean.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        if targets.numel():
            target_logprob = steered[..., targets].logsumexp(-1)
            hits = torch.isin(generated, targets).double()
        else:
            target_logprob = torch.full_like(kl, math.nan)
            hits = torch.zeros_like(kl, dtype=torch.float64)
        for i, value in enumerate((kl, target_logprob, fluency, hits)):
            sums[i] += float(value.double()[valid].sum())
        count += int(valid.sum())
        for row in range(generated.shape[0]):
            ids = generated[row][valid[row]].tolist()
            texts.append(tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else " ".join(map(str, ids)))
    means = (sums / max(count, 1)).tolist()
    if strength is None:
        means[0] = 0.0  # the unsteered model against itself (the forward's tiny rounding difference is not a KL)
    return SweepRow(strength if strength is not None else 0.0, *means, tokens=count, texts=texts)


def _before_first_eos(generated: Tensor, eos: set[int]) -> Tensor:
    """(B, n) bool: the generated tokens up to and including each row's first EOS."""
    if not eos:
        return torch.ones_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(sorted(eos), device=generated.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly before
    return ~after

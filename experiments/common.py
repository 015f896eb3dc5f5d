"""Shared helpers of the experiment scripts: the real model, held-out windows, activation harvests, LM-loss splices,
and a small SAE trainer (the training CLI's recipe) for variants the CLI does not expose.

Everything runs offline on CPU: the model is training/small_gemma.py's Gemma 3 270M, the text training/corpus.py's
English corpus (train split for training, validation split for every held-out number).
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor

from hf_sae import training_step
from hf_sae._io import atomic_path, write_json_atomic, write_text_atomic
from hf_sae.metrics import budget_metrics, dead_fraction, fvu
from hf_sae.sites import resolve_site
from hf_sae.steering import ActivationPatch, attach
from training.checkpoint import checkpoint_dirs
from training.corpus import corpus_paths
from training.data import TokenWindows
from training.harvest import ActivationHarvester
from training.saes import activation_scale, adamw_with_schedule, default_dead_tokens
from training.small_gemma import load_small_gemma

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNS = ROOT / "runs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(dtype: str = "bfloat16"):
    """The real Gemma 3 270M (bf16 by default: this CPU has native bf16, like the training CLI's ``auto``)."""
    model, tokenizer = load_small_gemma(dtype=getattr(torch, dtype))
    model.requires_grad_(False)
    return model.eval(), tokenizer


def corpus_windows(tokenizer, split: str, context_length: int = 128) -> TokenWindows:
    """A single pass over the embedded corpus ``split`` as BOS-led windows of ``context_length`` tokens (the same
    packing as the training CLI)."""
    path = str(corpus_paths()[split])

    def make():
        return datasets.load_dataset("json", data_files=path, split="train", streaming=True)

    return TokenWindows(make, tokenizer, context_length, "text", loop=False, name=f"embedded {split}")


def windows(tokenizer, split: str, n_windows: int, context_length: int = 128, skip_windows: int = 0):
    """``n_windows`` BOS-led windows of ``context_length`` tokens from the embedded corpus ``split``
    (the same packing as the training CLI). Returns (input_ids, attention_mask)."""
    stream = corpus_windows(tokenizer, split, context_length)
    ids, masks = [], []
    for _ in range(skip_windows):
        if stream.next_window() is None:
            break
    while len(ids) < n_windows:
        item = stream.next_window()
        if item is None:
            break
        ids.append(item[0])
        masks.append(item[1])
    return torch.stack(ids), torch.stack(masks)


@torch.no_grad()
def harvest(
    model,
    tokenizer,
    keys: list[tuple[int, str]],
    split: str,
    tokens: int,
    context_length: int = 128,
    lm_batch: int = 16,
    store_dtype: torch.dtype = torch.bfloat16,
    log_every: int = 50,
    skip_windows: int = 0,
) -> dict:
    """Activations of ``tokens`` kept tokens (BOS/padding excluded) at each (layer, site) of ``keys``, from the
    ``split``'s windows after the first ``skip_windows`` (e.g. the windows an activation cache holds)."""
    stream = corpus_windows(tokenizer, split, context_length)
    for _ in range(skip_windows):
        if stream.next_window() is None:
            break
    excluded = sorted({tokenizer.bos_token_id, tokenizer.pad_token_id} - {None})
    harvester = ActivationHarvester(model, [resolve_site(model, layer, site) for layer, site in keys], excluded)
    parts: dict = {key: [] for key in keys}
    rows, batches, started = 0, 0, time.perf_counter()
    while rows < tokens:
        batch = stream.next_batch(lm_batch)
        if batch is None:
            print(f"harvest: {split} ran out after {rows:,} tokens", flush=True)
            break
        kept = harvester(*batch)
        if kept is None:
            continue
        for key in keys:
            parts[key].append(kept[key].to(store_dtype))
        rows += next(iter(kept.values())).shape[0]
        batches += 1
        if batches % log_every == 0:
            print(f"harvest {split}: {rows:,}/{tokens:,} tokens, {time.perf_counter() - started:.0f} s", flush=True)
    return {key: torch.cat(chunks)[:tokens] for key, chunks in parts.items()}


def _loss_sum(logits: Tensor, input_ids: Tensor, counted: Tensor) -> Tensor:
    """Sum of CE over counted positions. Only the counted rows, contiguous along the vocabulary (the transposed
    (B, V, T) layout that hf_sae.evaluation uses is several times slower on CPU with a 262k vocabulary)."""
    rows = logits[:, :-1][counted]
    return torch.nn.functional.cross_entropy(rows.float(), input_ids[:, 1:][counted], reduction="sum")


@torch.no_grad()
def lm_losses(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    splices: dict[str, tuple[Any, int | None]],
    ablate_sae=None,
    batch_size: int = 4,
    excluded: list[int] | None = None,
) -> dict[str, float]:
    """Mean next-token loss: ``clean``, ``ablated`` (zero at ``ablate_sae``'s site) and one per splice
    ``name: (sae, k)`` (the SAE's reconstruction at budget k replaces the activation), on the same tokens.

    The same counting as ``hf_sae.evaluation.lm_loss_with_sae`` (BOS excluded, padding excluded), but the clean and
    ablated passes run once for all splices (each lm_loss_with_sae call would repeat them).
    """
    excluded = excluded if excluded is not None else [2, 0]
    totals = {name: 0.0 for name in ["clean", "ablated", *splices]}
    n = 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        kept = mask.bool() & ~torch.isin(ids, torch.tensor(excluded))
        counted = kept[:, :-1] & mask[:, 1:].bool()
        n += int(counted.sum())
        inputs = {"input_ids": ids, "attention_mask": mask}
        totals["clean"] += float(_loss_sum(model(**inputs).logits, ids, counted))
        if ablate_sae is not None:
            with ActivationPatch(model, ablate_sae, torch.zeros_like, exclude_token_ids=excluded):
                totals["ablated"] += float(_loss_sum(model(**inputs).logits, ids, counted))
        for name, (sae, k) in splices.items():
            with attach(model, sae, splice=True, k=k, exclude_token_ids=excluded):
                totals[name] += float(_loss_sum(model(**inputs).logits, ids, counted))
    return {name: total / max(n, 1) for name, total in totals.items()} | {"tokens": n}


def recovered(losses: dict[str, float], name: str) -> float:
    """CE loss recovered by the splice ``name`` of :func:`lm_losses`' result: 1 at the clean loss, 0 at the
    zero-ablated one."""
    return (losses["ablated"] - losses[name]) / (losses["ablated"] - losses["clean"])


class HeldOut:
    """The held-out evaluation of SAEs that read ``layer``'s resid, on the validation split: ``tokens`` activations
    (``x``: float32, (tokens, d_in)) for EV / L0 / dead latents, and ``lm_windows`` windows of 128 tokens
    (``input_ids``, ``attention_mask``) for the LM loss with a reconstruction spliced in."""

    def __init__(self, model, tokenizer, layer: int, tokens: int, lm_windows: int):
        key = (layer, "resid")
        self.model = model
        self.x = harvest(model, tokenizer, [key], "validation", tokens)[key].float()
        self.input_ids, self.attention_mask = windows(tokenizer, "validation", lm_windows)

    @torch.no_grad()
    def budgets(self, sae, budgets: list[int]) -> tuple[dict[str, dict[str, float]], float]:
        """The metrics of ``sae`` on ``x`` at each budget ({"8": {...}, ...}) and the fraction of its latents that
        never fire on ``x``."""
        metrics = {str(budget): values for budget, values in budget_metrics(sae, self.x, budgets).items()}
        latents = sae.encode(self.x)
        return metrics, dead_fraction(latents.indices, latents.values, sae.config.d_sae)

    def losses(self, splices: dict[str, tuple[Any, int | None]], ablate_sae) -> dict[str, float]:
        """:func:`lm_losses` on the held-out windows."""
        return lm_losses(self.model, self.input_ids, self.attention_mask, splices, ablate_sae=ablate_sae)


# ------------------------------------------------------------------------------------------- the training CLI
def training_command(
    placement: list[str],
    saes: list[str],
    *,
    d_sae: int,
    tokens: int,
    seed: int,
    eval_tokens: int,
    run: Path,
    auxk: bool = False,
    checkpoint_every: int = 0,
    keep_checkpoints: int | None = None,
    activations: Path | None = None,
) -> list[str]:
    """``python -m training.train`` as the experiments run it: ``placement`` options, one ``--sae`` per entry of
    ``saes``, batch 4096, no LM-loss evaluation, into the run folder ``run``. By default AuxK off and no checkpoints
    (the short runs); ``auxk`` keeps the package default (AuxK on), ``checkpoint_every`` steps between checkpoints
    (``keep_checkpoints`` of them kept), ``activations`` trains from a harvested cache instead of the LM."""
    command = [sys.executable, "-m", "training.train", *placement]
    if activations is not None:
        command += ["--activations", str(activations)]
    command += ["--d-sae", str(d_sae), "--tokens", str(tokens), "--batch-size", "4096"]
    for sae in saes:
        command += ["--sae", sae]
    if not auxk:
        command += ["--no-auxk"]
    command += ["--eval-lm-windows", "0", "--eval-tokens", str(eval_tokens), "--seed", str(seed)]
    command += ["--checkpoint-every", str(checkpoint_every)]
    if keep_checkpoints is not None:
        command += ["--keep-checkpoints", str(keep_checkpoints)]
    return command + ["--out", str(run), "--overwrite"]


def run_stage(command: list[str], max_seconds: float | None = None) -> bool:
    """Run ``command`` (printed) from the checkout; after ``max_seconds`` send SIGTERM (the training CLI then saves a
    checkpoint at the next step and exits). Returns True if it finished, False if it was stopped."""
    print("+", " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        code = process.wait(timeout=max_seconds)
    except subprocess.TimeoutExpired:
        print(f"stopping after {max_seconds / 60:.0f} min (SIGTERM: checkpoint at the next step)", flush=True)
        process.send_signal(signal.SIGTERM)
        code = process.wait()
        if code in (0, 128 + signal.SIGTERM):
            return code == 0
    if code != 0:
        raise subprocess.CalledProcessError(code, command)
    return True


def train_from_cache(
    cache: Path, harvest: list[str], run: Path, train: list[str], max_seconds: float | None = None
) -> bool:
    """Finish the activation cache (``harvest``: its harvest or --resume command) if it is missing or unfinished, then
    train into ``run`` (the ``train`` command, or --resume from its newest checkpoint) unless it finished already;
    ``max_seconds`` as :func:`run_stage` (counted from here, at least a minute of training). Returns True when the
    run has finished."""
    if (run / "metrics.json").exists():
        return True
    started = time.perf_counter()
    if not (cache / "manifest.json").exists() or (cache / "harvest_state.json").exists():
        run_stage(harvest)
    resume = run.exists() and bool(checkpoint_dirs(run))
    command = [sys.executable, "-m", "training.train", "--resume", str(run)] if resume else train
    left = None if max_seconds is None else max(max_seconds - (time.perf_counter() - started), 60.0)
    return run_stage(command, left)


def command_text(command: list[str]) -> str:
    """A training command as docs/results.md shows it: without the interpreter, paths relative to the checkout."""
    return " ".join(command[1:]).replace(str(ROOT) + "/", "").replace(str(Path.home()), "~")


@torch.no_grad()
def same_index_rates(saes: dict) -> dict[str, float]:
    """For each pair of SAEs of the run: the share of A's latents whose most similar decoder row in B (cosine) has
    the same index. Independent initialisations give ~1/d_sae; a shared initialisation leaves many latents where
    they started, so this is the check that no SAE of a multi-SAE run reused another's draw."""
    rates = {}
    labels = list(saes)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            wa = torch.nn.functional.normalize(saes[a].W_dec.float(), dim=-1)
            wb = torch.nn.functional.normalize(saes[b].W_dec.float(), dim=-1)
            best = (wa @ wb.T).argmax(dim=1)
            rates[f"{a}/{b}"] = float((best == torch.arange(best.numel())).float().mean())
    return rates


# ------------------------------------------------------------------------------------------------ a small trainer
def train_sae(
    sae,
    data: Tensor,
    tokens: int,
    batch_size: int = 4096,
    lr: float | None = None,
    seed: int = 0,
    warmup_fraction: float = 0.1,
    lr_min: float = 1e-6,
    max_grad_norm: float = 1.0,
    b_dec_init: str = "geometric_median",
    log_every: int = 25,
    name: str = "sae",
) -> dict[str, Any]:
    """Train ``sae`` on rows of ``data`` (raw activations, (N, d_in)) with the training CLI's recipe: activation
    scale s (E||s x||² = d_in from the first 16k rows), b_dec init, AdamW at the architecture's default learning
    rate (``default_learning_rate``: 8e-4 / sqrt(d_sae / 2^14)), 10% linear warm-up then cosine to ``lr_min``,
    gradient clipping 1.0, decoder maintenance (``hf_sae.training_step``), AuxK as configured; the scale is folded at
    the end (raw-unit SAE).

    Rows are drawn in a seeded random order, without replacement while ``tokens`` <= N (wraps around beyond).
    Returns timing: seconds of SAE steps only (data already in memory), tokens, steps.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(tokens / batch_size)
    first = data[:16384].float()
    scale = activation_scale(first)
    sae.config.activation_scale = scale
    sae.config.activation_scale_folded = False
    sae.config.dead_tokens = default_dead_tokens(tokens, batch_size)
    if b_dec_init != "zeros":
        sae.initialize_b_dec(first[:4096] * scale, method=b_dec_init)
    sae.train()
    sae.check_finite = False
    lr = lr or sae.default_learning_rate(sae.config)
    optimizer, scheduler = adamw_with_schedule(
        [{"params": sae.parameters(), "lr": lr}],
        steps,
        lr=lr,  # one SAE: decay to lr_min itself
        weight_decay=0.01,  # torch's AdamW default, which the runs on docs/results.md used (the CLI uses 0)
        warmup_fraction=warmup_fraction,
        lr_min=lr_min,
    )
    order = torch.randperm(data.shape[0], generator=generator)
    seconds, position = 0.0, 0
    for step in range(steps):
        if position + batch_size > order.numel():
            order = torch.randperm(data.shape[0], generator=generator)
            position = 0
        x = data[order[position : position + batch_size]].float()  # raw: the unfolded SAE scales its own input
        position += batch_size
        started = time.perf_counter()
        out = training_step(sae, optimizer, x, max_grad_norm=max_grad_norm, scheduler=scheduler)
        seconds += time.perf_counter() - started
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(
                f"{name}: step {step + 1}/{steps} loss {float(out.loss):.4f} "
                f"fvu {fvu(x, out.output.reconstruction):.3f}"
                f" dead {100 * float(sae.dead_mask().float().mean()):.1f}% ({seconds:.0f} s)",
                flush=True,
            )
    dead = float(sae.dead_mask().float().mean())
    sae.eval()
    sae.check_finite = True
    sae.config.tokens_trained = steps * batch_size
    sae.fold_activation_scale()
    return {
        "seconds": seconds,
        "tokens": steps * batch_size,
        "steps": steps,
        "seconds_per_million_tokens": 1e6 * seconds / (steps * batch_size),
        "dead_fraction_train": dead,
    }


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically (values JSON cannot hold are written with str)."""
    write_json_atomic(path, data)


def save_figure(fig, path: Path, dpi: int = 130) -> None:
    """A matplotlib figure as PNG at ``path``, written atomically, then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- seed statistics
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95%, by degrees of freedom


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else float("nan")
    return mean, math.sqrt(var)


def pm(values: list[float], digits: int = 4, unit: str = "") -> str:
    """mean ± sample std over seeds ("(1 seed)" when there is one), ``unit`` after each number."""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit} (1 seed)"
    return f"{mean:.{digits}f}{unit} ± {std:.{digits}f}{unit}"


def paired_stats(deltas: dict[int, float]) -> dict[str, Any]:
    """Paired differences by seed (seed -> a − b): their mean, std, the paired t statistic, the half-width of the
    two-sided 95% confidence interval of the mean and whether it excludes zero (the difference is larger than the
    seed spread)."""
    values = list(deltas.values())
    mean, std = mean_std(values)
    n = len(values)
    if n > 1 and std > 0:
        t = mean / (std / math.sqrt(n))
    else:  # one seed: no spread; identical differences: as far beyond the spread as can be (unless all zero)
        t = float("nan") if n == 1 or mean == 0 else math.copysign(math.inf, mean)
    half = T_CRITICAL.get(n - 1, 2.0) * std / math.sqrt(n) if n > 1 else float("nan")
    significant = n > 1 and abs(t) > T_CRITICAL.get(n - 1, 2.0)
    return {"per_seed": deltas, "mean": mean, "std": std, "n": n, "t": t, "ci95": half, "significant": significant}


RESULTS = DOCS / "results.md"
SECTION_ORDER = ["intro", "pareto", "kron", "flow", "bench", "synthetic", "interp", "missing"]


def update_results(section: str, text: str) -> None:
    """Replace (or add) the ``section`` block of docs/results.md, keeping the other experiments' blocks."""
    current = RESULTS.read_text() if RESULTS.exists() else ""
    blocks = {}
    for name in SECTION_ORDER:
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        if begin in current and end in current:
            blocks[name] = current.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    blocks[section] = text.strip("\n")
    parts = [f"<!-- BEGIN {name} -->\n{blocks[name]}\n<!-- END {name} -->" for name in SECTION_ORDER if name in blocks]
    write_text_atomic(RESULTS, "\n\n".join(parts) + "\n")

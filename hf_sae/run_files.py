"""The files of a training run folder, and the metrics schema: training writes them, cards and pushes read them.

A run folder (``python -m training.train --out RUN``) holds::

    RUN/config.json, model.safetensors       the SAE (a single-SAE run); one subfolder per SAE in a multi-SAE run
    RUN/metrics.json                         RunMetrics (below)
    RUN/command.txt                          the command line that trained it (for the card)
    RUN/budget_curves.png                    EV and L0 against the budget k' (copied next to each SAE)
    RUN/README.md                            the generated model card (next to each SAE)
    RUN/train_config.yaml                    the training config (resume reads it)
    RUN/checkpoints/step-00000050/           checkpoints: sae_<i>/ folders and the trainer state

``metrics.json`` is a :class:`RunMetrics`: ``{"run": RunInfo, "saes": {name: SAEMetrics}}``. The card of one SAE reads
its :class:`SAEMetrics` (:func:`sae_metrics` narrows a run's metrics to it); ``push_sae(metrics=...)`` takes the same
shape. Every key is optional to a reader.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from ._io import write_json_atomic, write_text_atomic
from .errors import HfSaeError

METRICS_FILE = "metrics.json"
COMMAND_FILE = "command.txt"
PLOT_FILE = "budget_curves.png"
CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"(?:step|checkpoint|ckpt)[-_]?(\d+)$")


class BudgetMetrics(TypedDict, total=False):
    """Reconstruction quality at one budget k' on held-out activations."""

    explained_variance: float  # 1 - FVU
    fvu: float  # fraction of variance unexplained, ||x - x̂||² / ||x - mean(x)||²
    l0: float  # mean number of non-zero latents per token
    shrinkage: float  # mean ||x̂|| / ||x||
    dead_fraction: float


class LMLossMetrics(TypedDict, total=False):
    """The language model's loss with the SAE spliced in (hf_sae.evaluation.LMLossResult.as_dict())."""

    clean_loss: float
    spliced_loss: float
    ablated_loss: float
    delta_loss: float
    ce_loss_recovered: float


class SAEMetrics(TypedDict, total=False):
    """One SAE's entry of ``metrics.json``; also what ``push_sae(metrics=...)`` and the card accept."""

    path: str  # the SAE's folder
    layer: int
    site: str
    arch: str
    d_sae: int
    k: int
    activation_scale: float
    budgets: dict[str, BudgetMetrics]  # str(k') -> metrics
    dead_fraction: float  # by the training counters
    dead_fraction_eval: float  # never fired on the held-out tokens (the card prefers it)
    eval_tokens: int
    eval_dataset: str
    tokens_trained: int
    lm_loss: LMLossMetrics | None
    # Metrics passed by hand (push_sae(metrics=...)) may give the numbers at k and the LM loss at the top level:
    explained_variance: float
    fvu: float
    l0: float
    ce_loss_recovered: float
    command: str
    limitations: list[str]
    license: str
    run: RunInfo  # added by sae_metrics() when narrowed from a run's metrics


class RunInfo(TypedDict, total=False):
    """The ``run`` entry of ``metrics.json``: what was trained on what, how long it took."""

    model: str
    dataset: str
    tokens: int
    steps: int
    batch_size: int
    processes: int
    device: str
    setup_seconds: float
    train_seconds: float
    evaluation_seconds: float
    tokens_per_second: float | None
    skipped_steps: int
    dead_tokens: int
    context_length: int
    excluded_token_ids: list[int]
    eval_lm_windows: int
    command: str
    quantized_from: str  # the weights were dequantised from this (e.g. the embedded model's Q4_K_M GGUF)
    resumed_at_step: int  # a resumed session: where it started, and its own speed beside the whole run's
    session_tokens_per_second: float


class RunMetrics(TypedDict):
    run: RunInfo
    saes: dict[str, SAEMetrics]


# --------------------------------------------------------------------------------------------------- writing
def write_run_metrics(run_dir: str | Path, metrics: RunMetrics) -> Path:
    """Write ``RUN/metrics.json`` atomically."""
    return write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


def write_command(run_dir: str | Path, argv: Sequence[str] | str) -> Path:
    """Write ``RUN/command.txt``: the command line that trained the run (an argv list is shell-quoted)."""
    text = argv if isinstance(argv, str) else shlex.join(list(argv))
    return write_text_atomic(Path(run_dir) / COMMAND_FILE, text.strip() + "\n")


# --------------------------------------------------------------------------------------------------- reading
def sae_metrics(metrics: Mapping[str, Any] | None, sae_folder: str | Path | None = None) -> dict[str, Any] | None:
    """One SAE's metrics out of a run's metrics.

    A :class:`RunMetrics` is narrowed to the entry of the SAE saved in ``sae_folder`` (matched by folder name or
    path, or the only entry), with ``"run"`` kept beside it. Any other mapping is already one SAE's metrics.
    """
    if not metrics or not isinstance(metrics.get("saes"), Mapping):
        return dict(metrics) if metrics else None
    entries = metrics["saes"]
    chosen = None
    if sae_folder is not None:
        folder = Path(sae_folder)
        for name, entry in entries.items():
            path = entry.get("path") if isinstance(entry, Mapping) else None
            if name == folder.name or (path and Path(path).resolve() == folder.resolve()):
                chosen = entry
                break
    if chosen is None and len(entries) == 1:
        chosen = next(iter(entries.values()))
    if chosen is None:
        return None
    return {"run": metrics.get("run") or {}, **chosen}


def read_run_metrics(run_dir: str | Path | None, sae_folder: str | Path | None = None) -> dict[str, Any] | None:
    """The metrics of the SAE in ``sae_folder`` (default ``run_dir``) from ``run_dir/metrics.json``; None if none."""
    if run_dir is None:
        return None
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HfSaeError(f"{path}: not valid JSON ({err}); fix or delete it before generating the card.") from None
    return sae_metrics(raw, sae_folder if sae_folder is not None else run_dir)


def folder_metrics(sae_folder: str | Path, run_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The metrics of the SAE saved in ``sae_folder``: its own metrics.json, else its entry in ``run_dir``'s."""
    return read_run_metrics(sae_folder) or read_run_metrics(run_dir, sae_folder=sae_folder)


def find_plot(run_dir: str | Path | None) -> Path | None:
    """The run's EV/L0-vs-budget plot, if it made one."""
    if run_dir is None or not (Path(run_dir) / PLOT_FILE).is_file():
        return None
    return Path(run_dir) / PLOT_FILE


def read_command(run_dir: str | Path | None) -> str | None:
    """The command line in ``run_dir/command.txt``, if training wrote one."""
    if run_dir is None or not (Path(run_dir) / COMMAND_FILE).is_file():
        return None
    return (Path(run_dir) / COMMAND_FILE).read_text().strip() or None


def is_sae_folder(path: str | Path, model_types: Sequence[str]) -> bool:
    """Whether ``path`` holds an SAE: config.json of one of ``model_types`` beside model.safetensors."""
    path = Path(path)
    config = path / "config.json"
    if not (config.is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in model_types
    except (json.JSONDecodeError, OSError):
        return False


def sae_folders(folder: str | Path, model_types: Sequence[str]) -> list[Path]:
    """SAE folders at ``folder`` itself, else in ``final/`` or ``sae/``, else its direct subfolders (multi-SAE)."""
    folder = Path(folder)
    if is_sae_folder(folder, model_types):
        return [folder]
    for name in ("final", "sae"):
        if is_sae_folder(folder / name, model_types):
            return [folder / name]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_sae_folder(p, model_types))


def find_checkpoints(run_dir: str | Path, model_types: Sequence[str]) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints that hold SAEs, oldest first (``checkpoints/step-00000050``; also
    ``step_N``, ``checkpoint-N`` there or in the run folder itself)."""
    run_dir = Path(run_dir)
    found = []
    for parent in (run_dir / CHECKPOINTS, run_dir):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            match = _STEP.search(path.name)
            if path.is_dir() and match and sae_folders(path, model_types):
                found.append((int(match.group(1)), path))
    return sorted(set(found))

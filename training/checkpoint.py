"""Training checkpoints, written atomically: a run folder's ``checkpoints/step-XXXXXXXX/`` holds

    sae_<i>/                     each SAE (save_pretrained: config.json with the activation scale, model.safetensors)
    sae_state.safetensors        each SAE's dead-latent counters (tokens since each latent last fired)
    optimizer.pt, scheduler.pt   AdamW moments and step, learning-rate schedule position
    process_states.pt            per process: shuffle-buffer / data position and RNG states (torch, numpy, python, cuda)
    trainer_state.json           step, tokens, counters, number of processes, the data files' sizes and times
    train_config.yaml            the run's config
    manifest.json                written last: every other file's size and sha256

Everything is written into a temporary sibling folder that is fsync-ed and renamed into place when complete
(:func:`hf_sae._io.atomic_dir`), so a crash or a SIGKILL at any moment leaves the previous checkpoints untouched; only
the newest ``keep`` are kept, and an old one is renamed to a temporary name before it is deleted (a kill while
pruning never leaves part of a checkpoint under a valid name). Only the main process writes (the other processes'
states are gathered to it first). Resume reads the newest checkpoint whose files match its manifest
(:func:`newest_intact_checkpoint`), so a damaged one (a disk error, a truncated copy) is passed over, not loaded.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_sae._io import atomic_dir, remove_tree, sha256_of
from hf_sae.errors import ResumeError
from hf_sae.run_files import CHECKPOINTS

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d{8})")
MANIFEST = "manifest.json"
# What a checkpoint written before manifests held (checked by presence and size when there is no manifest).
LEGACY_FILES = ("sae_state.safetensors", "optimizer.pt", "scheduler.pt", "process_states.pt", "trainer_state.json")
DAMAGED_SUFFIX = ".damaged"


# ----------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- save / load
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder's (``step-00000050``)."""
    return _STEP_DIR.fullmatch(name) is not None


def step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(Path(path).name).group(1))


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: {relative path: {bytes, sha256}} of every file in ``folder`` (written last)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def checkpoint_problem(path: Path, hashes: bool = True) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (None: every file matches its manifest; ``hashes=False``
    compares sizes only, for a quick look)."""
    path = Path(path)
    try:
        entries = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:  # written before checkpoints had manifests (the folder itself is renamed in complete)
        empty = [name for name in LEGACY_FILES if not (path / name).is_file() or not (path / name).stat().st_size]
        return f"no {MANIFEST}, and {', '.join(empty)} missing or empty" if empty else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__}: {error})"
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}"
        if hashes and sha256_of(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the same size, other bytes)"
    return None


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint whose files match its manifest or None, [(newer damaged checkpoint, problem)])."""
    damaged = []
    for path in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_damaged_aside(damaged: list[tuple[Path, str]]) -> None:
    """Rename damaged checkpoints to ``step-N.damaged`` (kept to look at; no longer a checkpoint of the run)."""
    for path, _ in damaged:
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        if aside.exists():
            remove_tree(aside)
        path.rename(aside)
        logger.warning("moved the damaged checkpoint %s to %s (delete it once you have looked at it)", path, aside)


def saved_state(run_dir: Path | None) -> str:
    """One sentence: which checkpoint of ``run_dir`` a resume would continue from, or that there is none."""
    for path in reversed(checkpoint_dirs(run_dir) if run_dir is not None else []):
        if checkpoint_problem(path, hashes=False) is None:
            return (
                f"The newest checkpoint, {path} (step {step_of(path)}) is intact; continue with: "
                f"python -m training.train --resume {run_dir}"
            )
    return "No checkpoint was written yet, so there is nothing to resume: run the same command again."


def save_checkpoint(
    run_dir: Path,
    step: int,
    saes: list,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    process_states: list[dict[str, Any]],
    config_yaml: str,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``. Main process only."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step again (a resumed run that had already finished): identical content
        if checkpoint_problem(final) is None:
            return final
        remove_tree(final)  # a damaged one of an earlier session
    with atomic_dir(final) as tmp:
        for i, sae in enumerate(saes):
            sae.save_pretrained(tmp / f"sae_{i}")
        save_file(
            {
                f"sae_{i}.tokens_since_fired": sae.tokens_since_fired.detach().cpu().contiguous()
                for i, sae in enumerate(saes)
            },
            str(tmp / "sae_state.safetensors"),
        )
        # a latent-parallel run passes the state gathered to whole SAEs (a dict), the others the optimiser
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(process_states, tmp / "process_states.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / "train_config.yaml").write_text(config_yaml)
        _write_manifest(tmp)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_tree(old)
    return final


def load_checkpoint(path: Path, sae_classes: list[type], device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`: SAEs (on ``device``, counters restored), the optimizer
    and scheduler state dicts, the per-process states and the trainer state."""
    path = Path(path)
    try:
        counters = load_file(str(path / "sae_state.safetensors"))
        saes = []
        for i, cls in enumerate(sae_classes):
            sae = cls.from_pretrained(path / f"sae_{i}").to(device)
            with torch.no_grad():
                # Tensors read from safetensors may sit at 8-byte offsets; BLAS picks other code paths (other
                # rounding) for such memory than for the 64-byte-aligned tensors of an uninterrupted run.
                # Re-allocate them so a resumed CPU run stays bit-identical.
                for param in sae.parameters():
                    param.data = param.data.clone(memory_format=torch.contiguous_format)
            sae.tokens_since_fired.copy_(counters[f"sae_{i}.tokens_since_fired"].to(device))
            saes.append(sae)
        return {
            "saes": saes,
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
            "process_states": torch.load(path / "process_states.pt", map_location="cpu", weights_only=True),
            "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        }
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ResumeError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {first_line}), although its files match "
            f"its manifest. Move it aside (e.g. rename it to {path.name}{DAMAGED_SUFFIX}) to resume from the one "
            "before it."
        ) from None

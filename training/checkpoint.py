"""Training checkpoints, written atomically: a run folder's ``checkpoints/step-XXXXXXXX/`` holds

    sae_<i>/                     each SAE (save_pretrained: config.json with the activation scale, model.safetensors)
    sae_state.safetensors        each SAE's dead-latent counters (tokens since each latent last fired)
    optimizer.pt, scheduler.pt   AdamW moments and step, learning-rate schedule position
    process_states.pt            per process: shuffle-buffer / data position and RNG states (torch, numpy, python, cuda)
    trainer_state.json           step, tokens, counters, number of processes
    train_config.yaml            the run's config

Everything is written into a temporary sibling folder that is renamed into place when complete
(:func:`hf_sae._io.atomic_dir`), so a crash or a SIGKILL at any moment leaves the previous checkpoints untouched; only
the newest ``keep`` are kept. Only the main process writes (the other processes' states are gathered to it first).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_sae._io import atomic_dir
from hf_sae.run_files import CHECKPOINTS

_STEP_DIR = re.compile(r"step-(\d{8})")


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
        return final
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
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(process_states, tmp / "process_states.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / "train_config.yaml").write_text(config_yaml)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, sae_classes: list[type], device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`: SAEs (on ``device``, counters restored), the optimizer
    and scheduler state dicts, the per-process states and the trainer state."""
    path = Path(path)
    counters = load_file(str(path / "sae_state.safetensors"))
    saes = []
    for i, cls in enumerate(sae_classes):
        sae = cls.from_pretrained(path / f"sae_{i}").to(device)
        with torch.no_grad():
            # Tensors read from safetensors may sit at 8-byte offsets; BLAS picks other code paths (other rounding)
            # for such memory than for the 64-byte-aligned tensors of an uninterrupted run. Re-allocate them so a
            # resumed CPU run stays bit-identical.
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

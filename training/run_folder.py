"""The run folder: where a run writes, that a new run never overwrites an old one, and what ``--resume`` continues.

Layout: see :mod:`hf_sae.run_files` (the SAE(s), metrics.json, command.txt, the plot, the card, train_config.yaml,
checkpoints/).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_sae._io import remove_stale_temporaries
from hf_sae.errors import ResumeError, TrainConfigError

from . import checkpoint as ckpt
from .cli import load_yaml
from .config import SAESpec, TrainConfig, config_differences, make_config

TRAIN_CONFIG = "train_config.yaml"


def resolve_resume(cfg: TrainConfig, explicit: dict[str, Any]) -> tuple[TrainConfig, Path | None]:
    """With --resume: the saved config (refusing options that would change training) and the newest checkpoint."""
    if not cfg.resume:
        return cfg, None
    run_dir = Path(cfg.resume)
    saved_path = run_dir / TRAIN_CONFIG
    if not saved_path.is_file():
        raise ResumeError(
            f"--resume {run_dir}: no {TRAIN_CONFIG} there, so it is not a training run folder (or its first "
            "checkpoint was never written). Pass the --out folder of an earlier run, or start a new run."
        )
    saved = make_config(load_yaml(saved_path))
    differences = config_differences(saved, explicit)
    if differences:
        listed = "; ".join(f"{name}: run has {old!r}, you passed {new!r}" for name, (old, new) in differences.items())
        raise ResumeError(
            f"--resume {run_dir}: the run was trained with a different config ({listed}). Drop those options to "
            "continue it, or start a new run with another --out."
        )
    may_change = {name: value for name, value in explicit.items() if name not in differences and name != "saes"}
    may_change = {name: value for name, value in may_change.items() if hasattr(saved, name)}
    cfg = make_config({**may_change, "resume": str(run_dir), "out": str(run_dir)}, base=saved)
    checkpoint_dir = ckpt.latest_checkpoint(run_dir)
    if checkpoint_dir is None:
        raise ResumeError(
            f"--resume {run_dir}: no complete checkpoint in {run_dir / ckpt.CHECKPOINTS} (the run stopped before "
            "its first one). Start it again without --resume (add --overwrite to reuse the folder)."
        )
    return cfg, checkpoint_dir


def run_name(cfg: TrainConfig, specs: list[SAESpec], model_name: str) -> str:
    """``--name``, else <model>-L<layer>-<site>-<arch>-d<d_sae>-k<k> (one SAE) or <model>-<n>saes."""
    if cfg.name:
        return cfg.name
    short = model_name.rstrip("/").split("/")[-1]
    if len(specs) > 1:
        return f"{short}-{len(specs)}saes"
    spec = specs[0]
    return f"{short}-L{spec.layer}-{spec.site}-{spec.arch}-d{spec.config.get('d_sae')}-k{spec.config.get('k')}"


def check_run_dir_is_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier run unless ``--overwrite``."""
    if not overwrite and run_dir.exists() and any(run_dir.iterdir()):
        raise TrainConfigError(
            f"{run_dir} already exists and is not empty. Continue that run with --resume {run_dir}, pick "
            "another --out / --name, or pass --overwrite to replace it."
        )


def prepare_run_dir(
    cfg: TrainConfig, specs: list[SAESpec], model_name: str, accelerator: Accelerator, resuming: bool
) -> Path:
    """runs/<name> (or --out), checked so that a new run never overwrites an old one unless --overwrite."""
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / run_name(cfg, specs, model_name)
    if accelerator.is_main_process and not resuming and run_dir.exists() and any(run_dir.iterdir()):
        check_run_dir_is_free(run_dir, cfg.overwrite)
        shutil.rmtree(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resuming:  # what writes killed midway left behind
            remove_stale_temporaries(run_dir)
            remove_stale_temporaries(run_dir / ckpt.CHECKPOINTS)
    accelerator.wait_for_everyone()
    return run_dir

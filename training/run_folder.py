"""The run folder: where a run writes, that a new run never replaces an old one, that one session at a time works in
it, and what ``--resume`` continues.

Layout: see :mod:`hf_sae.run_files` (the SAE(s), metrics.json, command.txt, the plot, the card, train_config.yaml,
checkpoints/), plus ``.hf-sae.lock`` (held by the session working in it) and ``.hf-sae.lock.json`` (who that is).

A folder *holds a run* once it has a checkpoint, a finished SAE or metrics.json; a folder with none of them (what a
start stopped before its first checkpoint leaves, or an empty mount point) is free: a new run may use it without
``--overwrite``. A session checks everything (model, sites, data, memory) before it writes anything there
(:meth:`RunFolder.prepare`), so a failed start leaves an old run as it was and a new folder not created at all.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from hf_sae._io import remove_stale_temporaries, remove_tree, write_json_atomic
from hf_sae.errors import HfSaeError, ResumeError, RunLockedError, TrainConfigError
from hf_sae.registry import import_architectures
from hf_sae.run_files import COMMAND_FILE, METRICS_FILE, write_command

from . import checkpoint as ckpt
from .cli import load_yaml, save_yaml
from .config import SAESpec, TrainConfig, config_differences, make_config

logger = logging.getLogger(__name__)

TRAIN_CONFIG = "train_config.yaml"
LOCK_FILE = ".hf-sae.lock"
HOLDER_FILE = ".hf-sae.lock.json"
_LOCKS = (LOCK_FILE, HOLDER_FILE)


def training_command(argv: list[str] | None = None) -> str:
    """The command line of this process, as it will be recorded (``python -m training.train ...``)."""
    return ("python -m training.train " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()


# ------------------------------------------------------------------------------------------------ what is there
def _contents(run_dir: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if p.name not in _LOCKS)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"


def run_in(run_dir: Path) -> str | None:
    """What makes ``run_dir`` a run (its checkpoints, a finished SAE, metrics.json), or None when it holds none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = []
    if checkpoints := ckpt.checkpoint_dirs(run_dir):
        found.append(f"checkpoints up to {checkpoints[-1].name}")
    if any((p / "model.safetensors").is_file() for p in (run_dir, *(q for q in run_dir.iterdir() if q.is_dir()))):
        found.append("a finished SAE")
    if (run_dir / METRICS_FILE).is_file():
        found.append(METRICS_FILE)
    return ", ".join(found) or None


def check_run_dir_is_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless ``--overwrite`` (a folder without one is reused as it is)."""
    held = run_in(run_dir)
    if held and not overwrite:
        raise TrainConfigError(
            f"{run_dir} already exists and holds a run ({held}). Continue that run with --resume {run_dir}, pick "
            "another --out / --name, or pass --overwrite to replace it."
        )


def resolve_resume(cfg: TrainConfig, explicit: dict[str, Any]) -> TrainConfig:
    """With --resume: the saved config (refusing options that would change training, or another --out), checked
    to have at least one checkpoint; which one is read is chosen under the lock (:meth:`RunFolder.checkpoint`)."""
    if not cfg.resume:
        return cfg
    run_dir = Path(cfg.resume)
    if ckpt.is_checkpoint_name(run_dir.name) or run_dir.name == ckpt.CHECKPOINTS:
        run = run_dir.parent if run_dir.name == ckpt.CHECKPOINTS else run_dir.parent.parent
        raise ResumeError(
            f"--resume {run_dir} is a checkpoint folder; a resume continues a run from its newest intact "
            f"checkpoint, so pass the run folder: --resume {run}"
        )
    saved_path = run_dir / TRAIN_CONFIG
    if not saved_path.is_file():
        raise ResumeError(
            f"--resume {run_dir}: no {TRAIN_CONFIG} there, so it is not a training run folder. Pass the --out "
            "folder of an earlier run, or start a new run."
        )
    out = explicit.get("out")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ResumeError(
            f"--out {out} differs from the run folder --resume {run_dir}: a resumed run continues in its own "
            "folder. Drop --out, or copy the run folder there and resume the copy."
        )
    saved_values = load_yaml(saved_path)
    for target in saved_values.get("imports") or []:  # the run's own architectures, registered before reading it
        import_architectures(target)
    saved = make_config(saved_values)
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
    if not ckpt.checkpoint_dirs(run_dir):
        raise ResumeError(
            f"--resume {run_dir}: no checkpoint yet (the run stopped before its first one, due at step "
            f"{cfg.checkpoint_every or 'the end'}); the folder holds {_contents(run_dir)}. A folder without a "
            "checkpoint is no run yet: start it again with the command that began it, without --resume."
        )
    return cfg


def run_name(cfg: TrainConfig, specs: list[SAESpec], model_name: str) -> str:
    """``--name``, else <model>-L<layer>-<site>-<arch>-d<d_sae>-k<k> (one SAE) or <model>-<n>saes."""
    if cfg.name:
        return cfg.name
    short = model_name.rstrip("/").split("/")[-1]
    if len(specs) > 1:
        return f"{short}-{len(specs)}saes"
    spec = specs[0]
    return f"{short}-L{spec.layer}-{spec.site}-{spec.arch}-d{spec.config.get('d_sae')}-k{spec.config.get('k')}"


def run_dir_of(cfg: TrainConfig, specs: list[SAESpec], model_name: str) -> Path:
    """--out, else runs/<name>."""
    return Path(cfg.out) if cfg.out else Path("runs") / run_name(cfg, specs, model_name)


# ---------------------------------------------------------------------------------------------------- the lock
@contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``run_dir``'s lock (created with the folder if need be), or raise :class:`RunLockedError` naming the
    holder. The operating system drops the lock when its process dies, even by SIGKILL."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads((run_dir / HOLDER_FILE).read_text())
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}: {holder['command']}"
        except (OSError, ValueError, KeyError):
            who = "its pid is not recorded"
        raise RunLockedError(
            f"{run_dir} is in use by another hf-sae process ({who}). Two sessions of one run would overwrite each "
            "other's checkpoints: wait for that one to end or stop it, or pick another --out."
        ) from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": training_command(),
        }
        write_json_atomic(run_dir / HOLDER_FILE, holder)
        yield
    finally:
        (run_dir / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


# ------------------------------------------------------------------------------------------------ the session
class RunFolder:
    """This session's run folder, as a context manager (entered by every process).

    Entering locks it (the main process) and checks that a new run does not replace a run there without
    ``--overwrite``; nothing is written into it before :meth:`prepare`. Leaving unlocks it and removes the folder
    if this session created it and a failed start left nothing in it. A failure after :meth:`prepare` has its
    message completed with the checkpoint a resume would continue from (or that there is none).
    """

    def __init__(self, path: Path, cfg: TrainConfig, accelerator: Accelerator):
        self.path, self.cfg, self.accelerator = Path(path), cfg, accelerator
        self.resuming = cfg.resume is not None
        self.created: Path | None = None  # the outermost folder this session creates (the run folder or a parent)
        self.prepared = False
        self.damaged: list[tuple[Path, str]] = []
        self._lock = ExitStack()

    def __enter__(self) -> RunFolder:
        if self.accelerator.is_main_process:
            missing = [folder for folder in (self.path, *self.path.parents) if not folder.exists()]
            self.created = missing[-1] if missing else None
            self._lock.enter_context(lock_run_dir(self.path))
            try:
                if not self.resuming:
                    check_run_dir_is_free(self.path, self.cfg.overwrite)
            except BaseException as error:
                self.__exit__(type(error), error, error.__traceback__)
                raise
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, HfSaeError) and self.prepared:
            error.args = (f"{error} {ckpt.saved_state(self.path)}",)
        self._lock.close()
        if self.created is not None and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= set(_LOCKS):
            for name in _LOCKS:  # a failed start: the folders it made go again
                (self.path / name).unlink(missing_ok=True)
            for folder in (self.path, *self.path.parents):
                with suppress(OSError):
                    folder.rmdir()
                if folder == self.created:
                    break
        return False

    def checkpoint(self) -> Path | None:
        """The checkpoint to resume from: the newest whose files match its manifest (the main process checks and
        tells the others), or None for a new run. Damaged newer ones are reported (and set aside by :meth:`prepare`)."""
        if not self.resuming:
            return None
        found: list[str | None] = [None]
        if self.accelerator.is_main_process:
            chosen, self.damaged = ckpt.newest_intact_checkpoint(self.path)
            for path, problem in self.damaged:
                instead = f"; resuming from {chosen.name} instead" if chosen is not None else ""
                logger.warning("checkpoint %s is damaged (%s)%s", path, problem, instead)
            found = [str(chosen) if chosen is not None else None]
        chosen = broadcast_object_list(found)[0]
        if chosen is None:
            listed = "; ".join(f"{path.name}: {problem}" for path, problem in self.damaged) or "see the main process"
            raise ResumeError(
                f"--resume {self.path}: no intact checkpoint ({listed}). Start the run again without --resume "
                "(with --overwrite, as the folder holds damaged checkpoints)."
            )
        return Path(chosen)

    def prepare(self, cfg: TrainConfig) -> str | None:
        """Write into the folder, now that the start is checked: --overwrite clears the old run (in place: the folder
        may be a mount point), damaged checkpoints are set aside, what killed writes left is removed, and
        train_config.yaml (every session) and command.txt (the first session only) are written. Returns the
        config's YAML text (main process)."""
        text = None
        if self.accelerator.is_main_process:
            if self.resuming:
                ckpt.set_damaged_aside(self.damaged)
            elif self.cfg.overwrite:
                for item in self.path.iterdir():
                    if item.is_dir():
                        remove_tree(item)
                    elif item.name not in _LOCKS:
                        item.unlink()
            remove_stale_temporaries(self.path)
            remove_stale_temporaries(self.path / ckpt.CHECKPOINTS)
            text = save_yaml(cfg, self.path / TRAIN_CONFIG)
            if not self.resuming or not (self.path / COMMAND_FILE).is_file():
                write_command(self.path, training_command())
        self.prepared = True
        self.accelerator.wait_for_everyone()
        return text

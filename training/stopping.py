"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM (preemption, ``kill``, Slurm, Kubernetes).

During setup a signal stops the run at once: nothing has been written yet (see :mod:`training.run_folder`). From the
first step on it is only recorded, a Python bool with no cost per step, and the loop stops at the next step boundary
after saving a checkpoint there, so no step is lost. With several processes the decision is agreed: every
``log_every`` steps (steps that already wait for the GPU to log) and at checkpoints the processes all-reduce their
flags, so all of them stop after the same step, even when only one was signalled, and none is left waiting in a
collective. One process needs no collective. After the last step a signal stops at once again (the final checkpoint
is saved).

The run then raises :class:`hf_sae.errors.RunInterrupted`; ``python -m training.train`` prints its one line (what was
saved and the ``--resume`` command) and exits with the shell's status for the signal: 130 for SIGINT, 143 for
SIGTERM. Further signals while stopping are ignored (a ``kill -9`` ends it at once; checkpoints stay intact).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_sae.errors import RunInterrupted

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT / SIGTERM handlers for the length of a run (a context manager; only the main thread can have them)."""

    def __init__(self, run_dir: str | None = None) -> None:
        self.received: int | None = None  # the signal to stop for
        self.deferred = False  # True from the first step on: stop at the next step boundary, not at once
        self.stage = "during setup"
        self.run_dir = Path(run_dir) if run_dir else None  # the run a resume continues (its checkpoints are intact)
        self.announce = True
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def watch(self, run_dir: Path, accelerator: Accelerator) -> None:
        """The run folder the messages name; only the main process prints the final line."""
        self.run_dir, self.announce = run_dir, accelerator.is_main_process

    def _handle(self, signum: int, frame) -> None:
        if not self.deferred:
            raise self.interrupted(signum, f" {self.stage}")
        if self.received is None:
            self.received = signum
            logger.warning("%s: stopping after this step, once a checkpoint is saved", signal.Signals(signum).name)
        else:
            logger.warning("already stopping (a checkpoint is being saved); kill -9 ends the process at once")

    def agreed(self, accelerator: Accelerator, boundary: bool) -> bool:
        """Whether to stop after this step: this process's flag (one process), else every process's flags summed
        at a ``boundary`` step (the same steps on every process; False between them)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if not boundary:
            return False
        mine = [self.received == signal.SIGINT, self.received == signal.SIGTERM]
        flags = torch.tensor(mine, dtype=torch.float32, device=accelerator.device)
        sigint, sigterm = accelerator.reduce(flags, reduction="sum").tolist()
        if sigterm or sigint:
            self.received = signal.SIGTERM if sigterm else signal.SIGINT
        return self.received is not None

    def finishing(self) -> None:
        """After the last step: a signal stops at once again (raised now if one came during the last step)."""
        self.deferred, self.stage = False, "while saving and evaluating the final SAE"
        if self.received is not None:
            raise self.interrupted(self.received, " after the last step")

    def interrupted(self, signum: int, at: str) -> RunInterrupted:
        """The exception to stop with: which signal, where, and what a resume continues from."""
        name = signal.Signals(signum).name
        return RunInterrupted(f"stopped by {name}{at}. {ckpt.saved_state(self.run_dir)}", signum, self.announce)

"""Virtual environments for the tools the tests drive but hf-sae does not depend on, created on first use and cached.

Some tests need a program that pins packages of its own (``olah``, the read-only Hub server) or a peer library whose
outputs we compare against (``sae-lens``, ``eai-sparsify``). Each lives in its own venv so that its pins never meet
ours. :func:`tool_python` makes the venv the first time (``python -m venv``, then ``pip install`` of each group of
requirements in order, from the package registry pip is configured for) and returns its interpreter; later calls,
from any test session or process, reuse it. Creation holds a file lock, and a venv counts as ready only once its
``.hf-sae-ready`` stamp is written, so a run killed midway is rebuilt next time instead of half used.

    python = tool_python("olah", [["olah"]], probe="import olah")
    python = tool_python("saelens", [["torch==2.13.0"], ["sae-lens"]], probe="import sae_lens")

Venvs live in ``$HF_SAE_CACHE/peer-venvs/<name>`` (default ``~/.cache/hf_sae/peer-venvs``; the folder
``benchmarks/bench_peers.py --setup`` fills too, so a venv made there is reused here and the reverse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from .._io import remove_tree, write_json_atomic

READY = ".hf-sae-ready"


def venv_root() -> Path:
    """``$HF_SAE_CACHE/peer-venvs``, else ``~/.cache/hf_sae/peer-venvs``."""
    return Path(os.environ.get("HF_SAE_CACHE") or Path.home() / ".cache" / "hf_sae").expanduser() / "peer-venvs"


def _works(python: Path, probe: str | None) -> bool:
    if not python.exists():
        return False
    if probe is None:
        return True
    done = subprocess.run([str(python), "-c", probe], capture_output=True, check=False, timeout=300)
    return done.returncode == 0


def tool_python(
    name: str,
    requirements: Sequence[Sequence[str]],
    *,
    probe: str | None = None,
    root: str | os.PathLike | None = None,
    timeout: float = 1800,
) -> Path:
    """The interpreter of the venv ``name`` with ``requirements`` installed (created now if missing).

    Args:
        name: the venv's folder name under :func:`venv_root` (or ``root``).
        requirements: groups of pip requirements, installed one ``pip install`` per group in order (CPU torch
            first, so a peer's torch requirement is already met and pip never pulls another build).
        probe: Python code that must run in the venv for an existing venv without a stamp (one made by hand or by
            ``bench_peers --setup``) to count as ready; without it such a venv is rebuilt.
        timeout: seconds each ``pip install`` may take.

    Raises:
        RuntimeError: a pip install failed; the message has pip's last lines and the command to run by hand.
    """
    target = Path(root).expanduser() if root is not None else venv_root()
    target.mkdir(parents=True, exist_ok=True)
    venv = target / name
    python = venv / "bin" / "python"
    wanted = [list(group) for group in requirements]
    with FileLock(str(target / f"{name}.lock")):
        stamp = venv / READY
        if stamp.is_file() and json.loads(stamp.read_text()).get("requirements") == wanted and python.exists():
            return python
        if venv.exists() and not stamp.is_file() and probe is not None and _works(python, probe):
            write_json_atomic(stamp, {"requirements": wanted, "adopted": True})
            return python
        if venv.exists():
            remove_tree(venv)  # half built, or built for other requirements
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        for group in wanted:
            command = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *group]
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
            if done.returncode:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
                raise RuntimeError(
                    f"creating the {name!r} venv at {venv} failed: `{' '.join(command)}` exited with "
                    f"{done.returncode}:\n{tail}\nRun that command by hand to see why (no network to the package "
                    "registry?)."
                )
        write_json_atomic(stamp, {"requirements": wanted})
    return python


def tool_executable(python: Path, program: str) -> Path:
    """A console script installed in the venv of ``python`` (e.g. ``olah-cli``)."""
    return python.parent / program


TORCH_REQUIREMENT = "torch==2.13.0"
"""The CPU torch every venv with a torch-based peer gets first (the build that lies on disk; environment.md)."""
PEERS = {
    "saelens": ([[TORCH_REQUIREMENT], ["sae-lens==6.54.12"]], "import sae_lens"),
    "sparsify": ([[TORCH_REQUIREMENT], ["eai-sparsify==1.3.3"]], "import sparsify"),
}
"""Peer libraries the tests compare against: name -> (requirements, probe); the versions bench_peers measures."""
OLAH_REQUIREMENTS = [["olah"]]
"""The read-only Hub server the pull side of :class:`~hf_sae.testing.hub_server.LocalHub` runs."""


def peer_python(name: str) -> Path:
    """The interpreter of a peer's venv (:data:`PEERS`: ``"saelens"`` or ``"sparsify"``), created on first use."""
    requirements, probe = PEERS[name]
    return tool_python(name, requirements, probe=probe)


def olah_cli() -> Path:
    """``olah-cli`` from its own cached venv (created on first use)."""
    python = tool_python("olah", OLAH_REQUIREMENTS, probe="import olah")
    return tool_executable(python, "olah-cli")

"""Optional compiled kernels.

The CPU kernels of the training step (``hierarchical_cpu.cpp``) and of KronSAE's selection (``kron_cpu.cpp``) are
compiled on first use with ``torch.utils.cpp_extension.load`` (about 30-60 s once; cached by torch under
``TORCH_EXTENSIONS_DIR``). When no compiler is available, or ``HF_SAE_NO_EXTENSION=1`` is set, the pure-torch
implementations in :mod:`hf_sae.losses`, :mod:`hf_sae.sparse` and :mod:`hf_sae.modeling_kron_sae` are used instead:
same results, more time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_MODULES: dict[str, ModuleType | None] = {}

STALE_LOCK_SECONDS = 300.0  # a build takes 30-60 s; a lock this old was left by a build that was killed


def clear_stale_build_lock(name: str, max_age: float = STALE_LOCK_SECONDS, poll: float = 1.0) -> bool:
    """Wait while extension ``name``'s build lock is younger than ``max_age`` seconds, then remove it if it is still
    there; True if one was removed.

    torch's extension builder holds a lock file in the build folder while it compiles and makes every other process
    wait until the file is gone, with no timeout. A build killed mid-way (Ctrl-C, SIGKILL, a CI timeout) leaves the
    file behind, and every later first use of the kernels would then hang forever. Waiting here first (a live
    build removes its lock when done) means torch is never handed a lock that can go stale while it waits."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    except ImportError:
        return False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # no lock (the usual case), or the other process's build finished
            return False
        if age > max_age:
            break
        time.sleep(poll)
    logger.warning("hf-sae: removing %s, left %.0f s ago by a kernel build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def _sources(source: Path) -> list[Path]:
    """``source`` and the headers of its folder (which it may include), in a fixed order: what its build hashes."""
    return [source, *sorted(source.parent.glob("*.h"))]


def _compiled(source_name: str, what: str, extra_cflags: list[str]) -> ModuleType | None:
    """The module compiled from ``source_name`` beside this file, or None when extensions are disabled, the source
    is absent (remote code) or the build fails (logged once, naming ``what`` falls back to pure torch)."""
    if source_name in _MODULES:
        return _MODULES[source_name]
    _MODULES[source_name] = None
    source = Path(__file__).with_name(source_name)
    if os.environ.get("HF_SAE_NO_EXTENSION", "0") not in ("", "0") or not source.is_file():
        return None  # disabled, or a copy of this code without the kernel source (remote code)
    try:
        from torch.utils.cpp_extension import load  # optional: needs a compiler and ninja at run time

        # The name carries the hash of the source and the headers beside it: processes (or installed versions)
        # with different sources never share, rebuild or load each other's binary in torch's extension cache.
        digest = hashlib.sha1(b"".join(path.read_bytes() for path in _sources(source))).hexdigest()[:12]
        name = f"hf_sae_{source.stem}_{digest}"
        clear_stale_build_lock(name)
        _MODULES[source_name] = load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # a missing compiler must not make the package unusable: fall back, loudly
        logger.warning(
            "hf-sae: could not build %s (%s); using the slower pure-torch path. Install a C++ compiler "
            "(e.g. `apt-get install g++`) and ninja to enable it.",
            what,
            err,
        )
    return _MODULES[source_name]


def cpu_kernels() -> ModuleType | None:
    """The compiled training-step kernels (``hierarchical_cpu.cpp``), or None (see :func:`_compiled`)."""
    return _compiled(
        "hierarchical_cpu.cpp", "the CPU HierarchicalTopK kernel", ["-ffast-math", "-fno-finite-math-only"]
    )


def kron_cpu_kernels() -> ModuleType | None:
    """The compiled KronSAE selection kernel (``kron_cpu.cpp``), or None: then
    :func:`hf_sae.modeling_kron_sae.select_topk_latents` runs in pure torch (same latents, more time)."""
    return _compiled("kron_cpu.cpp", "the KronSAE CPU kernel", [])


def aux_cpu_kernels() -> ModuleType | None:
    """The compiled AuxK block kernels (``aux_cpu.cpp``: the dead-latent products by L2 tiles), or None: then AuxK
    runs its dense-block or sparse paths (same loss, more time)."""
    return _compiled("aux_cpu.cpp", "the AuxK CPU kernel", ["-ffast-math", "-fno-finite-math-only"])

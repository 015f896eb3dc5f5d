"""Optional compiled kernels.

The CPU HierarchicalTopK kernel (``hierarchical_cpu.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load`` (about 30-60 s once; cached by torch under ``TORCH_EXTENSIONS_DIR``). When no
compiler is available, or ``HF_SAE_NO_EXTENSION=1`` is set, the pure-torch implementations in
:mod:`hf_sae.losses` are used instead: same results, more time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_CPU_MODULE: ModuleType | None = None
_CPU_TRIED = False


def cpu_kernels() -> ModuleType | None:
    """The compiled CPU kernel module, or None when it is disabled or cannot be built (logged once)."""
    global _CPU_MODULE, _CPU_TRIED
    if _CPU_TRIED:
        return _CPU_MODULE
    _CPU_TRIED = True
    source = Path(__file__).with_name("hierarchical_cpu.cpp")
    if os.environ.get("HF_SAE_NO_EXTENSION", "0") not in ("", "0") or not source.is_file():
        return None  # disabled, or a copy of this code without the kernel source (remote code)
    try:
        from torch.utils.cpp_extension import load  # optional: needs a compiler and ninja at run time

        # The name carries the source's hash: processes (or installed versions) with different sources never
        # share, rebuild or load each other's binary in torch's extension cache.
        digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
        _CPU_MODULE = load(
            name=f"hf_sae_cpu_{digest}",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # a missing compiler must not make the package unusable: fall back, loudly
        logger.warning(
            "hf-sae: could not build the CPU HierarchicalTopK kernel (%s); using the slower pure-torch path. "
            "Install a C++ compiler (e.g. `apt-get install g++`) and ninja to enable it.",
            err,
        )
        _CPU_MODULE = None
    return _CPU_MODULE

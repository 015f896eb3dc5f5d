"""The optional compiled CPU kernel of KronSAE's TopK selection (``kron_cpu.cpp``).

Built on first use with ``torch.utils.cpp_extension.load`` like :func:`hf_sae.kernels.cpu_kernels` (cached by
torch under ``TORCH_EXTENSIONS_DIR``); disabled by ``HF_SAE_NO_EXTENSION=1``, and absent from remote code (no
source file beside it). Without it :func:`hf_sae.modeling_kron_sae.select_topk_latents` runs in pure torch: same
latents, more time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

_kron_logger = logging.getLogger(__name__)

_KRON_MODULE: ModuleType | None = None
_KRON_TRIED = False


def kron_cpu_kernels() -> ModuleType | None:
    """The compiled KronSAE selection module, or None when it is disabled or cannot be built (logged once)."""
    global _KRON_MODULE, _KRON_TRIED
    if _KRON_TRIED:
        return _KRON_MODULE
    _KRON_TRIED = True
    source = Path(__file__).with_name("kron_cpu.cpp")
    if os.environ.get("HF_SAE_NO_EXTENSION", "0") not in ("", "0") or not source.is_file():
        return None
    try:
        from torch.utils.cpp_extension import load  # optional: needs a compiler and ninja at run time

        _KRON_MODULE = load(
            name="hf_sae_kron_cpu",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # a missing compiler must not make the package unusable: fall back, loudly
        _kron_logger.warning("hf-sae: could not build the KronSAE CPU kernel (%s); using pure-torch selection.", err)
        _KRON_MODULE = None
    return _KRON_MODULE

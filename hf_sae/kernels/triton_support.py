"""When the Triton kernels run, and the one guarded import of them.

The GPU kernels of :mod:`hf_sae.kernels.triton_hierarchical` (HierarchicalTopK / TopK loss) and
:mod:`hf_sae.kernels.triton_decode` (sparse decode) are optional: ``triton`` is not a dependency of hf-sae, so those
modules are imported only here, on first use, and a missing or broken ``triton`` means the pure-torch path. The
choice is by device and dtype (CUDA tensors in float32 / bfloat16 / float16), never by a flag users must set.

Set ``HF_SAE_NO_TRITON=1`` to force the pure-torch path on CUDA (benchmarks and debugging compare the two).
Under ``torch.use_deterministic_algorithms(True)`` the torch path runs too when gradients are needed: the kernels
add decoder-row gradients with float32 atomics, whose summation order varies between runs.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

_log = logging.getLogger(__name__)  # not "logger": the remote-code bundle shares one namespace

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MODULES: dict[str, ModuleType | None] = {}


def load_triton_module(name: str) -> ModuleType | None:
    """``hf_sae.kernels.<name>`` (a module defining ``@triton.jit`` kernels), or None when triton cannot be
    imported (not installed, no driver) or ``HF_SAE_NO_TRITON=1``. Cached; a failed import is logged once."""
    if os.environ.get("HF_SAE_NO_TRITON", "0") not in ("", "0"):
        return None
    if name not in _TRITON_MODULES:
        try:
            _TRITON_MODULES[name] = importlib.import_module(f"{__package__}.{name}")
        except Exception as err:  # ImportError, or a triton that fails to initialise: the torch path still works
            _log.info("hf-sae: Triton kernels unavailable (%s); CUDA tensors use the pure-torch path.", err)
            _TRITON_MODULES[name] = None
    return _TRITON_MODULES[name]


def triton_kernel_for(name: str, *tensors: Tensor) -> ModuleType | None:
    """The Triton kernel module ``name`` when every tensor in ``tensors`` (the floating-point inputs of one call)
    is a non-empty CUDA tensor of a kernel dtype and the result may be non-deterministic; else None (torch path)."""
    if not tensors or not all(t.is_cuda and t.dtype in TRITON_DTYPES and t.numel() > 0 for t in tensors):
        return None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and torch.are_deterministic_algorithms_enabled():
        return None
    return load_triton_module(name)

"""What the hardware can do fast: the one place that decides whether bf16 matmuls pay off on a device, and how
the process keeps the memory a CPU training step frees."""

from __future__ import annotations

import ctypes
import platform
import sys

import torch


def has_native_bf16(device: torch.device | str) -> bool:
    """True where a bf16 matmul runs on dedicated units: any CUDA device, or a CPU with AVX512-BF16 or AMX.

    Elsewhere (an AVX2-only CPU such as AMD Zen 3) PyTorch emulates bf16 and a bf16 matmul is several times slower
    than fp32 (4x measured in ``benchmarks/bench_sae_step.py``), so the fp32 path is the fast one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


_RETAINED = False
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: free memory beyond 2 GiB at the heap top goes back


def retain_freed_memory() -> bool:
    """Keep memory that torch frees on CPU in this process for its next allocations (glibc only); True if set.

    A CPU training step allocates and frees the same tensors every step: gradients of the size of the encoder and
    decoder, the batch-sized residuals and scores. glibc gives every block over 32 MiB (all of them at Gemma 2 2B
    widths: 150 MB per (16384, 2304) gradient) straight back to the kernel with ``munmap``, and trims the heap top
    once a few tens of MB are free, so the next step faults every page in again and the kernel zeroes it:
    ~95 ms of an 845 ms TopK step at the large benchmark shape, ~23 ms of a 155 ms step at the small one
    (``benchmarks/bench_freed_memory.py``). ``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap and
    ``M_TRIM_THRESHOLD`` 2 GiB keeps freed ones there, so each step reuses the pages of the last. The cost is that
    the process keeps up to 2 GiB of freed memory it may not use again; the training script calls this only when
    it trains on CPU. Process-wide and idempotent; a no-op (False) off Linux/glibc.
    """
    global _RETAINED
    if _RETAINED:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        _RETAINED = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
    return _RETAINED

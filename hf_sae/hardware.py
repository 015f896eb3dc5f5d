"""What the hardware can do fast: the one place that decides whether bf16 matmuls pay off on a device, how the
process keeps the memory a CPU training step frees, and whether its large tensors sit on huge pages."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

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


HUGE_PAGE = 2 * 1024 * 1024  # the x86-64 transparent huge page
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def use_huge_pages() -> bool:
    """Put torch's large CPU tensors (>= 2 MiB) on transparent huge pages from now on; True if they are.

    Where the kernel gives huge pages only on request (``madvise`` mode, the default of many distributions), torch
    asks for them only with ``THP_MEM_ALLOC_ENABLE=1`` in the environment, read at its first large allocation. The
    sparse passes of a step read thousands of scattered decoder and activation rows, and Adam streams gigabytes:
    with 4 KiB pages every 4 KiB costs a TLB walk, with 2 MiB pages almost none: step time x0.95 small, x0.94 large
    on 2 cores (``benchmarks/bench_freed_memory.py``). Call it before the process allocates any large tensor (the
    training script does so first thing on CPU); if torch has already read the setting, or the kernel has huge
    pages off, or the user set the variable to 0, it returns False and changes nothing. Process-wide; the answer of
    the first call is kept. The probe: whether a freshly touched 8 MiB tensor raised the process's AnonHugePages.
    """
    global _HUGE_PAGES
    if _HUGE_PAGES is None:
        _HUGE_PAGES = _enable_huge_pages()
    return _HUGE_PAGES


_HUGE_PAGES: bool | None = None  # use_huge_pages' answer: the setting is read once per process


def _enable_huge_pages() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        if "[never]" in THP_SETTING.read_text():
            return False
    except OSError:
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    before = _anon_huge_kib()
    probe = torch.ones(4 * HUGE_PAGE, dtype=torch.uint8)  # touched: the kernel backs it now, huge pages if asked
    on = _anon_huge_kib() > before
    del probe
    return on


def _anon_huge_kib() -> int:
    """This process's anonymous memory on transparent huge pages, in KiB (0 if unreadable)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0

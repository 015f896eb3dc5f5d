"""What the hardware can do fast: the one place that decides whether bf16 matmuls pay off on a device."""

from __future__ import annotations

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

"""The step benchmark's AuxK lower bound, on hand cases (no timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sae_step.py"
_spec = importlib.util.spec_from_file_location("bench_sae_step", _PATH)
bench_sae_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sae_step)


def test_auxk_lower_bound_by_hand():
    # small shape: k_aux = 640 // 2 = 320, four products of N·320·640 against the matmul's N·640·4096:
    # 4 · 320 / 4096 = 0.3125 of the matmul's time; matmul 80 ms of a 100 ms TopK step -> 1 + 0.3125 · 0.8 = 1.25
    small = bench_sae_step.SHAPES["small"]
    assert bench_sae_step.auxk_lower_bound(small, 0.080, 0.100) == pytest.approx(1.25)
    # large shape: k_aux = 1152, 4 · 1152 / 16384 = 0.28125; matmul the whole step -> 1.28125
    large = bench_sae_step.SHAPES["large"]
    assert bench_sae_step.auxk_lower_bound(large, 1.0, 1.0) == pytest.approx(1.28125)
    # k_aux is capped by the dead half of the latents: d_in 640, d_sae 256 -> 128 dead, k_aux 128 -> 1 + 4 · 0.5
    assert bench_sae_step.auxk_lower_bound({"d_in": 640, "d_sae": 256}, 1.0, 1.0) == pytest.approx(3.0)

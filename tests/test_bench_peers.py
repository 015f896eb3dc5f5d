"""The peer benchmark's bookkeeping: round order and the per-round ratio maths (no peer venv needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"
_spec = importlib.util.spec_from_file_location("bench_peers", _PATH)
bench_peers = importlib.util.module_from_spec(_spec)
sys.modules["bench_peers"] = bench_peers  # dataclasses look their module up while the file runs
_spec.loader.exec_module(bench_peers)


def test_round_order_rotates_so_every_library_takes_every_position():
    libs = ["hf_sae", "sparsify", "saelens"]
    orders = [bench_peers.round_order(libs, i) for i in range(3)]
    assert orders == [
        ["hf_sae", "sparsify", "saelens"],
        ["sparsify", "saelens", "hf_sae"],
        ["saelens", "hf_sae", "sparsify"],
    ]
    assert bench_peers.round_order(libs, 3) == orders[0]


def test_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # The load doubles between rounds; within a round both libraries see the same load.
    rounds = [
        {"hf_sae": 400.0, "peer": 100.0},  # 4
        {"hf_sae": 200.0, "peer": 100.0},  # 2
        {"hf_sae": 90.0, "peer": 30.0},  # 3
    ]
    summary = bench_peers.summarise(rounds)
    assert summary["hf_sae"]["tokens_per_s"] == 200.0
    assert summary["hf_sae"]["ratio"] is None
    assert summary["peer"]["tokens_per_s"] == 100.0
    assert summary["peer"]["ratio"] == pytest.approx(3.0)  # the ratio of medians would be 2.0
    assert summary["peer"]["ratio_min"] == pytest.approx(2.0)
    assert summary["peer"]["ratio_max"] == pytest.approx(4.0)


def test_ratio_skips_rounds_where_either_library_is_missing():
    rounds = [
        {"hf_sae": 300.0, "peer": 100.0},  # 3
        {"peer": 50.0},  # hf-sae failed this round: no ratio
        {"hf_sae": 500.0, "peer": 100.0},  # 5
    ]
    summary = bench_peers.summarise(rounds)
    assert summary["peer"]["ratio"] == pytest.approx(4.0)  # median of [3, 5]
    assert summary["peer"]["tokens_per_s"] == 100.0  # median of [100, 50, 100]


def test_a_peer_never_measured_with_hf_sae_has_no_ratio():
    summary = bench_peers.summarise([{"peer": 10.0}, {"peer": 20.0}])
    assert summary["peer"] == {"tokens_per_s": 15.0, "ratio": None, "ratio_min": None, "ratio_max": None}

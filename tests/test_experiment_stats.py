"""The seed statistics of the experiments (experiments/common.py) and the verdict rules built on them
(experiments/kron_isoflops.py, experiments/synthetic.py), on hand-derived cases."""

import math
from types import SimpleNamespace

import pytest

from experiments import synthetic
from experiments.common import mean_std, paired_stats, pm
from experiments.kron_isoflops import paired, verdict


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))  # sqrt(7)
    assert math.isnan(mean_std([4.0])[1])


def test_pm_formats_one_and_several_seeds():
    assert pm([0.5]) == "0.5000 (1 seed)"
    assert pm([1.0, 3.0], 1, "%") == "2.0% ± 1.4%"


def test_paired_stats_by_hand():
    # deltas 1, 2, 3: mean 2, std 1, t = 2 / (1 / sqrt 3) = 3.464 < t_0.975(2) = 4.303: not beyond the spread
    stats = paired_stats({0: 1.0, 1: 2.0, 2: 3.0})
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["std"] == pytest.approx(1.0)
    assert stats["t"] == pytest.approx(2 * math.sqrt(3))
    assert stats["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert not stats["significant"]
    # deltas 1.0, 1.1, 0.9: mean 1, std 0.1, t = 17.3 > 4.303
    tight = paired_stats({0: 1.0, 1: 1.1, 2: 0.9})
    assert tight["t"] == pytest.approx(10 * math.sqrt(3))
    assert tight["significant"]
    same = paired_stats({0: 0.25, 1: 0.25})  # no spread at all: beyond it, unless the differences are zero
    assert same["t"] == math.inf and same["significant"]
    assert not paired_stats({0: 0.0, 1: 0.0})["significant"]
    one = paired_stats({0: 0.5})
    assert one["n"] == 1 and not one["significant"] and math.isnan(one["ci95"])


def record(ev32: float) -> dict:
    return {"ev": {"32": {"explained_variance": ev32}}}


def test_kron_verdicts_follow_the_interval():
    ev = lambda r: r["ev"]["32"]["explained_variance"]  # noqa: E731
    results = {
        "0": {"a": record(0.95), "b": record(0.94)},
        "1": {"a": record(0.96), "b": record(0.949)},
        "2": {"a": record(0.955), "b": record(0.944)},
    }
    stats = paired(results, "a", "b", ev)  # deltas 0.010, 0.011, 0.011
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.032 / 3)
    assert verdict(stats, better=True) == "holds"
    assert verdict(paired(results, "b", "a", ev), better=True) == "does not hold"
    noisy = {"0": {"a": record(0.95), "b": record(0.94)}, "1": {"a": record(0.94), "b": record(0.95)}}
    tie = paired(noisy, "a", "b", ev)  # deltas +0.01, -0.01: the interval holds zero
    assert verdict(tie, better=True).startswith("does not hold: a tie")
    assert verdict(tie, better=False).startswith("holds as a tie")
    only = paired({"0": {"a": record(0.9), "b": record(0.8)}}, "a", "b", ev)
    assert verdict(only, better=True) == "inconclusive (one seed)"
    assert paired({"0": {"a": record(0.9)}}, "a", "b", ev) is None


def synthetic_run(seed: int, hier: list[float], separate: list[float], truncated: list[float]) -> dict:
    evaluations = {}
    for k, h, t, tr in zip([4, 8], hier, separate, truncated):
        evaluations[f"hierarchical_k8@{k}"] = {"explained_variance": h, "mcc": 0.5, "f1": 0.2}
        evaluations[f"topk_k{k}@{k}"] = {"explained_variance": t, "mcc": 0.5, "f1": 0.2}
        evaluations[f"topk_k8@{k}"] = {"explained_variance": tr, "mcc": 0.5, "f1": 0.2}
    return {"args": {"seed": str(seed)}, "evaluations": evaluations}


def test_synthetic_seeds_text_judges_the_hierarchical_gap(monkeypatch):
    # k'=4: hierarchical 0.05 below separate in every seed (interval below -0.01): the claim does not hold
    runs = {
        0: synthetic_run(0, [0.50, 0.80], [0.55, 0.80], [0.30, 0.80]),
        1: synthetic_run(1, [0.51, 0.81], [0.56, 0.81], [0.31, 0.81]),
        2: synthetic_run(2, [0.49, 0.79], [0.54, 0.795], [0.29, 0.79]),
    }
    monkeypatch.setattr(synthetic, "seed_runs", lambda samples: runs)
    text = synthetic.seeds_text(SimpleNamespace(samples=1000, topk_ks=[4, 8]))
    assert "over 3 seeds: does not hold" in text
    assert "below −0.01 at k' ∈\n  {4}" in text or "below −0.01 at k' ∈ {4}" in text
    assert (
        "| k'=4 | EV | 0, 1, 2 | 0.5000 ± 0.0100 | 0.5500 ± 0.0100 | -0.0500 ± 0.0000 | yes | +0.2000 ± 0.0000 |"
        in text
    )
    monkeypatch.setattr(synthetic, "seed_runs", lambda samples: {0: runs[0]})
    assert synthetic.seeds_text(SimpleNamespace(samples=1000, topk_ks=[4, 8])) == ""


def test_synthetic_seeds_text_judges_kron_against_topk(monkeypatch):
    def run(seed: int, kron_ev: float, topk_ev: float) -> dict:
        r = synthetic_run(seed, [0.5, 0.8], [0.5, 0.8], [0.3, 0.8])
        r["evaluations"]["kron_k16@16"] = {"explained_variance": kron_ev, "mcc": 0.50, "f1": 0.2}
        r["evaluations"]["topk_k16@16"] = {"explained_variance": topk_ev, "mcc": 0.51, "f1": 0.2}
        return r

    args = SimpleNamespace(samples=1000, topk_ks=[4, 8], k=16)
    # EV 0.03 below in every seed: the whole interval below -0.01
    far = {s: run(s, 0.80 + d, 0.83 + d) for s, d in enumerate([0.0, 0.01, -0.01])}
    monkeypatch.setattr(synthetic, "seed_runs", lambda samples: far)
    assert "over 3 seeds: does not hold** (KronSAE − TopK, mean ± 95% half-width: EV -0.0300" in (
        synthetic.seeds_text(args)
    )
    # EV 0.002 below, MCC 0.01 below, identical in every seed: within both tolerances
    near = {s: run(s, 0.828 + d, 0.83 + d) for s, d in enumerate([0.0, 0.01, -0.01])}
    monkeypatch.setattr(synthetic, "seed_runs", lambda samples: near)
    assert "over 3 seeds: holds**" in synthetic.seeds_text(args)
    # deltas -0.03, +0.01: the interval reaches both sides of -0.01
    wide = {0: run(0, 0.80, 0.83), 1: run(1, 0.84, 0.83)}
    monkeypatch.setattr(synthetic, "seed_runs", lambda samples: wide)
    assert "over 2 seeds: inconclusive**" in synthetic.seeds_text(args)

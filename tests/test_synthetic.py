"""experiments/synthetic.py's ground-truth metrics (SynthSAEBench's MCC and feature-detection F1) on hand-computed
cases. They need neither sae_lens nor a trained SAE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from experiments.synthetic import abs_cosines, detection_counts, f1_scores, ground_truth_metrics, match_features, mcc


def test_mcc_of_a_permuted_sign_flipped_rescaled_dictionary_is_one():
    features = torch.randn(12, 5)
    permutation = torch.randperm(12)
    signs = torch.where(torch.rand(12) < 0.5, -1.0, 1.0)
    decoder = features[permutation] * signs[:, None] * torch.rand(12, 1).add(0.5)
    assert mcc(abs_cosines(decoder, features)) == pytest.approx(1.0, abs=1e-12)
    rows, cols = match_features(abs_cosines(decoder, features))
    assert torch.equal(cols[rows.argsort()], permutation)


def test_mcc_uses_the_optimal_one_to_one_matching_not_the_greedy_one():
    # greedy (latent 0 takes its best, 0.9) leaves 0.1 for latent 1: mean 0.5; the optimum crosses: (0.8 + 0.85) / 2
    cosines = torch.tensor([[0.9, 0.8], [0.85, 0.1]], dtype=torch.float64)
    assert mcc(cosines) == pytest.approx(0.825)


def test_mcc_of_a_2x2_dictionary_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    decoder = torch.tensor([[2.0, 0.0], [1.0, -1.0]])  # cosines |(1, 0)| and |(1/√2, −1/√2)|
    expected = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]], dtype=torch.float64)
    torch.testing.assert_close(abs_cosines(decoder, features), expected)
    assert mcc(abs_cosines(decoder, features)) == pytest.approx((1.0 + math.sqrt(0.5)) / 2)


def test_mcc_with_more_latents_than_features_averages_over_the_matched_pairs():
    cosines = torch.tensor([[0.2, 0.1], [0.9, 0.3], [0.4, 0.7]], dtype=torch.float64)
    assert mcc(cosines) == pytest.approx((0.9 + 0.7) / 2)


def naive_f1(latent_fires: list[list[bool]], feature_fires: list[list[bool]], target: list[int]) -> list[float]:
    """Per latent F1 of its firing against its target feature's firing, by counting rows one at a time."""
    scores = []
    for latent, feature in enumerate(target):
        tp = sum(row[latent] and f[feature] for row, f in zip(latent_fires, feature_fires))
        fp = sum(row[latent] and not f[feature] for row, f in zip(latent_fires, feature_fires))
        fn = sum(not row[latent] and f[feature] for row, f in zip(latent_fires, feature_fires))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return scores


def test_f1_counts_match_a_naive_loop_and_dead_latents_score_zero():
    # 5 rows, 3 latents (latent 2 never fires), 2 features
    latent_fires = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]]
    feature_fires = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0]], dtype=torch.bool)
    target = torch.tensor([0, 1, 0])
    rows, ids = torch.tensor(latent_fires).nonzero(as_tuple=True)
    fires, true_positives = detection_counts(rows, ids, feature_fires, target)
    assert fires.tolist() == [3, 2, 0]
    assert true_positives.tolist() == [2, 1, 0]  # latent 0: rows 0, 1 of its 3; latent 1: row 1 of its 2
    scores = f1_scores(fires, true_positives, feature_fires.sum(0).double()[target])
    assert scores["precision"].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert scores["recall"].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])  # feature 0 fires 3 times, feature 1 twice
    expected = naive_f1([[bool(v) for v in r] for r in latent_fires], feature_fires.tolist(), target.tolist())
    assert scores["f1"].tolist() == pytest.approx(expected)
    assert expected[2] == 0.0


def test_ground_truth_metrics_score_each_latent_against_its_best_feature_and_groups_by_the_matching():
    features = torch.eye(3)
    decoder = torch.tensor([[0.0, 1.0, 0.1], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])  # best: 1, 0, 2 (cos 0.8 > 0.6)
    feature_fires = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    latent_fires = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)  # a perfect detector
    rows, ids = latent_fires.nonzero(as_tuple=True)
    groups = {"a": torch.tensor([0, 1]), "b": torch.tensor([2])}
    out = ground_truth_metrics(abs_cosines(decoder, features), rows, ids, feature_fires, groups)
    cos_latent0 = 1.0 / math.sqrt(1.01)
    assert out["mcc"] == pytest.approx((cos_latent0 + 1.0 + 0.8) / 3)
    assert out["f1"] == pytest.approx(1.0) and out["precision"] == pytest.approx(1.0)
    assert out["mcc_a"] == pytest.approx((1.0 + cos_latent0) / 2) and out["mcc_b"] == pytest.approx(0.8)
    assert out["f1_a"] == pytest.approx(1.0) and out["f1_b"] == pytest.approx(1.0)


def test_a_claimed_sae_is_skipped_by_another_worker_and_a_finished_one_by_everyone(tmp_path):
    import subprocess
    import sys
    import textwrap

    from experiments.synthetic import claimed

    out = tmp_path / "saes" / "topk_k4"
    other_worker = textwrap.dedent(
        f"""
        from pathlib import Path
        from experiments.synthetic import claimed
        with claimed(Path({str(out)!r}), "train.json", wait=False) as mine:
            print(mine)
        """
    )

    def ask_another_process() -> str:
        root = Path(__file__).resolve().parents[1]
        command = [sys.executable, "-c", other_worker]
        result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
        return result.stdout.strip()

    with claimed(out, "train.json", wait=False) as mine:
        assert mine  # nobody trained it, nobody holds it
        assert ask_another_process() == "False"  # held by this process: the other worker moves on
    assert ask_another_process() == "True"  # released, still not trained
    out.mkdir(parents=True)
    (out / "train.json").write_text("{}")
    with claimed(out, "train.json", wait=True) as mine:
        assert not mine  # trained: nothing to do, even for the final (waiting) call


def test_a_longer_run_links_the_shorter_runs_data_and_refuses_an_unfinished_one(tmp_path):
    from experiments.synthetic import DATA_FILES, link_data

    source, folder = tmp_path / "seed0-n8", tmp_path / "seed0-n20"
    source.mkdir()
    folder.mkdir()
    with pytest.raises(SystemExit, match="no generator.json"):
        link_data(source, folder)  # a generation still running (generator.json is written last)
    for name in DATA_FILES:
        (source / name).write_text(name)
    link_data(source, folder)
    for name in DATA_FILES:
        assert (folder / name).is_symlink() and (folder / name).read_text() == name
        assert not Path((folder / name).readlink()).is_absolute()  # relative: the runs folder can move

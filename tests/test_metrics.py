"""Metrics against hand-computed values."""

import pytest
import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig
from hf_sae.metrics import budget_metrics, dead_fraction, default_budgets, explained_variance, fvu, l0, shrinkage


def test_fvu_and_ev_hand_case():
    # x rows (1, 0), (3, 0): mean (2, 0), total variance 1 + 1 = 2. Reconstruction (1, 0), (2, 0): error 0 + 1 = 1.
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert fvu(x, x_hat) == pytest.approx(0.5)
    assert explained_variance(x, x_hat) == pytest.approx(0.5)
    # shrinkage: mean(1/1, 2/3)
    assert shrinkage(x, x_hat) == pytest.approx((1 + 2 / 3) / 2)


def test_l0_dead_fraction_and_budgets():
    values = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    indices = torch.tensor([[0, 1, 2], [0, 3, 4]])
    assert l0(values) == pytest.approx(1.5)
    assert dead_fraction(indices, values, d_sae=5) == pytest.approx(3 / 5)  # only latents 0 and 1 fired
    assert default_budgets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_budgets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_budget_metrics_use_prefixes_of_one_ranking():
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=8, d_sae=32, k=4))
    x = torch.randn(20, 8)
    metrics = budget_metrics(sae, x)
    assert list(metrics) == [1, 2, 4]
    for budget, row in metrics.items():
        expected = fvu(x, sae.decode(sae.encode(x, k=budget)))
        assert row["fvu"] == pytest.approx(expected)
        assert row["explained_variance"] == pytest.approx(1 - expected)
        assert row["l0"] <= budget

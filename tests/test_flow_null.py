"""The flow experiment's chance levels (experiments/flow_null.py) and the same-index check (experiments/common.py),
on hand-derived cases."""

import math
from types import SimpleNamespace

import pytest
import torch

from experiments.common import same_index_rates
from experiments.flow_null import (
    expected_floor,
    isotropic_floor,
    justified_threshold,
    quantile,
    random_rotation,
    rotated_null,
    same_index_share,
)


def test_expected_floor_formula():
    assert expected_floor(640, 4096) == pytest.approx(math.sqrt(2 * math.log(4096) / 640))
    assert expected_floor(640, 4096) == pytest.approx(0.1612, abs=1e-4)


def test_isotropic_floor_is_seeded_and_near_the_extreme_value_estimate():
    a = isotropic_floor(128, 512, draws=2, seed=3)
    assert a.shape == (1024,)
    assert torch.equal(a, isotropic_floor(128, 512, draws=2, seed=3))
    assert not torch.equal(a, isotropic_floor(128, 512, draws=2, seed=4))
    assert bool(((a > 0) & (a < 1)).all())
    # the maximum of 512 near-Gaussian cosines of std 1/sqrt(128): below sqrt(2 ln n / d) (its asymptote from
    # above), above half of it
    median = quantile(a, 0.5)
    assert 0.5 * expected_floor(128, 512) < median < expected_floor(128, 512)


def test_random_rotation_is_orthogonal():
    q = random_rotation(16, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(16), atol=1e-5)
    assert abs(abs(float(torch.linalg.det(q))) - 1.0) < 1e-4


def test_rotated_null_of_one_direction_is_the_rotation_entry():
    """Target e1, source e1: the rotated source is row 0 of the rotation R (e1 @ R), so the null's cosine is R[0, 0]
    — the same R the function draws from the seed."""
    e1 = torch.tensor([[1.0, 0.0, 0.0]])
    null = rotated_null(e1, e1, seed=7)
    rotation = random_rotation(3, torch.Generator().manual_seed(7))
    assert null.shape == (1,)
    assert float(null[0]) == pytest.approx(float(rotation[0, 0]), abs=1e-6)


def test_rotated_null_destroys_alignment_but_not_geometry():
    """A dictionary matched with itself scores 1 everywhere; its rotated copy scores like unrelated directions."""
    dictionary = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    real = torch.nn.functional.normalize(dictionary, dim=-1) @ torch.nn.functional.normalize(dictionary, dim=-1).T
    assert torch.allclose(real.amax(dim=1), torch.ones(256), atol=1e-5)
    null = rotated_null(dictionary, dictionary, seed=1)
    assert quantile(null) < 0.8
    assert quantile(null, 0.5) < 1.2 * expected_floor(64, 256)


def test_justified_threshold_rounds_the_nulls_quantile_up():
    low = torch.full((1000,), 0.1)
    high = torch.cat([torch.full((999,), 0.05), torch.tensor([0.9])])
    assert justified_threshold(0.15, [low]) == pytest.approx(0.15)  # the default already above the null
    assert justified_threshold(0.15, [torch.full((1000,), 0.172)]) == pytest.approx(0.18)
    assert justified_threshold(0.15, [torch.full((1000,), 0.17)]) == pytest.approx(0.17)
    assert justified_threshold(0.5, [torch.full((1000,), 0.2), low]) == pytest.approx(0.5)
    # position 0.999 · 999 = 998.001: linear interpolation between values 998 (0.05) and 999 (0.9)
    assert quantile(high) == pytest.approx(0.05 + 0.001 * 0.85, abs=1e-6)
    assert justified_threshold(0.15, [high]) == pytest.approx(0.15)  # one outlier in 1000 does not move it


def test_same_index_share_and_rates():
    assert same_index_share(torch.tensor([0, 2, 2, 3])) == pytest.approx(0.75)
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    shuffled = w[torch.roll(torch.arange(64), 1)]
    rates = same_index_rates(
        {"a": SimpleNamespace(W_dec=w), "b": SimpleNamespace(W_dec=2 * w), "c": SimpleNamespace(W_dec=shuffled)}
    )
    assert rates["a/b"] == pytest.approx(1.0)  # the same directions (cosine ignores the scale): every index matches
    assert rates["a/c"] == pytest.approx(0.0)  # each row's twin sits one index away
    assert rates["b/c"] == pytest.approx(0.0)

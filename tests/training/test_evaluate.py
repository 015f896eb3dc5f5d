"""training/evaluate.py: the chunked reconstruction metrics equal hf_sae.metrics on the whole data."""

from __future__ import annotations

import pytest
import torch

from hf_sae import metrics as sae_metrics
from hf_sae.testing.tiny_models import tiny_sae
from training.evaluate import reconstruction_metrics


def _whole(sae, x):
    """The metrics of the previous, unchunked implementation: hf_sae.metrics on all N rows at once per budget."""
    latents = sae.encode(x, sae.config.k)
    out = {}
    for budget in sae_metrics.default_budgets(sae.config.k):
        v, i = latents.values[:, :budget], latents.indices[:, :budget]
        reconstruction = sae.decode((v, i))
        out[str(budget)] = {
            "fvu": sae_metrics.fvu(x, reconstruction),
            "explained_variance": sae_metrics.explained_variance(x, reconstruction),
            "l0": sae_metrics.l0(v),
            "shrinkage": sae_metrics.shrinkage(x, reconstruction),
        }
    return out, sae_metrics.dead_fraction(latents.indices, latents.values, sae.config.d_sae)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
@torch.no_grad()
def test_chunked_reconstruction_metrics_equal_the_metrics_of_the_whole_data(chunk_rows):
    sae = tiny_sae(d_sae=256, k=8, b_dec_std=0.3)
    x = torch.randn(150, 64, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    result = reconstruction_metrics(sae, x, chunk_rows=chunk_rows, progress=True)
    budgets, dead = _whole(sae, x)
    assert list(result["budgets"]) == ["1", "2", "4", "8"]
    for budget, expected in budgets.items():  # chunked encodes differ from one big one by fp32 rounding only
        assert result["budgets"][budget] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert result["dead_fraction_eval"] == pytest.approx(dead, abs=1e-12)
    assert 0 < dead < 1  # 150 x 8 picks among 256 latents: some fire, some never do
    assert result["eval_tokens"] == 150


@torch.no_grad()
def test_reconstruction_metrics_by_hand_for_a_perfect_and_an_empty_reconstruction():
    sae = tiny_sae(d_sae=128, k=64)
    eye = torch.eye(64)
    sae.encoder.weight.copy_(torch.cat([eye, -eye]))  # encode then decode is the identity (see test_evaluation)
    sae.encoder.bias.zero_()
    sae.W_dec.copy_(torch.cat([eye, -eye]))
    sae.b_dec.zero_()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    result = reconstruction_metrics(sae, x, chunk_rows=16)
    assert result["budgets"]["64"]["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert result["budgets"]["64"]["shrinkage"] == pytest.approx(1.0, abs=1e-6)
    assert result["budgets"]["64"]["l0"] == 64  # every coordinate is non-zero: 64 of relu(x), relu(-x) fire
    assert result["budgets"]["1"]["l0"] == 1

"""Feature statistics (hf_sae.latent_stats, hf_sae.feature_stats) and the steering units they give: values against
a direct computation, files beside the weights, the card's section, and the unit conversions by hand."""

from __future__ import annotations

import math

import pytest
import torch

import hf_sae
from hf_sae import FeatureStats, HierarchicalSAE, SAELoadError, SteeringError
from hf_sae.cards import generate_model_card
from hf_sae.latent_stats import STATS_FILE, FeatureStatsAccumulator
from hf_sae.sites import capture_activations, resolve_site
from hf_sae.steering import steer, strengths_in_latent_units
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_sae

BOS = 2
TEXTS = [[BOS, 17, 230, 41, 999, 5, 64], [BOS, 300, 301], [BOS, 8, 9, 10, 11, 12]]
pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(d_sae=8, d_in=4, **values) -> FeatureStats:
    base = dict(
        density=torch.full((d_sae,), 0.1),
        mean_activation=torch.arange(1.0, d_sae + 1),
        max_activation=10 * torch.arange(1.0, d_sae + 1),
        activation_mean=torch.zeros(d_in),
        activation_norm=50.0,
        n_tokens=1000,
    )
    return FeatureStats(**{**base, **values})


# -------------------------------------------------------------------------------------------------- measuring
def test_feature_stats_match_a_direct_computation_without_bos():
    model, sae = tiny_gemma2(), tiny_sae(k=8)
    stats = hf_sae.feature_stats(model, sae, TEXTS, batch_size=2)  # padding in the second batch
    site = resolve_site(model, 1, "resid")
    rows = torch.cat(
        [capture_activations(model, [site], input_ids=torch.tensor([ids]))[site.key][0][1:] for ids in TEXTS]
    )
    dense = sae.encode(rows).to_dense(sae.config.d_sae).double()  # (13, d_sae): BOS rows dropped
    fired = dense != 0
    count = fired.sum(0)
    assert stats.n_tokens == rows.shape[0] == 6 + 2 + 5
    torch.testing.assert_close(stats.density.double(), count.double() / rows.shape[0], rtol=1e-6, atol=1e-7)
    mean = torch.where(count > 0, dense.sum(0) / count.clamp_min(1), torch.zeros_like(count, dtype=torch.float64))
    torch.testing.assert_close(stats.mean_activation.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.max_activation.double(), dense.amax(0).clamp_min(0), rtol=1e-5, atol=1e-6)
    assert stats.activation_norm == pytest.approx(float(rows.double().norm(dim=-1).mean()), rel=1e-6)
    torch.testing.assert_close(stats.activation_mean.double(), rows.double().mean(0), rtol=1e-5, atol=1e-6)
    assert sae.feature_stats is stats  # stored on the SAE for steering and saving


def test_accumulating_in_chunks_gives_the_same_statistics():
    sae = tiny_sae(k=4)
    x = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    whole, chunked = FeatureStatsAccumulator(256, 64, 4), FeatureStatsAccumulator(256, 64, 4)
    z = sae.encode(x)
    whole.update(x, z.values, z.indices)
    for a in range(0, 100, 7):
        chunked.update(x[a : a + 7], z.values[a : a + 7], z.indices[a : a + 7])
    one, other = whole.result(), chunked.result()
    for name in ("density", "mean_activation", "max_activation", "activation_mean"):
        torch.testing.assert_close(getattr(one, name), getattr(other, name))
    assert one.activation_norm == pytest.approx(other.activation_norm, rel=1e-12)


# ------------------------------------------------------------------------------------------------------- files
def test_statistics_are_saved_beside_the_weights_and_loaded_with_the_sae(tmp_path):
    sae = tiny_sae(d_sae=8, d_in=4, k=2)
    sae.feature_stats = _stats(source="unit test")
    sae.save_pretrained(tmp_path / "sae")
    assert (tmp_path / "sae" / STATS_FILE).is_file()
    loaded = HierarchicalSAE.from_pretrained(tmp_path / "sae")
    for name in ("density", "mean_activation", "max_activation", "activation_mean"):
        assert torch.equal(getattr(loaded.feature_stats, name), getattr(sae.feature_stats, name))
    assert loaded.feature_stats.activation_norm == 50.0 and loaded.feature_stats.source == "unit test"
    sae.feature_stats = None  # saving an SAE without statistics removes the stale file
    sae.save_pretrained(tmp_path / "sae")
    assert not (tmp_path / "sae" / STATS_FILE).exists()
    assert HierarchicalSAE.from_pretrained(tmp_path / "sae").feature_stats is None


def test_statistics_of_another_sae_or_a_broken_file_are_refused(tmp_path):
    sae = tiny_sae(d_sae=8, d_in=4, k=2)
    sae.save_pretrained(tmp_path / "sae")
    _stats(d_sae=16).save(tmp_path / "sae")
    with pytest.raises(SAELoadError, match="d_sae=16.*not this one.*d_sae=8"):
        HierarchicalSAE.from_pretrained(tmp_path / "sae")
    (tmp_path / "sae" / STATS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SAELoadError, match="cannot read the feature statistics"):
        HierarchicalSAE.from_pretrained(tmp_path / "sae")


def test_the_card_shows_the_density_histogram():
    sae = tiny_sae(d_sae=8, d_in=4, k=2)
    density = torch.tensor([0.0, 0.0, 3e-5, 3e-4, 3e-3, 0.02, 0.3, 0.9])
    sae.feature_stats = _stats(density=density, source="1,000 held-out tokens")
    card = str(generate_model_card(sae, density_plot="feature_density.png"))
    assert "## Feature statistics" in card and "| never fired | 2 |" in card
    assert "![How often each latent fires](feature_density.png)" in card
    edges, counts, dead = sae.feature_stats.density_histogram(bins=6)
    assert dead == 2 and sum(counts) == 6 and counts == [0, 1, 1, 1, 1, 2]  # bins of one decade from 10^-6
    assert "## Feature statistics" not in str(generate_model_card(tiny_sae(d_sae=8, d_in=4, k=2)))


# ------------------------------------------------------------------------------------------------------- units
def _unit_sae():
    """d_sae 8, d_in 4: decoder row 1 has norm 2 (so ‖d_f‖ shows in the formulas), the others unit."""
    sae = tiny_sae(d_sae=8, d_in=4, k=2)
    with torch.no_grad():
        sae.W_dec[1] *= 2.0
    sae.feature_stats = _stats()
    return sae


@pytest.mark.parametrize(
    ("units", "mode", "expected"),
    [
        ("absolute", "add", [3.0, 3.0]),
        ("absolute", "clamp", [3.0, 3.0]),
        ("max", "add", [3 * 10 * 1 * 1.0, 3 * 20 * 2.0]),  # s · max_f · ‖d_f‖
        ("max", "clamp", [3 * 10.0, 3 * 20.0]),  # s · max_f
        ("mean", "add", [3 * 1 * 1.0, 3 * 2 * 2.0]),
        ("mean", "clamp", [3 * 1.0, 3 * 2.0]),
        ("residual_norm", "add", [3 * 50.0, 3 * 50.0]),  # s · ρ
        ("residual_norm", "clamp", [3 * 50.0, 3 * 50.0 / 2]),  # s · ρ / ‖d_f‖
    ],
)
def test_strength_units_by_hand(units, mode, expected):
    sae = _unit_sae()
    got = strengths_in_latent_units(sae, [0, 1], [3.0, 3.0], units, mode)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_times_strings_are_multiples_of_the_peak_whatever_the_units():
    sae = _unit_sae()
    assert strengths_in_latent_units(sae, [0, 1], ["2x", 5.0], "absolute", "clamp").tolist() == [20.0, 5.0]
    assert strengths_in_latent_units(sae, [1], ["0.5x"], "mean", "add").tolist() == pytest.approx([0.5 * 20 * 2.0])


def test_steering_in_units_adds_the_converted_vector():
    model = tiny_gemma2()
    sae = tiny_sae(k=8)
    sae.feature_stats = hf_sae.feature_stats(model, sae, TEXTS)
    feature = int(sae.feature_stats.max_activation.argmax())
    peak = float(sae.feature_stats.max_activation[feature])
    with steer(model, sae, {feature: "2x"}) as handle:
        vector = handle.hooks[0].add_vector
    unit = sae.W_dec[feature] / sae.W_dec[feature].norm()
    torch.testing.assert_close(vector, 2 * peak * unit)
    with steer(model, sae, {feature: 0.1}, units="residual_norm") as handle:
        assert float(handle.hooks[0].add_vector.norm()) == pytest.approx(0.1 * sae.feature_stats.activation_norm)
    with steer(model, sae, {feature: 1.0}, units="max", mode="clamp") as handle:
        assert float(handle.hooks[0].strengths[0]) == pytest.approx(peak)


def test_unit_errors_name_the_problem_and_the_fix():
    sae = tiny_sae(d_sae=8, d_in=4, k=2)
    model = tiny_gemma2(hidden_size=4, head_dim=4, num_attention_heads=1, num_key_value_heads=1)
    with pytest.raises(SteeringError, match=r"feature statistics, and this SAE has none.*hf_sae.feature_stats"):
        steer(model, sae, {1: 2.0}, units="max")
    with pytest.raises(SteeringError, match="units='peak' is unknown"):
        sae.feature_stats = _stats()
        steer(model, sae, {1: 2.0}, units="peak")
    with pytest.raises(SteeringError, match="'2 times' of feature 1 is not understood"):
        steer(model, sae, {1: "2 times"})
    sae.feature_stats = _stats(mean_activation=torch.zeros(8))
    with pytest.raises(SteeringError, match="feature 1 never fired"):
        steer(model, sae, {1: 2.0}, units="mean")
    assert math.isfinite(float(strengths_in_latent_units(sae, [1], [2.0], "max", "add")[0]))

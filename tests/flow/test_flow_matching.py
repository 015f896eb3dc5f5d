"""hf_sae.flow.matching: blockwise top-k cosine matching, one-to-one assignment, the disk cache, JumpReLU folding."""

from __future__ import annotations

import itertools

import pytest
import torch

import hf_sae.flow.matching as matching
from hf_sae.flow import FeatureFlow, FlowError, MatchCache, feature_scales, fold_jumprelu, match_decoders
from hf_sae.flow.matching import match_features, one_to_one_match
from hf_sae.modeling_jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from hf_sae.testing.tiny_models import planted_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _dense_topk(a, b, k):
    scores = _unit(a.double()) @ _unit(b.double()).T
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n_a", [150, 5])  # more rows than d_in (B blocks normalised) and fewer (scores scaled)
def test_blocked_matching_equals_the_dense_computation(block_size, k, n_a):
    a = torch.randn(n_a, 32) * torch.rand(n_a, 1) * 3  # rows of any norm: matching normalises them
    b = torch.randn(97, 32) * torch.rand(97, 1) * 3
    scores, indices = match_decoders(a, b, k, block_size=block_size)
    expected = _dense_topk(a, b, k)
    assert scores.shape == indices.shape == (n_a, k)
    torch.testing.assert_close(indices, expected.indices)
    torch.testing.assert_close(scores.double(), expected.values, rtol=1e-5, atol=1e-6)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # sorted descending


def test_bfloat16_decoders_are_matched_in_float32():
    a, b = torch.randn(40, 16), torch.randn(50, 16)
    scores, indices = match_decoders(a.bfloat16(), b.bfloat16(), 2, block_size=8)
    expected = _dense_topk(a.bfloat16().float(), b.bfloat16().float(), 2)
    torch.testing.assert_close(indices, expected.indices)
    assert scores.dtype == torch.float32


def test_matching_recovers_a_planted_noisy_permutation_exactly():
    torch.manual_seed(1)
    a = _unit(torch.randn(512, 64))
    permutation = torch.randperm(512)
    b = _unit(a[permutation] + 0.4 * torch.randn(512, 64) / 8)  # cosine ~0.93 to its source, ~0.1 to others
    result = match_features(b, a, cache=False, block_size=100)
    torch.testing.assert_close(result.indices[:, 0], permutation)
    assert float(result.scores[:, 0].min()) > 0.8


def test_top2_recovers_both_parents_of_planted_mixtures():
    torch.manual_seed(2)
    a = _unit(torch.randn(300, 128))
    first, second = torch.randperm(300)[:200], torch.randperm(300)[:200]
    second = torch.where(second == first, (second + 1) % 300, second)
    b = _unit(0.8 * a[first] + 0.6 * a[second])
    result = match_features(b, a, k=2, cache=False, block_size=64)
    torch.testing.assert_close(result.indices[:, 0], first)
    torch.testing.assert_close(result.indices[:, 1], second)
    expected = torch.stack([(b * a[first]).sum(1), (b * a[second]).sum(1)], 1)
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)


def test_one_to_one_is_the_best_permutation():
    torch.manual_seed(3)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    scores, indices = one_to_one_match(a, b)
    cosines = _unit(a) @ _unit(b).T
    best = max(itertools.permutations(range(6)), key=lambda p: float(cosines[torch.arange(6), list(p)].sum()))
    assert indices[:, 0].tolist() == list(best)
    torch.testing.assert_close(scores[:, 0], cosines[torch.arange(6), list(best)])


def test_one_to_one_recovers_a_planted_permutation_where_top1_collides():
    torch.manual_seed(4)
    a = _unit(torch.randn(64, 32))
    permutation = torch.randperm(64)
    b = _unit(a[permutation] + 0.3 * torch.randn(64, 32) / 32**0.5)
    b[1] = _unit(a[permutation[0]] + 0.05 * a[permutation[1]])  # top-1 of b[1] collides with that of b[0]
    result = match_features(b, a, one_to_one=True, cache=False)
    assert sorted(result.indices[:, 0].tolist()) == list(range(64))
    assert result.one_to_one
    with pytest.raises(FlowError, match="equal width"):
        one_to_one_match(torch.randn(5, 4), torch.randn(6, 4))
    with pytest.raises(FlowError, match="max_width"):
        one_to_one_match(torch.randn(5, 4), torch.randn(5, 4), max_width=4)


def test_transition_matrix_and_transport_follow_the_operator():
    scores = torch.tensor([[0.9, 0.2], [0.7, -0.1], [-0.3, -0.4]])
    indices = torch.tensor([[2, 0], [1, 2], [0, 1]])
    result = matching.MatchResult(indices, scores)
    dense = result.transition_matrix(3).to_dense()
    expected = torch.tensor([[0.2, 0.0, 0.9], [0.0, 0.7, 0.0], [0.0, 0.0, 0.0]])  # 1[x>0] ⊙ topk_row
    torch.testing.assert_close(dense, expected)
    f = torch.tensor([[2.0, 1.0]])  # latent 0 at 2.0, latent 1 at 1.0
    values, ids = result.transport(f, torch.tensor([[0, 1]]))
    f_hat = torch.zeros(1, 3).index_put_((torch.zeros_like(ids[0]), ids[0]), values[0], accumulate=True)
    torch.testing.assert_close(f_hat, torch.tensor([[2.0, 1.0, 0.0]]) @ expected)


def test_matches_are_cached_on_disk_keyed_by_the_decoders(tmp_path, monkeypatch):
    torch.manual_seed(5)
    saes = {
        (0, "resid"): planted_sae(_unit(torch.randn(64, 16)), 0),
        (1, "resid"): planted_sae(_unit(torch.randn(80, 16)), 1),
    }
    calls = []
    original = matching.match_decoders
    monkeypatch.setattr(matching, "match_decoders", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = FeatureFlow(saes, cache_dir=tmp_path).match((1, "resid"), (0, "resid"))
    assert len(calls) == 1 and len(list(tmp_path.glob("match-*.safetensors"))) == 1
    again = FeatureFlow(saes, cache_dir=tmp_path).match((1, "resid"), (0, "resid"))  # a new flow: from disk
    assert len(calls) == 1
    torch.testing.assert_close(again.indices, first.indices)
    torch.testing.assert_close(again.scores, first.scores)
    with torch.no_grad():
        saes[(0, "resid")].W_dec[3] *= -1  # changed weights -> a new key
    FeatureFlow(saes, cache_dir=tmp_path).match((1, "resid"), (0, "resid"))
    assert len(calls) == 2 and len(list(tmp_path.glob("match-*.safetensors"))) == 2
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    key_k1 = MatchCache.key(saes[(1, "resid")], saes[(0, "resid")], 1, False)
    assert key_k1 != MatchCache.key(saes[(1, "resid")], saes[(0, "resid")], 2, False)


def _jumprelu(d_in=16, d_sae=32):
    torch.manual_seed(6)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, hook_layer=2, hook_site="mlp")).eval()
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in) * torch.rand(d_sae, 1) * 2)  # raw, non-unit rows
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / 4)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
        sae.threshold.copy_(torch.rand(d_sae) * 0.5)
        sae.threshold[0] = 0.0  # a plain ReLU latent stays as it is
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
    return sae


def test_folding_a_jumprelu_sae_keeps_its_outputs_and_sets_thresholds_to_one():
    sae = _jumprelu()
    folded = fold_jumprelu(sae)
    x = torch.randn(50, 16)
    torch.testing.assert_close(folded(x).reconstruction, sae(x).reconstruction, rtol=1e-4, atol=1e-5)
    theta = sae.threshold.detach()
    assert float(folded.threshold.detach()[0]) == 0.0 and bool((folded.threshold[1:] == 1).all())
    torch.testing.assert_close(folded.W_dec[1:], sae.W_dec[1:] * theta[1:, None])
    dense, dense_folded = sae.encode_dense(x), folded.encode_dense(x)
    torch.testing.assert_close(dense_folded[:, 1:] * theta[1:], dense[:, 1:], rtol=1e-4, atol=1e-6)
    # matching sees unit rows, so folding does not change a match
    torch.testing.assert_close(match_decoders(folded, sae)[1][:, 0], torch.arange(32))
    assert sae.threshold.data_ptr() != folded.threshold.data_ptr()  # a copy: the original is untouched


def test_feature_scales_are_theta_times_row_norm_or_mean_activation():
    sae = _jumprelu()
    scales = feature_scales(sae)
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(scales[1:], sae.threshold.detach()[1:] * norms[1:])
    torch.testing.assert_close(scales[0], norms[0])  # theta = 0: one unit of the raw row
    torch.testing.assert_close(scales, fold_jumprelu(sae).W_dec.detach().norm(dim=1))
    topk = planted_sae(_unit(torch.randn(8, 16)))
    with pytest.raises(FlowError, match="calibrate"):
        feature_scales(topk)
    mean = torch.tensor([2.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0, 0.5])
    torch.testing.assert_close(feature_scales(topk, mean), torch.where(mean > 0, mean, torch.ones(8)))


def test_bad_arguments_are_named():
    with pytest.raises(FlowError, match="different widths"):
        match_decoders(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(FlowError, match="block_size"):
        match_decoders(torch.randn(4, 8), torch.randn(4, 8), block_size=0)
    with pytest.raises(FlowError, match="k must be"):
        match_decoders(torch.randn(4, 8), torch.randn(4, 8), 0)
    with pytest.raises(FlowError, match="one_to_one"):
        match_features(torch.randn(4, 8), torch.randn(4, 8), k=2, one_to_one=True, cache=False)

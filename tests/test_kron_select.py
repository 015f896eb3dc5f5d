"""KronSAE's TopK selection without a dense pass: the compiled kernel and the pure-torch per-head selection pick the
same latents (same values, in the same order) as ``topk`` over all d_sae scores, and the step that uses them
gives the gradients of the dense reference (b_dec's through the bias, mAND's guarded at zero)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_sae import KronSAE, KronSAEConfig
from hf_sae.kernels import kron_cpu_kernels
from hf_sae.modeling_kron_sae import latent_columns, mand, select_topk_latents, select_topk_latents_reference


def _dense_scores(pre: torch.Tensor, h: int, m: int, n: int) -> torch.Tensor:
    heads = pre.view(pre.shape[0], h, m + n)
    return (heads[..., :m].relu()[..., :, None] * heads[..., m:].relu()[..., None, :]).reshape(pre.shape[0], -1)


# (300, 2, 3, 8): h >= 8k, so the head bound is searched among the heads above the strided block maxima' bound
# (300 heads are 9 full strides of 32 blocks and a partial one)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "h, m, n, k", [(64, 2, 4, 32), (16, 4, 8, 64), (8, 2, 4, 6), (3, 2, 2, 12), (4, 1, 1, 4), (300, 2, 3, 8)]
)
def test_per_head_selection_equals_topk_over_all_scores(h, m, n, k, dtype):
    torch.manual_seed(0)
    pre = (torch.randn(97, h * (m + n)) + 0.3).to(dtype)
    dense_values, dense_ids = _dense_scores(pre, h, m, n).topk(k, dim=-1)
    ids, columns = select_topk_latents(pre, h, m, n, k)
    reference = select_topk_latents_reference(pre, h, m, n, k)
    for chosen in (ids, reference):
        assert torch.equal(_dense_scores(pre, h, m, n).gather(1, chosen), dense_values)  # same floats, same order
    assert torch.equal(columns, torch.cat(latent_columns(ids, m, n), dim=-1))
    if k < h * m * n // 2:  # no zero-score ties at the cut: the very same ids
        assert torch.equal(ids, dense_ids) and torch.equal(reference, dense_ids)


@pytest.mark.parametrize("h, m, n, k", [(64, 2, 4, 32), (16, 4, 8, 64), (3, 2, 2, 12)])
def test_the_bias_added_on_the_fly_selects_as_the_biased_scores(h, m, n, k):
    torch.manual_seed(2)
    pre, bias = torch.randn(53, h * (m + n)), torch.randn(h * (m + n)) * 0.5
    dense_values, _ = _dense_scores(pre + bias, h, m, n).topk(k, dim=-1)
    ids, columns = select_topk_latents(pre, h, m, n, k, bias=bias)
    assert torch.equal(_dense_scores(pre + bias, h, m, n).gather(1, ids), dense_values)
    assert torch.equal(columns, torch.cat(latent_columns(ids, m, n), dim=-1))
    assert torch.equal(ids, select_topk_latents(pre + bias, h, m, n, k)[0])


def test_exact_ties_at_the_head_bound_are_all_candidates():
    # h = 3 heads, m = n = 1, k = 2: head bests 2, 1, 1 -> the bound is 1 and both tied heads are candidates;
    # the tie is broken by the smaller id (head 1), as a dense top-k with that rule would
    pre = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    ids, columns = select_topk_latents(pre, 3, 1, 1, 2)
    assert ids.tolist() == [[0, 1]] and columns.tolist() == [[0, 2, 1, 3]]


def test_latent_columns_by_hand():
    # m = 2, n = 4, width 6: latent 13 = head 1, i = 1, j = 1 reads u column 6 + 1 = 7 and w column 6 + 2 + 1 = 9
    base, ext = latent_columns(torch.tensor([[13, 0, 7]]), 2, 4)
    assert base.tolist() == [[7, 0, 1]] and ext.tolist() == [[9, 2, 5]]


@pytest.mark.skipif(kron_cpu_kernels() is None, reason="the KronSAE CPU kernel could not be built here")
def test_the_kernel_breaks_ties_by_the_smaller_id():
    pre = torch.zeros(1, 2 * 3)  # h = 2, m = 1, n = 2: every score is 0
    pre[0, 0], pre[0, 1] = 1.0, 2.0  # head 0: u = 1, w = (2, 0) -> scores (2, 0); head 1: all 0
    ids, _ = kron_cpu_kernels().kron_select_topk(pre, torch.zeros(0), 2, 1, 2, 3)
    assert ids.tolist() == [[0, 1, 2]]


@pytest.mark.skipif(kron_cpu_kernels() is None, reason="the KronSAE CPU kernel could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("first", [-0.0, float("nan")])
def test_negative_zero_and_nan_pre_activations_score_zero(first, dtype):
    # h = 2, m = 1, n = 2. Head 0: u = first, w = (2, 0) -> scores 0, 0; head 1: u = 1, w = (1, 0.5) -> 1, 0.5.
    # The top 3 are latents 2, 3, then the zero tie 0 / 1 -> 0. (A -0 score once ranked above every positive one:
    # its sign bit made the largest integer key; a NaN gave the id 2**32 - 1.)
    pre = torch.tensor([[first, 2.0, 0.0, 1.0, 1.0, 0.5]], dtype=dtype)
    ids, columns = kron_cpu_kernels().kron_select_topk(pre, torch.zeros(0, dtype=dtype), 2, 1, 2, 3)
    assert ids.tolist() == [[2, 3, 0]] and columns.tolist() == [[3, 3, 0, 4, 5, 1]]


def test_pre_activations_are_w_times_x_minus_b_dec_plus_b_exactly():
    # one head, m = n = 1: u = W_0·(x − b_dec) + b_0, w = W_1·(x − b_dec) + b_1, all exact in binary floats
    sae = KronSAE(KronSAEConfig(d_in=2, num_heads=1, base_dim=1, ext_dim=1, k=1))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        sae.encoder.bias.copy_(torch.tensor([0.5, 0.25]))
        sae.b_dec.copy_(torch.tensor([1.0, 2.0]))
    x = torch.tensor([[4.0, 3.0], [1.0, 4.0]])
    # x − b_dec = (3, 1): u = 3 + 2 + 0.5 = 5.5, w = 9 − 1 + 0.25 = 8.25;  (0, 2): u = 4.5, w = −1.75 (inactive)
    u, w = sae.head_factors(x)
    assert u.flatten().tolist() == [5.5, 4.5] and w.flatten().tolist() == [8.25, -1.75]
    latents = sae.encode(x)
    assert latents.values.flatten().tolist() == [pytest.approx(math.sqrt(5.5 * 8.25), rel=1e-7), 0.0]  # fp32 sqrt
    sae.config.apply_b_dec_to_input = False  # raw x: u = 4 + 6 + 0.5 = 10.5, w = 12 − 3 + 0.25 = 9.25
    assert sae.head_factors(x)[0][0].item() == 10.5 and sae.head_factors(x)[1][0].item() == 9.25


@pytest.mark.parametrize("centred", [True, False])
def test_the_step_gradients_equal_a_dense_reference_with_auxk(centred):
    torch.manual_seed(1)
    config = KronSAEConfig(
        d_in=16,
        num_heads=16,
        base_dim=2,
        ext_dim=4,
        k=6,
        hierarchical=False,
        auxk_k=8,
        dead_tokens=1,
        apply_b_dec_to_input=centred,
    )
    sae = KronSAE(config).train()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(0, 0.1)
    x = torch.randn(64, 16)
    sae.tokens_since_fired[::2] = 10  # half the latents dead: AuxK ranks them densely
    dead = sae.dead_mask().clone()
    out = sae(x)
    out.loss.backward()
    sparse = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    # dense reference: every score from W(x − b_dec) + b, the same top-k, plain MSE at k + scaled AuxK
    pre = torch.nn.functional.linear(x - sae.b_dec if centred else x, sae.encoder.weight, sae.encoder.bias)
    heads = pre.reshape(64, 16, 6)
    scores = mand(heads[..., :2, None], heads[..., None, 2:]).reshape(64, 128)
    values, indices = scores.topk(6, dim=-1)
    assert torch.equal(indices, out.latents.indices)
    x_hat = sae.b_dec + (values.unsqueeze(-1) * sae.W_dec[indices]).sum(1)
    aux_values, aux_indices = scores.masked_fill(~dead, -1.0).topk(8, dim=-1)
    residual = (x - x_hat).detach()
    e_hat = (aux_values.unsqueeze(-1) * sae.W_dec[aux_indices]).sum(1)
    aux = (residual - e_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    ((x - x_hat).pow(2).mean() + aux * config.auxk_coefficient * min(1.0, 64 / 8)).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

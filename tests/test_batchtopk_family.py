"""BatchTopK, Matryoshka BatchTopK and JumpReLU training: losses against naive float64 references (values and
gradients), the selection and the threshold, the prefixes, the straight-through estimators, short training runs on
planted features, save/load, the training CLI's names, steering and splicing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from hf_sae import (
    BatchTopKSAE,
    BatchTopKSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    SAEConfigError,
    SAEInputError,
    training_step,
)
from hf_sae.losses import (
    flat_matryoshka_loss,
    flat_mse_loss,
    hierarchical_topk_loss,
    jumprelu,
    matryoshka_loss,
    step,
)
from hf_sae.metrics import explained_variance, l0_distribution
from hf_sae.registry import resolve_architecture
from hf_sae.sparse import batch_topk_select, batch_topk_select_by_doubling, select_topk

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SAEs: thread hand-off would dominate on busy cores

D_IN, D_SAE, K = 16, 64, 4


def _batchtopk(**overrides) -> BatchTopKSAE:
    return BatchTopKSAE(BatchTopKSAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, "k": K, **overrides}))


def _matryoshka(**overrides) -> MatryoshkaSAE:
    config = {"d_in": D_IN, "d_sae": D_SAE, "k": K, "group_sizes": [8, 24, 32], **overrides}
    return MatryoshkaSAE(MatryoshkaSAEConfig(**config))


def _trainable_jumprelu(**overrides) -> JumpReLUSAE:
    architecture, preset = resolve_architecture("jumprelu")
    return JumpReLUSAE(architecture.build_config(preset, **{"d_in": D_IN, "d_sae": D_SAE, **overrides}))


# ------------------------------------------------------------------------------------------- BatchTopK selection
def test_batch_topk_keeps_the_batchs_n_times_k_largest_activations():
    scores = torch.tensor([[5.0, 0.0, 1.0, 0.5], [4.0, 3.0, 2.5, 0.2], [0.1, 0.0, 0.0, 6.0]])
    values, indices, _, _ = batch_topk_select(scores, 2)  # the 6 largest of the batch: 6, 5, 4, 3, 2.5, 1
    dense = torch.zeros_like(scores).scatter_(1, indices, values)
    expected = torch.tensor([[5.0, 0.0, 1.0, 0.0], [4.0, 3.0, 2.5, 0.0], [0.0, 0.0, 0.0, 6.0]])
    assert torch.equal(dense, expected)
    assert values.shape == (3, 3) and torch.all(values[:, :-1] >= values[:, 1:])  # sorted; padded with zeros
    assert [len(set(row.tolist())) for row in indices] == [3, 3, 3]  # padding never repeats a kept latent


def _scores_with_outliers(n: int, num_latents: int, outliers: list[int], seed: int, shift: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, num_latents, generator=generator) + shift
    scores[outliers] = scores[outliers].abs() * 8.0  # outlier tokens: every latent active, and large
    bias = 0.1 * torch.randn(num_latents, generator=generator)
    return scores, bias


def _brute_force_batch_topk(scores, bias, k):
    """The N·k largest of ReLU(scores + bias) over the whole batch, as a dense (N, F) tensor (zeros elsewhere)."""
    acts = (scores + bias).clamp_min(0).reshape(-1)
    _, top = acts.topk(scores.shape[0] * k)
    return torch.zeros_like(acts).index_copy_(0, top, acts[top]).view_as(scores)


@pytest.mark.parametrize(
    "n, num_latents, k, outliers, shift",
    [
        (64, 64, 4, [3], 0.0),  # one outlier keeps all 64 latents (> 4k = 16 candidates)
        (64, 64, 4, [0, 5, 63], 0.0),
        (40, 256, 3, [7, 8], 0.0),
        (30, 16, 4, [2], 0.0),  # 4k = F: the candidates are the whole rows
        (50, 64, 4, [1], -2.5),  # fewer positive activations than N·k in ordinary rows: zeros kept, then dropped
        (50, 64, 4, [], 0.0),  # no outlier
        (1, 64, 4, [0], 0.0),
    ],
)
def test_the_exact_batch_topk_selection_matches_a_brute_force_top_of_the_batch(n, num_latents, k, outliers, shift):
    scores, bias = _scores_with_outliers(n, num_latents, outliers, seed=n + num_latents, shift=shift)
    dead = torch.zeros(num_latents, dtype=torch.bool)
    dead[::3] = True
    values, indices, aux_values, aux_indices = batch_topk_select(scores, k, bias, dead, 2)
    expected = _brute_force_batch_topk(scores, bias, k)
    assert torch.equal(torch.zeros_like(scores).scatter_(1, indices, values), expected)
    counts = (expected > 0).sum(-1)
    assert values.shape == (n, max(1, int(counts.max())))
    assert torch.all(values[:, :-1] >= values[:, 1:])  # sorted descending, zeros last
    for row_values, row_indices in zip(values, indices):
        kept = set(row_indices[row_values > 0].tolist())
        assert len(kept) == int((row_values > 0).sum()) and not kept & set(row_indices[row_values == 0].tolist())
    # the same as the earlier doubling selection (indices of the kept entries in the same order) and its AuxK
    old_values, old_indices, old_aux_values, old_aux_indices = batch_topk_select_by_doubling(scores, k, bias, dead, 2)
    assert torch.equal(values, old_values) and torch.equal(indices[values > 0], old_indices[old_values > 0])
    _, _, want_aux_values, want_aux_indices = select_topk(scores, min(num_latents, 4 * k), dead, 2, bias=bias)
    assert torch.equal(aux_values, want_aux_values) and torch.equal(aux_indices, want_aux_indices)
    assert torch.equal(aux_values, old_aux_values) and torch.equal(aux_indices, old_aux_indices)


def test_the_exact_selection_never_sorts_more_than_the_overflow_rows(monkeypatch):
    """Only the outlier row is taken whole: select_topk runs once, at 4k candidates (no doubling of c)."""
    from hf_sae import sparse

    calls = []
    original = sparse.select_topk

    def counting(scores, cap, *args, **kwargs):
        calls.append(cap)
        return original(scores, cap, *args, **kwargs)

    monkeypatch.setattr(sparse, "select_topk", counting)
    scores, bias = _scores_with_outliers(128, 512, [4], seed=1)
    values, _, _, _ = sparse.batch_topk_select(scores, 4, bias)
    assert calls == [16] and values.shape[1] > 16


def _padded_and_flat_steps(make, x, dead: bool):
    """(output, gradients, sae) of one training forward + backward on the padded path and on the flat path."""
    results = []
    for factor in (math.inf, 0.0):
        torch.manual_seed(0)
        sae = make().double()
        with torch.no_grad():
            sae.encoder.bias.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.3)
        if dead:
            sae.tokens_since_fired[::2] = 10**9  # half the latents dead: AuxK on
        sae.flat_width_factor = factor
        sae.train()
        out = sae(x)
        out.loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in sae.named_parameters()}, sae))
    return results


@pytest.mark.parametrize("dead", [False, True], ids=["auxk_off", "auxk_on"])
@pytest.mark.parametrize("make", [_batchtopk, _matryoshka], ids=["batchtopk", "matryoshka"])
def test_the_flat_path_gives_the_padded_paths_loss_gradients_and_output(make, dead):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(48, D_IN, dtype=torch.float64, generator=generator)
    x[[3, 30]] *= 8.0  # outlier tokens: the selection is much wider than k
    (padded, padded_grads, padded_sae), (flat, flat_grads, flat_sae) = _padded_and_flat_steps(
        lambda: make(auxk=dead, dead_tokens=1), x, dead
    )
    assert padded.latents.values.shape[1] > 2 * K
    assert set(flat.losses) == set(padded.losses) == ({"reconstruction", "auxk"} if dead else {"reconstruction"})
    for name in padded.losses:
        torch.testing.assert_close(flat.losses[name], padded.losses[name], rtol=1e-10, atol=0, msg=name)
    torch.testing.assert_close(flat.loss, padded.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(flat.reconstruction, padded.reconstruction, rtol=1e-10, atol=1e-12)
    assert torch.equal(flat.latents.values.detach(), padded.latents.values.detach())
    assert torch.equal(flat.latents.indices, padded.latents.indices)
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        torch.testing.assert_close(flat_grads[name], padded_grads[name], rtol=1e-6, atol=1e-12, msg=name)
    assert set(flat_grads) == set(padded_grads)
    assert torch.equal(flat_sae.tokens_since_fired, padded_sae.tokens_since_fired)
    assert torch.equal(flat_sae.threshold, padded_sae.threshold)
    assert torch.equal(flat_sae.threshold_batches, padded_sae.threshold_batches)


def test_the_flat_losses_equal_the_padded_losses():
    generator = torch.Generator().manual_seed(2)
    n, t, num_latents, d = 7, 6, 24, 5
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    indices = torch.stack([torch.randperm(num_latents, generator=generator)[:t] for _ in range(n)])
    values = torch.rand(n, t, dtype=torch.float64, generator=generator)
    values[values < 0.3] = 0  # padding-like zeros, dropped by the flat form
    values[4] = 0  # a row with no latent at all
    W_dec = torch.randn(num_latents, d, dtype=torch.float64, generator=generator)
    b_dec = torch.randn(d, dtype=torch.float64, generator=generator)
    rows, positions = (values > 0).nonzero(as_tuple=True)
    columns, flat_values = indices[rows, positions], values[rows, positions]
    for flat, padded in [
        (flat_mse_loss(x, flat_values, rows, columns, W_dec, b_dec), hierarchical_topk_loss(
            x, values, indices, W_dec, b_dec, [t])),
        (flat_matryoshka_loss(x, flat_values, rows, columns, W_dec, b_dec, [3, 10, 24]), matryoshka_loss(
            x, values, indices, W_dec, b_dec, [3, 10, 24])),
    ]:  # fmt: skip
        torch.testing.assert_close(flat[0], padded[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(flat[1], padded[1], rtol=1e-12, atol=1e-12)


def test_batchtopk_mean_l0_is_k_in_training_and_the_threshold_is_used_at_inference():
    sae = _batchtopk(auxk=False)
    x = torch.randn(64, D_IN)
    sae.train()
    out = sae(x)
    counts = (out.latents.values > 0).sum(-1)
    assert counts.double().mean() == K and counts.min() < K < counts.max()  # mean k, varying per token
    with torch.no_grad():
        scores = sae.pre_acts(x)
        kept = torch.zeros_like(scores).scatter_(1, out.latents.indices, out.latents.values.detach())
    smallest = float(kept[kept > 0].min())
    assert float(sae.threshold) == pytest.approx(smallest) and int(sae.threshold_batches) == 1
    sae(torch.randn(64, D_IN))  # second batch: theta is the mean of both batches' smallest kept activation
    second = float(sae.threshold)
    assert second != smallest
    sae.eval()
    with torch.no_grad():
        latents = sae.encode(x)
        dense = latents.to_dense(D_SAE)
        assert torch.equal(dense > 0, scores > second)  # every latent above theta, nothing else
        torch.testing.assert_close(dense, scores * (scores > second))
        assert torch.all(latents.values[:, :-1] >= latents.values[:, 1:])
        assert latents.values.shape[1] == int((scores > second).sum(-1).max())
        torch.testing.assert_close(sae(x).reconstruction, sae.decode(latents))


def test_threshold_estimate_is_the_running_mean_then_an_exponential_average():
    sae = _batchtopk(threshold_lr=0.5)
    smallest = [0.4, 1.0, 0.2]
    for value in smallest:
        sae._update_threshold(torch.tensor([[value, 3.0], [0.0, 2.0]]))
    # t=1: 0.4; t=2: rate max(0.5, 1/2) -> 0.7; t=3: rate 0.5 -> 0.45
    assert float(sae.threshold) == pytest.approx(0.45) and int(sae.threshold_batches) == 3


def test_batchtopk_encode_at_a_budget_is_the_per_token_topk_and_nested():
    sae = _batchtopk()
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        scores = sae.pre_acts(x)
        for j in range(1, K + 1):
            part = sae.encode(x, k=j)
            torch.testing.assert_close(part.values, scores.topk(j, dim=-1).values)
    with pytest.raises(SAEInputError, match="k=5"):
        sae.encode(x, k=K + 1)


def test_an_untrained_batchtopk_encodes_with_topk_until_theta_is_estimated():
    sae = _batchtopk()
    x = torch.randn(7, D_IN)
    with torch.no_grad():
        assert torch.equal(sae.encode(x).values, sae.encode(x, k=K).values)


def _naive_prefix_mse(x, values, indices, W_dec, b_dec, budgets):
    dense = torch.zeros(x.shape[0], W_dec.shape[0], dtype=x.dtype)
    losses = []
    for j in budgets:
        part = torch.zeros_like(dense).scatter(1, indices[:, :j], values[:, :j])
        losses.append(((x - b_dec - part @ W_dec) ** 2).mean())
    return sum(losses) / len(losses)


def test_batchtopk_hierarchical_objective_by_value_matches_the_naive_prefix_average():
    sae = _batchtopk(hierarchical=True, auxk=False).double()
    x = torch.randn(24, D_IN, dtype=torch.float64)
    sae.train()
    out = sae(x)
    values, indices = out.latents.values, out.latents.indices
    expected = _naive_prefix_mse(
        x, values.detach(), indices, sae.W_dec.detach(), sae.b_dec.detach(), range(1, values.shape[1] + 1)
    )
    torch.testing.assert_close(out.losses["reconstruction"].detach(), expected)


def test_batchtopk_gradients_match_a_dense_float64_reference():
    torch.manual_seed(3)
    sae = _batchtopk(auxk=False).double()
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(20, D_IN, dtype=torch.float64)
    sae.train()
    out = sae(x)
    out.loss.backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    mask = torch.zeros(20, D_SAE, dtype=torch.bool).scatter_(1, out.latents.indices, out.latents.values > 0)
    pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.t() + sae.encoder.bias)
    x_hat = (pre * mask) @ sae.W_dec + sae.b_dec
    ((x - x_hat) ** 2).mean().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


# ----------------------------------------------------------------------------------------------- Matryoshka
def _naive_matryoshka(x, values, indices, W_dec, b_dec, widths):
    dense = torch.zeros(x.shape[0], W_dec.shape[0], dtype=x.dtype).scatter(1, indices, values)
    total = 0.0
    for width in widths:
        x_hat = b_dec + dense[:, :width] @ W_dec[:width]
        total = total + ((x - x_hat) ** 2).mean()
    return total


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "embedding_bag"])
@pytest.mark.parametrize("widths", [[3, 7, 12], [1, 2, 12], [5, 12]])
def test_matryoshka_loss_values_and_gradients_match_the_naive_sum_of_prefix_mses(use_kernel, widths):
    generator = torch.Generator().manual_seed(5)
    n, t = 6, 5
    x = torch.randn(n, 4, dtype=torch.float64, generator=generator)
    indices = torch.stack([torch.randperm(12, generator=generator)[:t] for _ in range(n)])
    values = torch.rand(n, t, dtype=torch.float64, generator=generator).requires_grad_()
    W_dec = torch.randn(12, 4, dtype=torch.float64, generator=generator).requires_grad_()
    b_dec = torch.randn(4, dtype=torch.float64, generator=generator).requires_grad_()
    loss, reconstruction = matryoshka_loss(x, values, indices, W_dec, b_dec, widths, use_kernel=use_kernel)
    grads = torch.autograd.grad(loss, [values, W_dec, b_dec])
    expected = _naive_matryoshka(x, values, indices, W_dec, b_dec, widths)
    expected_grads = torch.autograd.grad(expected, [values, W_dec, b_dec])
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    dense = torch.zeros(n, 12, dtype=torch.float64).scatter(1, indices, values.detach())
    torch.testing.assert_close(reconstruction, b_dec.detach() + dense @ W_dec.detach())


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "embedding_bag"])
def test_matryoshka_hand_computed_two_prefix_case(use_kernel):
    # d_in 1, latents 0 (group 0) and 1 (group 1): W_dec = [[1], [2]], b_dec = 0, x = 3, values 1 and 0.5
    loss, reconstruction = matryoshka_loss(
        torch.tensor([[3.0]]),
        torch.tensor([[0.5, 1.0]]),
        torch.tensor([[1, 0]]),
        torch.tensor([[1.0], [2.0]]),
        torch.zeros(1),
        [1, 2],
        use_kernel=use_kernel,
    )
    # prefix 1: x̂ = 1 -> (3-1)² = 4; prefix 2: x̂ = 1 + 1 = 2 -> 1; sum 5
    assert float(loss) == 5.0 and float(reconstruction) == 2.0


def test_matryoshka_prefixes_decode_only_their_groups():
    sae = _matryoshka()
    sae.train()
    sae(torch.randn(64, D_IN))  # estimate theta
    sae.eval()
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        latents = sae.encode(x)
        dense = latents.to_dense(D_SAE)
        for group, width in enumerate(sae.config.prefix_widths):
            expected = sae.b_dec + dense[:, :width] @ sae.W_dec[:width]
            torch.testing.assert_close(sae.decode_prefix(latents, group), expected)
        torch.testing.assert_close(sae.decode_prefix(latents, 2), sae.decode(latents))
    with pytest.raises(SAEInputError, match="group=3 is outside 0..2"):
        sae.decode_prefix(latents, 3)


def test_matryoshka_forward_loss_is_the_sum_of_its_prefix_mses():
    sae = _matryoshka(auxk=False)
    sae.train()
    x = torch.randn(32, D_IN)
    out = sae(x)
    values, indices = out.latents.values.detach(), out.latents.indices
    expected = _naive_matryoshka(x, values, indices, sae.W_dec.detach(), sae.b_dec.detach(), [8, 32, 64])
    torch.testing.assert_close(out.losses["reconstruction"].detach(), expected)


def test_matryoshka_and_batchtopk_configs_validate():
    assert MatryoshkaSAEConfig(d_in=4, d_sae=64).group_sizes == [4, 4, 8, 16, 32]  # prefixes double
    with pytest.raises(SAEConfigError, match=r"sum to 40, not d_sae=64"):
        MatryoshkaSAEConfig(d_in=4, d_sae=64, group_sizes=[8, 32])
    with pytest.raises(SAEConfigError, match="hierarchical=True is not supported by MatryoshkaSAEConfig"):
        MatryoshkaSAEConfig(d_in=4, d_sae=64, hierarchical=True)
    with pytest.raises(SAEConfigError, match="budgets=.* cannot be set"):
        BatchTopKSAEConfig(d_in=4, d_sae=64, budgets=[2])
    with pytest.raises(SAEConfigError, match="threshold_lr must be a number in"):
        BatchTopKSAEConfig(d_in=4, d_sae=64, threshold_lr=0)


# -------------------------------------------------------------------------------------------------- JumpReLU
def test_jumprelu_straight_through_gradients_follow_the_papers_formulas():
    # Rajamanoharan et al. 2024 Eq. 11-12, K the rectangle kernel 1[|u| < 1/2], ε = 0.5
    pre = torch.tensor([[0.10, 0.90, 1.30, -0.05]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.20, 1.00, 0.50, 0.1], dtype=torch.float64, requires_grad=True)
    eps = 0.5
    out = jumprelu(pre, theta, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.0, 1.3, 0.0]], dtype=torch.float64))
    grad_pre, grad_theta = torch.autograd.grad(out.sum(), [pre, theta])
    inside = ((pre - theta).abs() < eps / 2).double()  # |z − θ| < ε/2: here latents 0, 1 and 3
    assert torch.equal(inside, torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(grad_theta, (-(theta / eps) * inside).sum(0))  # ∂/∂θ JumpReLU = −(θ/ε) K
    torch.testing.assert_close(grad_pre, (pre > theta).double().detach())  # H(z − θ), no STE into z
    gate = step(pre, theta, eps)
    grad_pre, grad_theta = torch.autograd.grad(gate.sum(), [pre, theta], allow_unused=True)
    torch.testing.assert_close(grad_theta, (-(1 / eps) * inside).sum(0))  # ∂/∂θ H(z − θ) = −(1/ε) K
    assert grad_pre is None or not grad_pre.any()


def test_jumprelu_training_loss_is_mse_plus_warmed_up_lambda_l0_and_matches_a_naive_reference():
    sae = _trainable_jumprelu(l0_coefficient=0.1, l0_warmup_steps=4, bandwidth=0.5, initial_threshold=0.3).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    x = torch.randn(12, D_IN, dtype=torch.float64)
    sae.train()
    for step_number in (1, 2):
        out = sae(x)
        theta = sae.log_threshold.exp()
        pre = x @ sae.W_enc + sae.b_enc
        acts = pre * (pre > theta)
        mse = ((acts @ sae.W_dec + sae.b_dec - x) ** 2).mean()
        l0 = (pre > theta).double().sum(-1).mean()
        torch.testing.assert_close(out.losses["reconstruction"], mse)
        torch.testing.assert_close(out.losses["l0"], 0.1 * (step_number / 4) * l0)
        torch.testing.assert_close(out.loss, mse + 0.1 * (step_number / 4) * l0)
    sae.zero_grad()
    out.loss.backward()
    eps, coef = 0.5, 0.1 * 2 / 4
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        theta = sae.log_threshold.exp()
        residual = 2 * (acts @ sae.W_dec + sae.b_dec - x) / x.numel()  # ∂MSE/∂x̂
        grad_acts = residual @ sae.W_dec.t()
        kernel = ((pre - theta).abs() < eps / 2).double()
        grad_theta = (grad_acts * -(theta / eps) * kernel).sum(0) + coef * (-(1 / eps) * kernel).sum(0) / x.shape[0]
    torch.testing.assert_close(sae.log_threshold.grad, grad_theta * theta)  # θ = exp(log θ)
    assert int(sae.steps_trained) == 2


def test_the_jumprelu_warmup_default_follows_the_length_of_the_run():
    assert JumpReLUSAE.run_defaults(1_000_000) == {"l0_warmup_steps": 10_000}  # Gemma Scope's
    assert JumpReLUSAE.run_defaults(300) == {"l0_warmup_steps": 30}
    assert BatchTopKSAE.run_defaults(300) == {}


def test_jumprelu_log_parametrisation_reads_theta_and_folds_scales():
    sae = _trainable_jumprelu(initial_threshold=0.25)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.25))
    x = torch.randn(9, D_IN)
    with torch.no_grad():
        reference = sae.encode_dense(2.0 * x) / 2.0
        sae.fold_activation_scale(2.0)
        torch.testing.assert_close(sae.encode_dense(x), reference)
        torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.125))
    with pytest.raises(SAEConfigError, match="threshold_parametrization='exp' is unknown"):
        JumpReLUSAEConfig(d_in=4, d_sae=8, threshold_parametrization="exp")
    with pytest.raises(SAEConfigError, match="bandwidth must be a finite number > 0"):
        JumpReLUSAEConfig(d_in=4, d_sae=8, bandwidth=0)


# ---------------------------------------------------------------------------------------- training on planted data
def planted_data(n: int, d_in: int = 32, n_features: int = 96, active: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    mags = torch.rand(n, active, generator=g) * 2 + 1
    return (mags.unsqueeze(-1) * directions[idx]).sum(1)


def _train(sae, x, steps: int, lr: float) -> tuple[float, float]:
    """(EV before, EV after) of ``steps`` training steps on batches of ``x``."""
    sae.initialize_b_dec(x[:512])
    test = x[:1024]
    with torch.no_grad():
        before = explained_variance(test, sae.eval()(test).reconstruction)
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        training_step(sae, optimizer, x[torch.randint(0, x.shape[0], (256,), generator=generator)])
    sae.eval()
    with torch.no_grad():
        return before, explained_variance(test, sae(test).reconstruction)


@pytest.mark.parametrize("arch", ["batchtopk", "batchtopk_hierarchical", "matryoshka", "jumprelu"])
def test_short_training_reduces_fvu_on_planted_features(arch):
    torch.manual_seed(0)
    x = planted_data(4096)
    if arch.startswith("batchtopk"):
        sae = BatchTopKSAE(
            BatchTopKSAEConfig(d_in=32, d_sae=96, k=4, dead_tokens=2048, hierarchical=arch.endswith("hierarchical"))
        )
    elif arch == "matryoshka":
        sae = MatryoshkaSAE(MatryoshkaSAEConfig(d_in=32, d_sae=96, k=4, dead_tokens=2048, group_sizes=[16, 32, 48]))
    else:
        sae = _trainable_jumprelu(
            d_in=32, d_sae=96, l0_coefficient=1e-2, l0_warmup_steps=50, bandwidth=0.1, initial_threshold=0.5
        )
    before, after = _train(sae, x, 300, 1e-2)
    assert after > 0.65 and after > before + 0.3, (before, after)  # plain TopK here: 0.70 at lr 3e-3
    with torch.no_grad():
        l0 = (sae.encode(x[:1024]).values > 0).sum(-1).double().mean()
    assert 1 <= l0 <= 12, l0  # sparse at inference (the threshold): ~4 for BatchTopK, ~8 for JumpReLU


# ------------------------------------------------------------------------------------------- saving and names
@pytest.mark.parametrize(
    "make", [_batchtopk, _matryoshka, _trainable_jumprelu], ids=["batchtopk", "matryoshka", "jumprelu"]
)
def test_save_then_auto_model_round_trip_keeps_thresholds_and_outputs(make, tmp_path):
    sae = make()
    sae.train()
    sae(torch.randn(64, D_IN))  # a threshold estimate / a warm-up step to save
    sae.eval()
    sae.save_pretrained(tmp_path / "sae")
    loaded = AutoModel.from_pretrained(tmp_path / "sae")
    assert type(loaded) is type(sae)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        a, b = sae.encode(x), loaded.encode(x)
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


def test_folding_a_scale_keeps_batchtopk_threshold_latents_on_raw_activations():
    sae = _batchtopk()
    sae.config.activation_scale, sae.config.activation_scale_folded = 2.5, False
    sae.train()
    sae(torch.randn(64, D_IN))
    sae.eval()
    # other rows than the training batch: after one batch theta IS that batch's smallest kept activation, which
    # folding's rounding may then put on either side of theta / 2.5 (it did on an AVX2 CPU)
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        before = sae.encode(x)
        sae.fold_activation_scale()
        after = sae.encode(x)
    assert torch.equal(before.indices, after.indices)  # the same latents above theta / 2.5 on raw activations
    torch.testing.assert_close(after.values, before.values / 2.5)  # values in raw units


@pytest.mark.parametrize(
    "flag,model_type",
    [
        ("arch=batchtopk,k=32", "batchtopk_sae"),
        ("arch=matryoshka,k=32", "matryoshka_sae"),
        ("arch=jumprelu", "jumprelu_sae"),
    ],
)
def test_the_training_cli_builds_each_architecture(flag, model_type):
    from training.config import make_config

    config = make_config({"saes": [flag]})
    built = config.saes[0].build_config(d_in=64)
    assert built.model_type == model_type
    if model_type == "jumprelu_sae":
        assert built.threshold_parametrization == "log" and built.k == built.d_sae  # k is a cap, not a budget
    else:
        assert built.k == 32


def test_l0_distribution_reports_mean_and_spread():
    values = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    stats = l0_distribution(values)
    assert stats["mean"] == 1.5 and stats["min"] == 0 and stats["max"] == 3 and stats["median"] == 1.5
    assert stats["histogram"] == {"0": 1, "1": 1, "2": 1, "3": 1}


@pytest.mark.parametrize(
    "make", [_batchtopk, _matryoshka, _trainable_jumprelu], ids=["batchtopk", "matryoshka", "jumprelu"]
)
def test_steering_and_splicing_work_with_variable_l0_saes(make, tiny_lm):
    model = tiny_lm("gemma2", num_hidden_layers=2, vocab_size=100)
    sae = make(d_in=model.config.hidden_size, hook_layer=1, hook_site="resid")
    sae.train()
    sae(torch.randn(256, model.config.hidden_size))
    sae.eval()
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    with torch.no_grad():
        clean = model(ids).logits
        with sae.steer(model, {7: 20.0}):
            steered = model(ids).logits
        with sae.attach(model, splice=True) as hook:
            spliced = model(ids).logits
        assert hook.latents is not None and hook.latents.values.shape[:2] == (1, 5)
    assert not torch.allclose(clean, steered) and not torch.allclose(clean, spliced)
    assert math.isfinite(float(spliced.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu"])
def test_a_training_run_of_each_architecture_saves_evaluates_and_reports_its_l0_distribution(arch, tiny_args, tmp_path):
    from training import train as train_module
    from training.cli import parse_args

    extra = ",l0_coefficient=0.01" if arch == "jumprelu" else ""
    cfg, explicit = parse_args(tiny_args(tmp_path / "run", sae=f"layer=2,arch={arch}{extra}"))
    metrics = train_module.train(cfg, explicit)
    (result,) = metrics["saes"].values()
    loaded = AutoModel.from_pretrained(result["path"])
    assert loaded.config.model_type == {"batchtopk": "batchtopk_sae", "matryoshka": "matryoshka_sae"}.get(
        arch, "jumprelu_sae"
    )
    native = result["native"]
    assert 0 < native["l0"] and native["l0_distribution"]["min"] <= native["l0"] <= native["l0_distribution"]["max"]
    assert sum(native["l0_distribution"]["histogram"].values()) == result["eval_tokens"]
    assert native["explained_variance"] < 1
    if arch != "jumprelu":
        assert int(loaded.threshold_batches) == 30 and float(loaded.threshold) > 0
    else:  # the run's default warm-up: a tenth of its 30 steps; the counter saved with the SAE
        assert loaded.config.l0_warmup_steps == 3 and int(loaded.steps_trained) == 30
    card = (Path(result["path"]) / "README.md").read_text()
    assert {"batchtopk": "2412.06410", "matryoshka": "2503.17547", "jumprelu": "2407.14435"}[arch] in card


@pytest.mark.parametrize("make", [_batchtopk, _matryoshka], ids=["batchtopk", "matryoshka"])
def test_the_pure_torch_path_gives_the_kernel_paths_step(make, monkeypatch):
    """What runs where the CPU kernels are not built (GPUs, no compiler): same latents, loss and gradients."""
    from hf_sae import kernels

    x = torch.randn(48, D_IN)
    results = []
    for disable in (False, True):
        if disable:
            monkeypatch.setattr(kernels, "_MODULES", {"hierarchical_cpu.cpp": None, "kron_cpu.cpp": None})
        torch.manual_seed(0)
        sae = make(auxk=True, dead_tokens=1)
        sae.train()
        sae.tokens_since_fired[::2] = 5  # half the latents dead: AuxK on
        out = sae(x)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in sae.named_parameters()}))
    (kernel, kernel_grads), (torch_path, torch_grads) = results
    assert torch.equal(kernel.latents.indices, torch_path.latents.indices)
    torch.testing.assert_close(kernel.loss, torch_path.loss, rtol=1e-5, atol=1e-6)
    for name in kernel_grads:
        torch.testing.assert_close(kernel_grads[name], torch_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "make", [_batchtopk, _matryoshka, _trainable_jumprelu], ids=["batchtopk", "matryoshka", "jumprelu"]
)
def test_bf16_autocast_and_bf16_weights_train(make):
    x = torch.randn(64, D_IN)
    sae = make()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.train()
    out = training_step(sae, optimizer, x, autocast_dtype=torch.bfloat16)
    assert out.stepped and torch.isfinite(out.loss)
    half = make().to(torch.bfloat16)
    half.train()
    out = training_step(half, torch.optim.Adam(half.parameters(), lr=1e-3), x.to(torch.bfloat16))
    assert out.stepped and torch.isfinite(out.loss) and out.output.reconstruction.dtype == torch.bfloat16
    half.eval()
    with torch.no_grad():
        assert half.encode(x.to(torch.bfloat16)).values.dtype == torch.bfloat16
    if isinstance(half, BatchTopKSAE):  # θ's running average stays float32
        assert half.threshold.dtype == torch.float32 and float(half.threshold) > 0


@pytest.mark.parametrize(
    "make", [_batchtopk, _matryoshka, _trainable_jumprelu], ids=["batchtopk", "matryoshka", "jumprelu"]
)
def test_feature_flow_traces_and_steers_with_variable_l0_saes(make, tiny_lm):
    from hf_sae.flow import FeatureFlow

    model = tiny_lm("gemma2", num_hidden_layers=2, vocab_size=100)
    width = model.config.hidden_size
    saes = {}
    for layer in (0, 1):
        for site in ("attn", "mlp", "resid"):
            sae = make(d_in=width, hook_layer=layer, hook_site=site)
            sae.train()
            sae(torch.randn(256, width))
            saes[(layer, site)] = sae.eval()
    flow = FeatureFlow(saes, cache_dir=False)
    match = flow.match((1, "resid"), (0, "resid"))
    assert len(match) == D_SAE
    graph = flow.trace(layer=1, feature=3)
    assert "1/resid/3" in graph.nodes
    ids = torch.tensor([[2, 5, 9, 14]])
    with torch.no_grad():
        clean = model(ids).logits
        with flow.steer(model, graph, 8.0):
            steered = model(ids).logits
    assert not torch.allclose(clean, steered)


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_the_sparse_jumprelu_step_gives_the_dense_steps_loss_and_gradients(apply_b_dec, monkeypatch):
    x = torch.randn(40, D_IN, dtype=torch.float64)
    results = []
    for width in (0.0, 1.0):  # dense, then sparse (the band of pre > θ − ε/2 only)
        monkeypatch.setattr(JumpReLUSAE, "sparse_step_width", width)
        torch.manual_seed(0)
        sae = _trainable_jumprelu(
            bandwidth=0.2, initial_threshold=0.4, l0_warmup_steps=0, apply_b_dec_to_input=apply_b_dec
        ).double()
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)
            sae.b_dec.normal_(0, 0.3)
        sae.train()
        out = sae(x)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    torch.testing.assert_close(sparse.losses["reconstruction"], dense.losses["reconstruction"])
    torch.testing.assert_close(sparse.losses["l0"], dense.losses["l0"])
    torch.testing.assert_close(sparse.latents.to_dense(D_SAE), dense.latents.to_dense(D_SAE))
    assert (dense_grads["log_threshold"] != 0).any()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)


@pytest.mark.parametrize(
    "make,paper,tag",
    [
        (_batchtopk, "2412.06410", "batchtopk"),
        (_matryoshka, "2503.17547", "matryoshka"),
        (_trainable_jumprelu, "2407.14435", "jumprelu"),
    ],
    ids=["batchtopk", "matryoshka", "jumprelu"],
)
def test_cards_describe_each_recipe_with_its_paper_and_the_l0_distribution(make, paper, tag):
    from hf_sae.cards import generate_model_card

    spread = {"mean": 4.2, "p10": 1.0, "p90": 9.0, "max": 21}
    metrics = {"native": {"explained_variance": 0.8, "l0": 4.2, "l0_distribution": spread}}
    card = generate_model_card(make(base_model="google/gemma-2-2b", hook_layer=3), metrics=metrics)
    assert paper in card.text and tag in card.data.tags
    assert "| L0 of its own encoding | mean 4.2 (10th–90th percentile 1–9, max 21), EV 0.8000 |" in card.text
    assert "SparseLatents above the threshold" in card.text


def test_a_yaml_saes_list_sets_the_new_fields(tmp_path):
    from training.cli import parse_args

    path = tmp_path / "run.yaml"
    path.write_text(
        "saes:\n"
        "  - {layer: 2, arch: matryoshka, k: 16, group_sizes: [512, 1536, 2048]}\n"
        "  - {layer: 2, arch: batchtopk, k: 16, threshold_lr: 0.05, hierarchical: true}\n"
        "  - {layer: 2, arch: jumprelu, l0_coefficient: 0.002, bandwidth: 0.01}\n"
    )
    cfg, _ = parse_args(["--config", str(path)])
    built = [spec.build_config(d_in=64) for spec in cfg.saes]
    assert built[0].prefix_widths == [512, 2048, 4096] and built[0].k == 16
    assert (built[1].threshold_lr, built[1].hierarchical) == (0.05, True)
    assert (built[2].l0_coefficient, built[2].bandwidth, built[2].threshold_parametrization) == (0.002, 0.01, "log")

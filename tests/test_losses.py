"""HierarchicalTopK loss, TopK loss and AuxK against hand-computed values and the naive cumsum oracle."""

import pytest
import torch

from hf_sae.kernels import cpu_kernels
from hf_sae.losses import auxk_loss, budget_weights, hierarchical_topk_loss

PATHS = [pytest.param(False, id="torch")]
if cpu_kernels() is not None:
    PATHS.append(pytest.param(True, id="cpu-kernel"))


def naive_hierarchical_loss(x, values, indices, W_dec, b_dec, budgets=None):
    """The test oracle: materialise every prefix reconstruction (batch, K, d) with a cumsum."""
    K = values.shape[1]
    prefix = b_dec + (values.unsqueeze(-1) * W_dec[indices]).cumsum(dim=1)  # x̂_j, j = 1..K
    per_budget = ((x.unsqueeze(1) - prefix) ** 2).mean(dim=(0, 2))  # (K,)
    chosen = list(range(1, K + 1)) if budgets is None else budgets
    return per_budget[[j - 1 for j in chosen]].mean()


def random_case(n=7, d=5, F=11, K=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    W = torch.randn(F, d, generator=g, dtype=dtype)
    b = torch.randn(d, generator=g, dtype=dtype)
    values = torch.rand(n, K, generator=g, dtype=dtype).sort(dim=1, descending=True).values
    indices = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(n)])
    return x, values, indices, W, b


def test_hand_computed_two_latent_two_dim_case():
    # x = (3, 1), W_dec = I, b_dec = 0, latents v = (2, 0.5) at (0, 1).
    # x̂_1 = (2, 0): MSE = (1 + 1)/2 = 1;  x̂_2 = (2, 0.5): MSE = (1 + 0.25)/2 = 0.625;  L = (1 + 0.625)/2 = 0.8125.
    # dL/dv1 = -(3 - v1) = -1, dL/dv2 = -(1 - v2)/2 = -0.25, dL/db_dec = -(r_1 + r_2)/2 = (-1, -0.75).
    for use_kernel in [p.values[0] for p in PATHS]:
        x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
        W = torch.eye(2, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        v = torch.tensor([[2.0, 0.5]], dtype=torch.float64, requires_grad=True)
        idx = torch.tensor([[0, 1]])
        loss, recon = hierarchical_topk_loss(x, v, idx, W, b, use_kernel=use_kernel)
        loss.backward()
        assert loss.item() == pytest.approx(0.8125, abs=1e-12)
        assert torch.allclose(recon, torch.tensor([[2.0, 0.5]], dtype=torch.float64))
        assert torch.allclose(v.grad, torch.tensor([[-1.0, -0.25]], dtype=torch.float64))
        assert torch.allclose(b.grad, torch.tensor([-1.0, -0.75], dtype=torch.float64))
        # dL/dW[0] = v1 * Σ_j g_j = 2 * (-(r_1 + r_2)/2) = -2 * (1, 0.75); dL/dW[1] = v2 * g_2 = 0.5 * (-(1, 0.5)/2).
        expected_W = torch.tensor([[-2.0, -1.5], [-0.25, -0.125]], dtype=torch.float64)
        assert torch.allclose(W.grad, expected_W)


@pytest.mark.parametrize("use_kernel", PATHS)
@pytest.mark.parametrize("budgets", [None, [1, 3], [4]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_match_naive_oracle(use_kernel, budgets, seed):
    x, values, indices, W, b = random_case(seed=seed)
    indices[0, 1] = indices[1, 0] = indices[2, 3]  # shared latents across rows exercise accumulation
    leaves = [t.clone().requires_grad_() for t in (x, values, W, b)]
    oracle = naive_hierarchical_loss(leaves[0], leaves[1], indices, leaves[2], leaves[3], budgets)
    oracle_grads = torch.autograd.grad(oracle, leaves)
    ours = [t.clone().requires_grad_() for t in (x, values, W, b)]
    loss, recon = hierarchical_topk_loss(ours[0], ours[1], indices, ours[2], ours[3], budgets, use_kernel=use_kernel)
    grads = torch.autograd.grad(loss, ours)
    assert abs(loss.item() - oracle.item()) < 1e-6
    for name, ours_g, oracle_g in zip(["x", "values", "W_dec", "b_dec"], grads, oracle_grads):
        assert torch.allclose(ours_g, oracle_g, atol=1e-6, rtol=0), name
    assert torch.allclose(recon, b + (values.unsqueeze(-1) * W[indices]).sum(1))


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the CPU kernel")
def test_kernel_gradients_computed_in_the_forward_follow_the_incoming_gradient():
    # The kernel runs the backward inside the forward, for an incoming gradient of 1. A scaled loss (3 L) with only
    # W_dec and b_dec needing gradients must still give the oracle's gradients, and a forward without gradients
    # the same loss and reconstruction.
    x, values, indices, W, b = random_case(seed=5)
    leaves = [W.clone().requires_grad_(), b.clone().requires_grad_()]
    oracle_grads = torch.autograd.grad(3 * naive_hierarchical_loss(x, values, indices, *leaves), leaves)
    ours = [W.clone().requires_grad_(), b.clone().requires_grad_()]
    loss, recon = hierarchical_topk_loss(x, values, indices, *ours, use_kernel=True)
    for name, grad, oracle_grad in zip(["W_dec", "b_dec"], torch.autograd.grad(3 * loss, ours), oracle_grads):
        assert torch.allclose(grad, oracle_grad, atol=1e-12, rtol=0), name
    with torch.no_grad():
        loss_without_grad, recon_without_grad = hierarchical_topk_loss(x, values, indices, *ours, use_kernel=True)
    assert torch.equal(loss_without_grad, loss.detach()) and torch.equal(recon_without_grad, recon)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the CPU kernel")
def test_kernel_decoder_gradient_becomes_the_grad_without_a_copy_and_survives_retain_graph():
    # The forward computes the decoder gradient; autograd must take that tensor as W_dec.grad (it copies one that
    # something else still holds: 3 ms a step at d_in 640), and a retained graph must still give it twice.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopiesOfW(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.count += func is torch.ops.aten.copy_.default and shapes[0] == (11, 5)
            return func(*args, **(kwargs or {}))

    x, values, indices, W, b = random_case(seed=8)
    oracle = torch.autograd.grad(naive_hierarchical_loss(x, values, indices, W.requires_grad_(), b), W)[0]
    W = W.detach().requires_grad_()
    loss, _ = hierarchical_topk_loss(x, values, indices, W, b, use_kernel=True)
    with CopiesOfW() as mode:
        loss.backward()
    assert mode.count == 0 and torch.allclose(W.grad, oracle, atol=1e-12, rtol=0)
    W.grad = None
    loss, _ = hierarchical_topk_loss(x, values, indices, W, b, use_kernel=True)
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.allclose(W.grad, 2 * oracle, atol=1e-12, rtol=0)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the CPU kernel")
def test_kernel_loss_under_no_grad_runs_no_backward(monkeypatch):
    # Inside an autograd.Function's forward grad mode is always off and needs_input_grad ignores torch.no_grad, so
    # the caller's grad mode decides: evaluating a trainable SAE under no_grad must not pay for its gradients.
    def backward_not_wanted(*args):
        raise AssertionError("the fused forward + backward ran under torch.no_grad")

    monkeypatch.setattr(cpu_kernels(), "hierarchical_forward_backward", backward_not_wanted)
    x, values, indices, W, b = random_case(seed=6)
    W, b = W.requires_grad_(), b.requires_grad_()
    with torch.no_grad():
        loss, _ = hierarchical_topk_loss(x, values, indices, W, b, use_kernel=True)
    assert loss.item() == pytest.approx(naive_hierarchical_loss(x, values, indices, W, b).item(), abs=1e-12)


@pytest.mark.parametrize("use_kernel", PATHS)
def test_plain_topk_loss_is_the_mse_at_k(use_kernel):
    x, values, indices, W, b = random_case(seed=3)
    loss, recon = hierarchical_topk_loss(x, values, indices, W, b, budgets=[values.shape[1]], use_kernel=use_kernel)
    assert loss.item() == pytest.approx(((x - recon) ** 2).mean().item(), abs=1e-12)


def test_torch_path_memory_chunks_give_the_same_result():
    x, values, indices, W, b = random_case(n=33, seed=4)
    full, _ = hierarchical_topk_loss(x, values, indices, W, b, use_kernel=False)
    chunked, _ = hierarchical_topk_loss(x, values, indices, W, b, use_kernel=False, chunk_elements=20)
    assert full.item() == pytest.approx(chunked.item(), abs=1e-12)


def test_budget_weights_average_over_the_chosen_budgets():
    w = budget_weights(4, [1, 3], torch.float64, torch.device("cpu"))
    assert w.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert budget_weights(4, None, torch.float64, torch.device("cpu")).tolist() == [0.25] * 4


def test_auxk_loss_hand_case():
    # residual e rows (1, 0) and (0, 1): mean (0.5, 0.5), ||e - mean||² = 4 * 0.25 = 1.
    # dead latent 0 = (1, 0) fires 1.0 on row 0 only: ê = ((1, 0), (0, 0)), ||e - ê||² = 1.  L_aux = 1 / 1 = 1.
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    aux_values = torch.tensor([[1.0], [0.0]])
    aux_indices = torch.tensor([[0], [0]])
    assert auxk_loss(e, aux_values, aux_indices, W).item() == pytest.approx(1.0)
    # both dead latents used perfectly: loss 0
    assert auxk_loss(e, torch.tensor([[1.0], [1.0]]), torch.tensor([[0], [1]]), W).item() == pytest.approx(0.0)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the compiled CPU kernel")
def test_deterministic_kernel_backward_is_parallel_and_bit_reproducible(monkeypatch):
    # Several row chunks, each with its own decoder gradient, summed in a fixed order: the same bits every call,
    # and the same gradient (to rounding) as the lock-based parallel path.
    import hf_sae.losses as losses

    x, values, indices, W, b = random_case(n=64, d=9, F=13, K=5, dtype=torch.float32, seed=6)
    monkeypatch.setattr(losses, "_deterministic_chunks", lambda W_dec: 3)

    def grads(deterministic):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            leaves = [t.clone().requires_grad_() for t in (values, W, b)]
            loss, _ = hierarchical_topk_loss(x, leaves[0], indices, leaves[1], leaves[2], use_kernel=True)
            return torch.autograd.grad(loss, leaves)
        finally:
            torch.use_deterministic_algorithms(previous)

    first, second, free = grads(True), grads(True), grads(False)
    for a, b_, c in zip(first, second, free):
        assert torch.equal(a, b_)
        assert torch.allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("budgets", [None, [4]])
def test_bf16_inputs_accumulate_in_fp32(budgets):
    # Inputs rounded to bf16; the loss on those rounded values must match float64 to fp32 accuracy (bf16
    # accumulation is off by ~1e-3 here).
    x, values, indices, W, b = random_case(n=256, d=64, F=40, K=4, dtype=torch.float64, seed=7)
    half = [t.to(torch.bfloat16) for t in (x, values, W, b)]
    loss, recon = hierarchical_topk_loss(half[0], half[1], indices, half[2], half[3], budgets)
    exact = naive_hierarchical_loss(
        *(t.double() for t in half[:2]), indices, half[2].double(), half[3].double(), budgets
    )
    assert loss.dtype == torch.float32 and recon.dtype == torch.bfloat16
    assert abs(loss.item() - exact.item()) <= 1e-5 * max(1.0, exact.item())


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the compiled CPU kernel")
def test_auxk_kernel_path_matches_the_torch_definition():
    e, values, indices, W, _ = random_case(n=9, d=6, F=13, K=4, seed=8)
    indices[0, 1] = indices[1, 0]  # a latent shared across rows
    grads = []
    for leaves in ([values.clone().requires_grad_(), W.clone().requires_grad_()] for _ in range(2)):
        if not grads:
            loss = auxk_loss(e, *leaves[:1], indices, leaves[1])  # the kernel path (float64 CPU)
        else:
            e_hat = torch.nn.functional.embedding_bag(indices, leaves[1], per_sample_weights=leaves[0], mode="sum")
            loss = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        grads.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, atol=1e-10)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the compiled CPU kernel")
def test_deterministic_kernel_backward_does_not_depend_on_the_thread_count():
    x, values, indices, W, b = random_case(n=64, d=9, F=13, K=5, dtype=torch.float32, seed=9)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (values, W, b)]
            loss, _ = hierarchical_topk_loss(x, leaves[0], indices, leaves[1], leaves[2], use_kernel=True)
            results.append(torch.autograd.grad(loss, leaves))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for other in results[1:]:
        assert all(torch.equal(a, b_) for a, b_ in zip(results[0], other))

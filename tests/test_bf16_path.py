"""The bf16 path: under bf16 autocast the encoder matmul chooses the latents in bf16, everything after is fp32."""

import pytest
import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, training_step
from hf_sae.metrics import explained_variance
from hf_sae.sparse import linear_at, topk_encode


def test_linear_at_is_the_linear_layer_at_the_chosen_columns():
    torch.manual_seed(0)
    x, W, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(11, 7, dtype=torch.float64), torch.randn(11)
    b = b.double()
    columns = torch.tensor([[0, 3], [10, 10], [4, 1], [2, 9], [5, 6]])
    expected = (x @ W.t() + b).gather(1, columns)
    assert torch.allclose(linear_at(x, W, b, columns), expected, atol=1e-12)
    assert torch.allclose(linear_at(x, W, b, columns, chunk_elements=7), expected, atol=1e-12)  # the torch path


def test_bf16_values_are_exact_fp32_values_of_the_chosen_latents():
    torch.manual_seed(1)
    x = torch.randn(64, 32)
    W = torch.randn(2048, 32, requires_grad=True)
    b = torch.randn(2048, requires_grad=True)
    c = torch.randn(32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices, _, _ = topk_encode(x, W, b, 16, center=c)
    assert values.dtype == torch.float32
    exact = torch.relu((x - c) @ W.t() + b).detach()
    assert torch.allclose(values.detach(), exact.gather(1, indices), atol=1e-5)
    assert bool((values[:, :-1] >= values[:, 1:]).all())  # still sorted after the fp32 recomputation
    # the choice is bf16's: nearly the fp32 top-k (near-ties may differ)
    fp32 = exact.topk(16, dim=-1).indices
    overlap = sum(len(set(a.tolist()) & set(b_.tolist())) for a, b_ in zip(indices, fp32)) / fp32.numel()
    assert overlap > 0.9
    values.sum().backward()  # gradients reach the fp32 master weights
    assert W.grad.dtype == torch.float32 and c.grad is not None


def _planted(n, d_in, n_features, active, seed):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    mags = torch.rand(n, active, generator=g) * 2 + 1
    return (mags.unsqueeze(-1) * directions[idx]).sum(1) + 3.0  # an offset: the encoder reads x - b_dec


@pytest.mark.parametrize("hierarchical", [pytest.param(False, marks=pytest.mark.slow), True])
def test_bf16_training_converges_like_fp32(hierarchical):
    data = _planted(8192 + 2048, d_in=64, n_features=256, active=4, seed=0)
    x, x_test = data[:8192], data[8192:]
    evs = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=64, d_sae=2048, k=8, hierarchical=hierarchical))
        sae.initialize_b_dec(x[:1024])
        sae.train()
        sae.check_finite = False
        opt = torch.optim.Adam(sae.parameters(), lr=4e-3, fused=True)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            training_step(sae, opt, x[torch.randint(0, len(x), (512,), generator=g)], autocast_dtype=dtype)
        sae.eval()
        with torch.no_grad():
            evs[dtype] = float(explained_variance(x_test, sae(x_test).reconstruction))
    assert evs[None] > 0.65, evs  # it learned (0.71 TopK / 0.84 hierarchical at 200 steps)
    assert abs(evs[torch.bfloat16] - evs[None]) <= 0.005, evs

"""hf_sae.training_step: the one place an SAE parameter is updated."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_sae import HfSaeError, HierarchicalSAE, HierarchicalSAEConfig, training_step


def _sae(seed: int) -> HierarchicalSAE:
    torch.manual_seed(seed)
    return HierarchicalSAE(HierarchicalSAEConfig(d_in=8, d_sae=32, k=4, auxk=False)).train()


def _sgd(saes):
    return torch.optim.SGD([{"params": sae.parameters()} for sae in saes], lr=0.1)


def test_each_sae_is_clipped_on_its_own():
    """A second SAE with a huge gradient must not shrink the first SAE's step (a global clip would)."""
    x = torch.randn(64, 8)
    alone, together, loud = _sae(1), _sae(1), _sae(2)
    training_step(alone, _sgd([alone]), x, max_grad_norm=0.5)
    result = training_step([together, loud], _sgd([together, loud]), [x, 1000 * torch.randn(64, 8)], max_grad_norm=0.5)
    assert result.stepped and float(result.grad_norms[1]) > 100 * float(result.grad_norms[0])
    for a, b in zip(alone.parameters(), together.parameters()):  # a global clip would shrink it > 100x
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_clipping_bounds_the_gradient_norm_of_each_sae():
    sae = _sae(3)
    before = copy.deepcopy(sae)
    optimizer = torch.optim.SGD(sae.parameters(), lr=1.0)
    result = training_step(sae, optimizer, 100 * torch.randn(64, 8), max_grad_norm=1e-3)
    assert float(result.grad_norms[0]) > 1e-3
    moved = torch.cat([(p - q).flatten() for p, q in zip(sae.encoder.parameters(), before.encoder.parameters())])
    assert float(moved.detach().norm()) <= 1e-3 * (
        1 + 1e-4
    )  # SGD with lr 1: the encoder moved by at most the clipped norm


def test_a_non_finite_gradient_skips_the_step_and_the_schedule():
    sae = _sae(4)
    before = copy.deepcopy(sae.state_dict())
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    sae.check_finite = False
    result = training_step(sae, optimizer, x, scheduler=scheduler, max_grad_norm=1.0)
    assert not result.stepped and scheduler.last_epoch == 0
    assert all(torch.equal(before[name], value) for name, value in sae.state_dict().items())
    assert all(p.grad is None for p in sae.parameters())


def test_a_step_keeps_decoder_rows_unit_norm_and_returns_detached_losses():
    sae = _sae(5)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        result = training_step(sae, optimizer, torch.randn(32, 8))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-6)
    assert not result.loss.requires_grad and not result.output.losses["reconstruction"].requires_grad


def test_a_module_list_is_several_saes_and_a_negative_clip_is_refused():
    saes = torch.nn.ModuleList([_sae(6), _sae(7)])
    result = training_step(saes, _sgd(saes), [torch.randn(8, 8), torch.randn(8, 8)])
    assert len(result.outputs) == 2 and result.stepped
    with pytest.raises(HfSaeError, match="max_grad_norm=-1 must be >= 0"):
        training_step(saes[0], _sgd([saes[0]]), torch.randn(8, 8), max_grad_norm=-1)
    with pytest.raises(HfSaeError, match="got 2 SAE\\(s\\) but 1 input tensor"):
        training_step(saes, _sgd(saes), [torch.randn(8, 8)])


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, float("inf")])
def test_clip_matches_torch_bit_for_bit(max_norm):
    """The SAE's clip (which skips the multiplication by 1 on CPU) gives torch's clip_grad_norm_ gradients and norm."""
    ours, theirs = _sae(4), _sae(4)
    ours(10 * torch.randn(64, 8)).loss.backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):  # the same gradients (the backward may sum in any order)
        b.grad = a.grad.clone()
    norm = ours.clip_grad_norm_(max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert torch.equal(norm, expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_parallel_component_of_a_hand_gradient_is_removed():
    """Rows e1 and (e1 + e2)/√2 with gradient rows (3, 4) and (2, 0): the parallel parts (3, 0) and (1, 1) go,
    leaving (0, 4) and (1, −1)."""
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=2, d_sae=2, k=1, auxk=False))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]]))
    sae.W_dec.grad = torch.tensor([[3.0, 4.0], [2.0, 0.0]])
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[0.0, 4.0], [1.0, -1.0]]))


def test_hand_decoder_rows_are_renormalised():
    """Rows (3, 4) and (0, 0.5) become (0.6, 0.8) and (0, 1); a zero row stays zero (its norm is clamped at eps)."""
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=2, d_sae=3, k=1, auxk=False))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.5], [0.0, 0.0]]))
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.data, torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_row_passes_match_the_torch_expressions(dtype, monkeypatch):
    """The fused CPU row kernels (projection and renormalisation) give the torch formulas' results at an odd width
    (the vector loops' remainders) and many rows (several threads' chunks)."""
    import hf_sae.modeling_sae as modeling

    if modeling.cpu_kernels() is None:
        pytest.skip("no compiled kernels (no compiler, or HF_SAE_NO_EXTENSION=1)")
    torch.manual_seed(0)
    fast = HierarchicalSAE(HierarchicalSAEConfig(d_in=77, d_sae=300, k=4, auxk=False)).to(dtype)
    slow = copy.deepcopy(fast)
    for sae in (fast, slow):
        sae.W_dec.grad = torch.randn(300, 77, dtype=dtype, generator=torch.Generator().manual_seed(1))
    fast.remove_gradient_parallel_to_decoder_directions()
    fast.W_dec.data.mul_(3.0)
    fast.set_decoder_norm_to_unit_norm()
    monkeypatch.setattr(modeling, "_row_kernels", lambda *tensors: None)
    slow.remove_gradient_parallel_to_decoder_directions()
    slow.W_dec.data.mul_(3.0)
    slow.set_decoder_norm_to_unit_norm()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fast.W_dec.grad, slow.W_dec.grad, rtol=0, atol=tolerance)
    torch.testing.assert_close(fast.W_dec.data, slow.W_dec.data, rtol=0, atol=tolerance)
    assert (fast.W_dec.grad * fast.W_dec).sum(-1).abs().max() < 1e-5  # rows unit to float32 precision

"""KronSAE reads x − b_dec (``apply_b_dec_to_input``): hand-computed pre-activations, the sparse backward against a
dense reference (b_dec now gets an encoder gradient too), old files load with it off, and the failure it fixes:
data with a large constant offset leaves a raw-input KronSAE almost all dead."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, KronSAE, KronSAEConfig, SAEConfigError, training_step
from hf_sae.metrics import explained_variance
from hf_sae.modeling_kron_sae import mand

SAVED = Path(__file__).resolve().parent / "data" / "saved_before_registry"


def _one_latent(centred: bool) -> KronSAE:
    """d_in 2, one head with m = n = 1: u = x̃₀, w = x̃₁ (identity encoder, zero biases), b_dec = (1, 1)."""
    sae = KronSAE(KronSAEConfig(d_in=2, num_heads=1, base_dim=1, ext_dim=1, k=1, apply_b_dec_to_input=centred))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(2))
        sae.encoder.bias.zero_()
        sae.b_dec.fill_(1.0)
    return sae


def test_the_encoder_reads_x_minus_b_dec_by_hand():
    x = torch.tensor([[3.0, 2.0], [0.5, 3.0]])
    # centred: x̃ = (2, 1) -> sqrt(2·1); (-0.5, 2) -> u <= 0 -> 0.   raw: (3, 2) -> sqrt(6); (0.5, 3) -> sqrt(1.5)
    assert _one_latent(True).pre_acts(x).flatten().tolist() == pytest.approx([math.sqrt(2.0), 0.0])
    assert _one_latent(False).pre_acts(x).flatten().tolist() == pytest.approx([math.sqrt(6.0), math.sqrt(1.5)])
    assert _one_latent(True).encode(x).values.flatten().tolist() == pytest.approx([math.sqrt(2.0), 0.0])
    with pytest.raises(SAEConfigError, match="apply_b_dec_to_input must be True or False"):
        KronSAEConfig(d_in=2, num_heads=1, base_dim=1, ext_dim=1, k=1, apply_b_dec_to_input="yes")


@pytest.mark.parametrize("activation", ["mand", "relu_product"])
def test_the_sparse_backward_matches_a_dense_reference_including_b_dec(activation):
    torch.manual_seed(0)
    sae = KronSAE(KronSAEConfig(d_in=16, num_heads=8, base_dim=2, ext_dim=4, k=6, auxk=False, hierarchical=False))
    sae.config.kron_activation = activation
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(0, 0.1)
    x = torch.randn(32, 16)
    sae.train()
    sae(x).loss.backward()
    sparse = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    # dense reference: every score from the dense pre-activations, the same top-k, plain MSE at k
    pre = torch.nn.functional.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias).reshape(32, 8, 6)
    u, w = pre[..., :2, None], pre[..., None, 2:]
    scores = (mand(u, w) if activation == "mand" else u.relu() * w.relu()).reshape(32, 64)
    values, indices = scores.topk(6, dim=-1)
    x_hat = sae.b_dec + (values.unsqueeze(-1) * sae.W_dec[indices]).sum(1)
    (x - x_hat).pow(2).mean().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sparse["b_dec"].abs().sum() > 0


def test_a_kron_sae_saved_before_the_field_loads_with_it_off_and_new_ones_default_on(tmp_path):
    old = AutoModel.from_pretrained(SAVED / "kron_sae_mand")
    assert old.config.apply_b_dec_to_input is False
    new = KronSAE(KronSAEConfig(d_in=16, d_sae=64, k=8))
    assert new.config.apply_b_dec_to_input is True
    new.save_pretrained(tmp_path / "new")
    assert AutoModel.from_pretrained(tmp_path / "new").config.apply_b_dec_to_input is True


def _sparse_data(offset_norm: float, n: int = 40_000, d: int = 32, features: int = 128) -> torch.Tensor:
    """Sums of ~4 of 128 random unit directions with magnitudes U(0, 3), plus a constant offset of the given norm."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(features, d, generator=generator), dim=-1)
    active = (torch.rand(n, features, generator=generator) < 4 / features).float()
    x = (active * 3 * torch.rand(n, features, generator=generator)) @ directions
    return x + torch.nn.functional.normalize(torch.ones(d), dim=0) * offset_norm


def _train(sae, x: torch.Tensor, steps: int = 200, batch: int = 512) -> tuple[float, float]:
    """The training recipe in miniature (scale, b_dec at the geometric median, the one step); (EV, dead fraction)."""
    torch.manual_seed(1)
    sae.train().config.dead_tokens = 20 * batch
    scale = math.sqrt(x.shape[1] / float(x[:8192].pow(2).sum(-1).mean()))
    sae.config.activation_scale, sae.config.activation_scale_folded = scale, False
    sae.initialize_b_dec(x[:4096] * scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=sae.default_learning_rate(sae.config))
    for _ in range(steps):
        training_step(sae, optimizer, x[torch.randint(0, x.shape[0] - 4096, (batch,))], max_grad_norm=1.0)
    with torch.no_grad():
        held_out = x[-4096:]
        latents = sae.eval().encode(held_out)
        fired = torch.zeros(sae.config.d_sae, dtype=torch.bool)
        fired[latents.indices[latents.values > 0]] = True
        return explained_variance(held_out, sae.decode(latents)), 1 - float(fired.float().mean())


@pytest.mark.parametrize("offset", [20.0, 0.0])
def test_a_centred_kron_sae_trains_like_topk_even_with_a_large_offset(offset):
    x = _sparse_data(offset)
    topk_ev, _ = _train(HierarchicalSAE(HierarchicalSAEConfig(d_in=32, d_sae=256, k=8)), x)
    centred_ev, centred_dead = _train(KronSAE(KronSAEConfig(d_in=32, d_sae=256, k=8)), x)
    raw_ev, raw_dead = _train(KronSAE(KronSAEConfig(d_in=32, d_sae=256, k=8, apply_b_dec_to_input=False)), x)
    assert centred_dead <= 0.15 and centred_ev >= topk_ev - 0.05, (centred_ev, centred_dead, topk_ev)
    if offset:  # the failure the field fixes: the offset sets the sign of every u and w, the same latents always win
        assert raw_dead >= 0.5 and raw_ev < centred_ev - 0.2, (raw_ev, raw_dead)
    else:  # on zero-mean data centring changes little
        assert raw_dead <= 0.15 and abs(raw_ev - centred_ev) <= 0.05, (raw_ev, centred_ev)

"""HierarchicalSAE and KronSAE: encode/decode contract, mAND, Auto classes, saving, folding, AuxK, training."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from hf_sae import (
    HierarchicalSAE,
    HierarchicalSAEConfig,
    KronSAE,
    KronSAEConfig,
    SAEInputError,
    SAELoadError,
    SparseLatents,
    training_step,
)
from hf_sae.metrics import explained_variance
from hf_sae.modeling_kron_sae import mand


def make_sae(arch: str, **overrides):
    if arch == "hierarchical":
        return HierarchicalSAE(HierarchicalSAEConfig(**{"d_in": 16, "d_sae": 64, "k": 8, **overrides}))
    return KronSAE(KronSAEConfig(**{"d_in": 16, "num_heads": 8, "base_dim": 2, "ext_dim": 4, "k": 8, **overrides}))


ARCHS = ["hierarchical", "kron"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_budgets_are_nested(arch):
    sae = make_sae(arch)
    x = torch.randn(2, 5, 16)
    full = sae.encode(x)
    assert full.values.shape == (2, 5, 8)
    assert torch.all(full.values[..., :-1] >= full.values[..., 1:])  # sorted descending
    for j in range(1, 9):
        part = sae.encode(x, k=j)
        assert torch.equal(part.values, full.values[..., :j])
        assert torch.equal(part.indices, full.indices[..., :j])


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_matches_dense_pre_acts_topk(arch):
    sae = make_sae(arch)
    x = torch.randn(9, 16)
    dense = sae.pre_acts(x)
    assert dense.shape == (9, 64) and torch.all(dense >= 0)
    top = dense.topk(8, dim=-1)
    latents = sae.encode(x)
    assert torch.allclose(latents.values, top.values, atol=1e-6)
    assert torch.equal(sae.encode_dense(x), latents.to_dense(64))


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_is_bias_plus_weighted_rows(arch):
    sae = make_sae(arch)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(3, 4, 16)
    latents = sae.encode(x, k=5)
    expected = sae.b_dec + (latents.values.unsqueeze(-1) * sae.W_dec[latents.indices]).sum(-2)
    assert torch.allclose(sae.decode(latents), expected, atol=1e-6)
    out = sae(x)
    assert out.reconstruction.shape == x.shape
    assert torch.allclose(out.reconstruction, sae.decode(out.latents), atol=1e-5)
    assert set(out.losses) >= {"reconstruction"}


def test_mand_scores_are_rank_one_outer_products_per_head():
    sae = make_sae("kron")
    x = torch.randn(6, 16)
    u, w = sae.head_factors(x)  # (6, 8, 2), (6, 8, 4)
    scores = sae.pre_acts(x).reshape(6, 8, 2, 4)
    expected = torch.relu(u)[..., :, None] * torch.relu(w)[..., None, :]
    assert torch.allclose(scores**2, expected, atol=1e-6)
    # latent index h*m*n + i*n + j
    h, i, j = 3, 1, 2
    assert torch.allclose(sae.pre_acts(x)[:, h * 8 + i * 4 + j], scores[:, h, i, j])
    inactive = (u[..., :, None] <= 0) | (w[..., None, :] <= 0)
    assert torch.all(scores[inactive] == 0)


def test_mand_gradients_are_finite_at_zero_and_exact_elsewhere():
    u = torch.tensor([0.0, -1.0, 4.0, 2.0], requires_grad=True)
    w = torch.tensor([1.0, 3.0, 0.0, 8.0], requires_grad=True)
    z = mand(u, w)
    assert z.tolist() == [0.0, 0.0, 0.0, 4.0]
    z.sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(w.grad).all()
    # d sqrt(u w)/du = sqrt(w/u)/2 = 1 at (2, 8); d/dw = sqrt(u/w)/2 = 0.25
    assert u.grad.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert w.grad.tolist() == [0.0, 0.0, 0.0, 0.25]


def test_kron_init_decoder_rows_are_normalised_sums_of_encoder_rows():
    sae = make_sae("kron")
    P = sae.encoder.weight.reshape(8, 6, 16)[:, :2]  # per head: m base rows then n extension rows
    Q = sae.encoder.weight.reshape(8, 6, 16)[:, 2:]
    row = P[3, 1] + Q[3, 2]
    assert torch.allclose(sae.W_dec[3 * 8 + 1 * 4 + 2], row / row.norm(), atol=1e-6)
    with pytest.raises(TypeError, match="no single linear encoder"):
        _ = sae.W_enc


def test_topk_init_ties_encoder_to_decoder_and_views_have_saebench_shapes():
    sae = make_sae("hierarchical")
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,)
    assert torch.allclose(sae.W_enc, sae.W_dec.t())
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_auto_model_round_trip_gives_identical_outputs(arch, tmp_path):
    sae = make_sae(arch, hook_layer=3, base_model="google/gemma-2-2b")
    sae.save_pretrained(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert type(AutoConfig.from_pretrained(tmp_path / "sae")) is type(sae.config)
    x = torch.randn(4, 16)
    a, b = sae(x), loaded(x)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.latents.indices, b.latents.indices)
    assert loaded.config.hook_layer == 3 and loaded.config.base_model == "google/gemma-2-2b"


def test_save_is_atomic_and_keeps_extra_files(tmp_path):
    sae = make_sae("hierarchical")
    target = tmp_path / "run"
    sae.save_pretrained(target)
    (target / "metrics.json").write_text("{}")
    sae.save_pretrained(target)
    assert (target / "metrics.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


@pytest.mark.parametrize("arch", [*ARCHS, "kron_relu_product"])
def test_folded_activation_scale_gives_identical_latents_on_raw_activations(arch):
    sae = make_sae("kron", kron_activation="relu_product") if arch == "kron_relu_product" else make_sae(arch)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    s = 0.37
    x_raw = torch.randn(10, 16) * 5
    trained_space = sae.encode(x_raw * s)
    recon_scaled = sae(x_raw * s).reconstruction
    sae.fold_activation_scale(s)
    assert sae.config.activation_scale_folded and sae.config.activation_scale == s
    raw = sae.encode(x_raw)
    assert torch.equal(raw.indices, trained_space.indices)
    assert torch.allclose(raw.values, trained_space.values / s, atol=1e-5)
    assert torch.allclose(sae(x_raw).reconstruction, recon_scaled / s, atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6)


def test_unfolded_sae_scales_its_input_itself():
    sae = make_sae("hierarchical", activation_scale=0.5, activation_scale_folded=False)
    x = torch.randn(5, 16)
    unfolded = sae(x).reconstruction
    sae.fold_activation_scale()
    assert torch.allclose(sae(x).reconstruction, unfolded, atol=1e-5)


def test_auxk_uses_exactly_the_known_dead_latents():
    sae = make_sae("hierarchical", dead_tokens=100, auxk_k=4)
    sae.train()
    dead = torch.tensor([3, 17, 40])
    with torch.no_grad():
        sae.tokens_since_fired.fill_(0)
        sae.tokens_since_fired[dead] = 1000
    x = torch.randn(32, 16)
    values, indices, aux_values, aux_indices = sae._encode_topk(x - 0, 8, sae.dead_mask(), 3)
    assert set(aux_indices.unique().tolist()) <= set(dead.tolist())
    out = sae(x)
    assert "auxk" in out.losses and out.losses["auxk"].item() > 0
    out.loss.backward()
    assert sae.W_dec.grad[dead].abs().sum() > 0  # dead latents get a learning signal through AuxK
    # counters: latents that fired are reset, the rest advanced by the batch size
    fired = out.latents.indices[out.latents.values > 0].unique()
    assert torch.all(sae.tokens_since_fired[fired] == 0)
    never = torch.ones(64, dtype=torch.bool)
    never[fired] = False
    never[dead] = False
    assert torch.all(sae.tokens_since_fired[never] == 32)


def test_no_auxk_without_dead_latents_or_in_eval():
    sae = make_sae("hierarchical")
    sae.train()
    assert "auxk" not in sae(torch.randn(4, 16)).losses
    sae.eval()
    with torch.no_grad():
        sae.tokens_since_fired.fill_(10**9)
    assert "auxk" not in sae(torch.randn(4, 16)).losses


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_rows_stay_unit_norm_after_steps(arch):
    sae = make_sae(arch)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        training_step(sae, opt, torch.randn(32, 16))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.config.d_sae), atol=1e-5)


def test_parallel_gradient_is_removed():
    sae = make_sae("hierarchical")
    sae(torch.randn(8, 16)).loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-6


def planted_data(n, d_in=32, n_features=48, active=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    mags = torch.rand(n, active, generator=g) * 2 + 1
    return (mags.unsqueeze(-1) * directions[idx]).sum(1), directions


@pytest.mark.parametrize("arch", ARCHS)
def test_short_training_recovers_planted_sparse_features(arch):
    torch.manual_seed(0)
    x, directions = planted_data(4096)
    if arch == "hierarchical":
        sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=32, d_sae=96, k=4, auxk=True, dead_tokens=2048))
    else:
        sae = KronSAE(KronSAEConfig(d_in=32, num_heads=12, base_dim=2, ext_dim=4, k=4, dead_tokens=2048))
    sae.initialize_b_dec(x[:512])
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3 if arch == "hierarchical" else 1e-2)
    for _ in range(300):
        batch = x[torch.randint(0, 4096, (256,))]
        training_step(sae, opt, batch)
    sae.eval()
    x_test = x[:1024]
    with torch.no_grad():
        ev = explained_variance(x_test, sae(x_test).reconstruction)
    assert ev > 0.9, ev
    # recovered features: most planted directions have a decoder row with cosine > 0.9
    cos = directions @ sae.W_dec.detach().t()
    assert (cos.max(dim=1).values > 0.9).float().mean() > 0.8


def test_bf16_and_leading_batch_shapes():
    sae = make_sae("hierarchical").to(torch.bfloat16)
    x = torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)
    out = sae(x)
    assert out.reconstruction.dtype == torch.bfloat16 and out.reconstruction.shape == x.shape
    assert out.latents.values.shape == (2, 3, 4, 8)
    out.loss.backward()
    assert sae.W_dec.grad.dtype == torch.bfloat16
    kron = make_sae("kron").to(torch.bfloat16)
    assert kron(x).reconstruction.shape == x.shape


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: torch.randn(4, 15), "d_in=16"),
        (lambda: torch.randn(4, 16, dtype=torch.float64), "dtype"),
        (lambda: torch.randint(0, 3, (4, 16)), "floating point"),
        (lambda: torch.tensor([[float("nan")] + [0.0] * 15]), "NaN/inf"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, message):
    sae = make_sae("hierarchical")
    with pytest.raises(SAEInputError, match=message):
        sae(bad())


def test_k_above_the_trained_budget_is_refused():
    sae = make_sae("hierarchical")
    with pytest.raises(SAEInputError, match="trained for budgets up to k=8"):
        sae.encode(torch.randn(2, 16), k=9)
    with pytest.raises(SAEInputError, match="indices must be in"):
        sae.decode(SparseLatents(torch.ones(1, 1), torch.tensor([[64]])))


def test_loading_rejects_missing_unknown_keys_and_shape_mismatch(tmp_path):
    sae = make_sae("hierarchical")
    sae.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    for edit, message in [
        (lambda c: c.pop("d_sae"), "missing required key"),
        (lambda c: c.update(sparsity_coefficient=1.0), "unknown key"),
        (lambda c: c.update(d_sae=32, k=4), "disagree|do not match"),
    ]:
        bad = dict(config)
        edit(bad)
        folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(bad))
        (folder / "model.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            AutoModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="expects 'kron_sae'"):
        KronSAE.from_pretrained(tmp_path / "a")


def test_truncated_weights_file_is_reported(tmp_path):
    make_sae("hierarchical").save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(SAELoadError, match="truncated or corrupt"):
        HierarchicalSAE.from_pretrained(tmp_path / "a")

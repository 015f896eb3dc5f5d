"""hf_sae.testing.tiny_models: seeded tiny LMs and SAEs that leave the global random state alone."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from hf_sae.testing.tiny_models import (
    TINY_CONFIG,
    TINY_MODELS,
    planted_sae,
    tiny_gemma2,
    tiny_gemma3,
    tiny_llama,
    tiny_qwen3,
    tiny_sae,
)

BUILDERS = [tiny_gemma2, tiny_gemma3, tiny_llama, tiny_qwen3]


@pytest.mark.parametrize("build", BUILDERS)
def test_tiny_model_weights_depend_only_on_the_seed(build):
    first, again, other = build(seed=0), build(seed=0), build(seed=1)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("build", BUILDERS)
def test_tiny_model_has_the_documented_shape_and_is_in_eval_mode(build):
    model = build()
    config = model.config
    assert not model.training
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 4, 1000)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.intermediate_size == 128
    with torch.no_grad():
        logits = model(torch.tensor([[2, 5, 7, 11]])).logits
    assert logits.shape == (1, 4, 1000)
    assert torch.isfinite(logits).all()


def test_tiny_gemma2_uses_eager_attention_and_accepts_overrides():
    model = tiny_gemma2(num_hidden_layers=2, hidden_size=32)
    assert model.config._attn_implementation == "eager"
    assert len(model.model.layers) == 2 and model.config.hidden_size == 32
    assert type(tiny_gemma3(num_hidden_layers=1).model.layers[0]).__name__ == "Gemma3DecoderLayer"
    assert type(tiny_llama(num_hidden_layers=1).model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert tiny_gemma2(head_dim=32).config.head_dim == 32


def test_tiny_models_are_the_ones_torch_manual_seed_gives():
    """The builders equal the plain recipe (seed, then build), so tests that switch to them keep their weights."""
    config = Gemma2Config(**TINY_CONFIG, attn_implementation="eager")
    torch.manual_seed(3)
    plain = Gemma2ForCausalLM(config)
    for name, tensor in tiny_gemma2(seed=3).state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name


@pytest.mark.parametrize(
    "build",
    [*BUILDERS, tiny_sae, lambda seed: tiny_sae(seed=seed, b_dec_std=0.1), lambda seed: planted_sae(torch.eye(8))],
)
def test_builders_leave_the_global_random_state_alone(build):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_models_by_family_name():
    assert TINY_MODELS == {"gemma2": tiny_gemma2, "gemma3": tiny_gemma3, "llama": tiny_llama, "qwen3": tiny_qwen3}


def test_tiny_sae_reads_the_tiny_models_and_is_seeded():
    sae = tiny_sae(layer=2, site="mlp", d_sae=128, k=4, seed=5)
    config = sae.config
    assert (config.d_in, config.d_sae, config.k, config.hook_layer, config.hook_site) == (64, 128, 4, 2, "mlp")
    assert not sae.training
    assert torch.equal(sae.W_dec, tiny_sae(layer=2, site="mlp", d_sae=128, k=4, seed=5).W_dec)
    assert not torch.equal(sae.W_dec, tiny_sae(layer=2, site="mlp", d_sae=128, k=4, seed=6).W_dec)
    assert torch.count_nonzero(tiny_sae().b_dec) == 0
    biased = tiny_sae(b_dec_std=0.1)
    assert torch.count_nonzero(biased.b_dec) == 64 and 0.02 < float(biased.b_dec.detach().std()) < 0.5
    assert torch.equal(biased.W_dec, tiny_sae().W_dec)  # the bias is drawn after the weights


def test_fixtures_build_fresh_models(tiny_lm):
    first, second = tiny_lm("gemma3"), tiny_lm("gemma3")
    assert first is not second
    assert torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)
    assert tiny_lm("llama", head_dim=32).config.head_dim == 32


def test_planted_sae_reads_and_writes_the_given_directions():
    directions = torch.linalg.qr(torch.randn(16, 16))[0][:6]  # 6 orthonormal rows
    sae = planted_sae(directions, 3, "attn", base_model="org/tiny")
    config = sae.config
    assert (config.d_in, config.d_sae, config.k, config.hook_layer, config.hook_site) == (16, 6, 4, 3, "attn")
    assert config.base_model == "org/tiny" and not sae.training
    assert torch.equal(sae.W_dec, directions) and torch.equal(sae.encoder.weight, directions)
    latents = sae.encode(2.0 * directions[4:5])
    assert int(latents.indices[0, latents.values[0].argmax()]) == 4

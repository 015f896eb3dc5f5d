"""hf_sae.sites: resolving (layer, site) to a module and hooking it, on Gemma-2, Gemma-3 and a Llama-like model."""

from __future__ import annotations

import pytest
import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig
from hf_sae.sites import (
    SITES,
    SiteError,
    capture_activations,
    decoder_layers,
    num_layers,
    resolve_sae_site,
    resolve_site,
)
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_llama

HEAD_DIM = 32  # n_heads * head_dim = 128 != d_model, so attn_z has its own width


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gemma2", "gemma3", "llama"])
def model(request, tiny_lm):
    return tiny_lm(request.param, head_dim=HEAD_DIM)


def _hook_counts(model):
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs)) for m in model.modules()
    ]


def test_layers_found_on_causal_lm_and_base_model(model):
    assert decoder_layers(model) is model.model.layers
    assert decoder_layers(model.model) is model.model.layers
    assert num_layers(model) == 4


def test_site_modules_follow_the_layout(model):
    block = model.model.layers[2]
    gemma = hasattr(block, "post_feedforward_layernorm")
    assert resolve_site(model, 2, "resid").module is block
    assert resolve_site(model, 2, "mlp").module is (block.post_feedforward_layernorm if gemma else block.mlp)
    assert resolve_site(model, 2, "attn").module is (block.post_attention_layernorm if gemma else block.self_attn)
    z = resolve_site(model, 2, "attn_z")
    assert z.module is block.self_attn.o_proj and z.kind == "forward_pre"
    assert [resolve_site(model, 2, s).width for s in SITES] == [64, 64, 64, 128]


def test_resid_is_previous_resid_plus_attn_plus_mlp(model):
    ids = torch.randint(0, 1000, (2, 6))
    sites = [resolve_site(model, 1, "resid")] + [resolve_site(model, 2, s) for s in SITES]
    acts = capture_activations(model, sites, input_ids=ids)
    assert acts[(2, "resid")].shape == (2, 6, 64) and acts[(2, "attn_z")].shape == (2, 6, 128)
    expected = acts[(1, "resid")] + acts[(2, "attn")] + acts[(2, "mlp")]
    torch.testing.assert_close(acts[(2, "resid")], expected, rtol=1e-5, atol=1e-5)
    attention = model.model.layers[2].self_attn
    projected = attention.o_proj(acts[(2, "attn_z")])
    if hasattr(model.model.layers[2], "post_feedforward_layernorm"):
        projected = model.model.layers[2].post_attention_layernorm(projected)
    torch.testing.assert_close(projected, acts[(2, "attn")], rtol=1e-5, atol=1e-5)


def test_resid_matches_hidden_states():
    model = tiny_llama(head_dim=HEAD_DIM)
    ids = torch.randint(0, 1000, (1, 5))
    acts = capture_activations(model, [resolve_site(model, 1, "resid")], input_ids=ids)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[(1, "resid")], hidden[2])


@pytest.mark.parametrize("zeroed", ["mlp", "attn", "attn_z"])
def test_returning_a_tensor_replaces_the_activation(model, zeroed):
    ids = torch.randint(0, 1000, (2, 5))
    before = _hook_counts(model)
    handle = resolve_site(model, 2, zeroed).register(torch.zeros_like)
    try:
        acts = capture_activations(
            model,
            [resolve_site(model, 1, "resid"), resolve_site(model, 2, "attn"), resolve_site(model, 2, "resid")],
            input_ids=ids,
        )
    finally:
        handle.remove()
    assert _hook_counts(model) == before
    kept = "attn" if zeroed == "mlp" else None
    if zeroed == "attn":
        assert acts[(2, "attn")].abs().max() == 0
    if zeroed == "attn_z" and not hasattr(model.model.layers[2], "post_feedforward_layernorm"):
        assert acts[(2, "attn")].abs().max() == 0  # Llama o_proj has no bias
    if kept:
        torch.testing.assert_close(acts[(2, "resid")], acts[(1, "resid")] + acts[(2, "attn")], rtol=1e-5, atol=1e-5)


def test_returning_none_leaves_the_output_unchanged(model):
    ids = torch.randint(0, 1000, (1, 5))
    clean = model(input_ids=ids).logits
    handles = [resolve_site(model, 1, s).register(lambda a: None) for s in SITES]
    hooked = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(hooked, clean, rtol=0, atol=0)


def test_capture_stops_after_the_site():
    model = tiny_gemma2(head_dim=HEAD_DIM)
    calls = []
    handle = model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    capture_activations(model, [resolve_site(model, 1, "resid")], input_ids=torch.randint(0, 1000, (1, 4)))
    handle.remove()
    assert calls == []


def test_errors_name_value_expectation_and_fix():
    model = tiny_gemma2(head_dim=HEAD_DIM)
    with pytest.raises(SiteError, match=r"'res'.*\['resid', 'mlp', 'attn', 'attn_z'\]"):
        resolve_site(model, 1, "res")
    with pytest.raises(SiteError, match=r"layer 4 is out of range.*0\.\.3"):
        resolve_site(model, 4, "resid")
    with pytest.raises(SiteError, match="layer -1"):
        resolve_site(model, -1, "resid")
    with pytest.raises(SiteError, match="model.layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    assert issubclass(SiteError, ValueError)


def test_sae_site_checks_width_layer_and_base_model():
    model = tiny_gemma2(head_dim=HEAD_DIM)
    cfg = dict(d_sae=256, k=8, hook_layer=1)
    site = resolve_sae_site(model, HierarchicalSAE(HierarchicalSAEConfig(d_in=128, hook_site="attn_z", **cfg)))
    assert site.key == (1, "attn_z")
    with pytest.raises(SiteError, match=r"d_in=32 does not match the width 64 of site 'resid'"):
        resolve_sae_site(model, HierarchicalSAE(HierarchicalSAEConfig(d_in=32, **cfg)))
    with pytest.raises(SiteError, match="hook_layer=None"):
        resolve_sae_site(model, HierarchicalSAE(HierarchicalSAEConfig(d_in=64, d_sae=256, k=8)))
    model.name_or_path = "google/gemma-2-2b"
    other = HierarchicalSAE(HierarchicalSAEConfig(d_in=64, base_model="meta-llama/Llama-3.2-1B", **cfg))
    with pytest.warns(UserWarning, match=r"Llama-3.2-1B.*google/gemma-2-2b"):
        resolve_sae_site(model, other)

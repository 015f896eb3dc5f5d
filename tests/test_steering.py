"""hf_sae.steering on tiny random Gemma-2 / Gemma-3: formulas, generation with and without cache, padding, hooks."""

from __future__ import annotations

import functools

import pytest
import torch

from hf_sae import SAEPreTrainedModel, SparseLatents
from hf_sae.sites import SITES, SiteError, capture_activations, resolve_site
from hf_sae.steering import SteeringError, attach, clamp_delta, latent_values, steer
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_sae

GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")

# A non-zero decoder bias, so the clamp tests see that b_dec cancels.
_sae = functools.partial(tiny_sae, b_dec_std=0.1)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def model(request, tiny_lm):
    return tiny_lm(request.param)


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def _left_padded():
    """Two prompts of lengths 3 and 5, left-padded to 5 with id 0."""
    input_ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return input_ids, attention_mask


class _Recorder:
    """Records the activation a site sees before and after the hooks registered between ``start`` and ``stop``."""

    def __init__(self, site):
        self.site = site
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self._handles = [site.register(lambda a: self.before.append(a.detach().clone()))]

    def close_over(self):
        self._handles.append(self.site.register(lambda a: self.after.append(a.detach().clone())))
        return self

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _record_around(model, sae, make_handle, run):
    """Run ``run()`` with recorders before and after the hooks of ``make_handle()``; return the recorder."""
    recorder = _Recorder(resolve_site(model, sae.config.hook_layer, sae.config.hook_site))
    handle = make_handle()
    recorder.close_over()
    try:
        run()
    finally:
        handle.remove()
        recorder.remove()
    return recorder


def _manual_clamp_delta(sae, h, features):
    """decode(z') - decode(z) with z' built by editing SparseLatents by hand (append f when it is not active)."""
    z = sae.encode(h)
    values, indices = z.values.clone(), z.indices.clone()
    extra_v, extra_i = [], []
    for feature, strength in features.items():
        hit = indices == feature
        values = torch.where(hit, torch.full_like(values, strength), values)
        absent = ~hit.any(-1, keepdim=True)
        extra_v.append(
            torch.where(absent, torch.full_like(values[..., :1], strength), torch.zeros_like(values[..., :1]))
        )
        extra_i.append(torch.full_like(indices[..., :1], feature))
    edited = SparseLatents(torch.cat([values, *extra_v], -1), torch.cat([indices, *extra_i], -1))
    return sae.decode(edited) - sae.decode(z)


# ----------------------------------------------------------------------------------------------------- formulas
def test_add_moves_the_activation_by_s_times_the_unit_decoder_row_at_every_position(model):
    sae = _sae()
    features = {3: 8.0, 40: -2.5}
    ids = torch.randint(1, 1000, (2, 6))
    rec = _record_around(model, sae, lambda: steer(model, sae, features), lambda: model(input_ids=ids))
    expected = 8.0 * sae.W_dec[3] + -2.5 * sae.W_dec[40]
    torch.testing.assert_close(rec.after[0] - rec.before[0], expected.expand(2, 6, 64), rtol=1e-5, atol=1e-5)


def test_add_uses_the_unit_direction_even_when_the_decoder_row_is_not_unit():
    model = tiny_gemma2()
    sae = _sae()
    with torch.no_grad():
        sae.W_dec[5] *= 3.0
    ids = torch.randint(1, 1000, (1, 4))
    rec = _record_around(model, sae, lambda: steer(model, sae, {5: 2.0}), lambda: model(input_ids=ids))
    delta = rec.after[0] - rec.before[0]
    torch.testing.assert_close(delta.norm(dim=-1), torch.full((1, 4), 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["clamp", "ablate"])
def test_clamp_and_ablate_equal_decode_of_edited_latents_minus_decode(model, mode):
    sae = _sae(k=16)
    ids = torch.randint(1, 1000, (2, 6))
    h = capture_activations(model, [resolve_site(model, 1, "resid")], input_ids=ids)[(1, "resid")]
    active = sae.encode(h).indices[0, 0, :2].tolist()  # two features active at the first token ...
    features = {active[0]: 5.0, active[1]: 0.5, 200: 3.0}  # ... and one that may not be
    if mode == "ablate":
        features = dict.fromkeys(features, 0.0)
    rec = _record_around(
        model,
        sae,
        lambda: (
            steer(model, sae, list(features), mode="ablate")
            if mode == "ablate"
            else steer(model, sae, features, mode=mode)
        ),
        lambda: model(input_ids=ids),
    )
    torch.testing.assert_close(rec.before[0], h)
    expected = _manual_clamp_delta(sae, h, features)
    torch.testing.assert_close(rec.after[0] - rec.before[0], expected, rtol=1e-4, atol=1e-5)
    latents_after = sae.encode(rec.after[0]).to_dense(sae.config.d_sae)
    if mode == "ablate":
        assert latents_after[0, 0, active[0]] < sae.encode(h).to_dense(256)[0, 0, active[0]]


def test_clamp_keeps_the_sae_error_term():
    model = tiny_gemma2()
    sae = _sae(k=16)
    ids = torch.randint(1, 1000, (1, 5))
    rec = _record_around(model, sae, lambda: steer(model, sae, {7: 4.0}, mode="clamp"), lambda: model(input_ids=ids))
    before, after = rec.before[0], rec.after[0]
    z = sae.encode(before)
    error_before = before - sae.decode(z)
    edited_dense = z.to_dense(256)
    edited_dense[..., 7] = 4.0
    values, indices = edited_dense.topk(17)
    torch.testing.assert_close(after - sae.decode(SparseLatents(values, indices)), error_before, rtol=1e-4, atol=1e-5)


def test_steered_logits_equal_a_manual_forward_with_the_edited_residual(model):
    sae = _sae(layer=2)
    ids = torch.randint(1, 1000, (2, 5))
    delta = 6.0 * sae.W_dec[9]
    site = resolve_site(model, 2, "resid")
    handle = site.register(lambda a: a + delta)
    manual = model(input_ids=ids).logits
    handle.remove()
    with steer(model, sae, {9: 6.0}):
        steered = model(input_ids=ids).logits
    torch.testing.assert_close(steered, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, model(input_ids=ids).logits)


@pytest.mark.parametrize("site_name", SITES)
def test_every_site_can_be_steered(model, site_name):
    sae = _sae(layer=2, site=site_name)
    ids = torch.randint(1, 1000, (1, 4))
    rec = _record_around(model, sae, lambda: steer(model, sae, {1: 3.0}), lambda: model(input_ids=ids))
    torch.testing.assert_close(rec.after[0] - rec.before[0], (3.0 * sae.W_dec[1]).expand(1, 4, 64))


def test_several_saes_at_several_layers_in_one_call(model):
    sae_a, sae_b = _sae(layer=1, seed=1), _sae(layer=3, site="mlp", seed=2)
    ids = torch.randint(1, 1000, (1, 4))
    rec_a = _Recorder(resolve_site(model, 1, "resid"))
    rec_b = _Recorder(resolve_site(model, 3, "mlp"))
    with steer(model, [(sae_a, {12: 4.0}), (sae_b, {7: -3.0})]):
        rec_a.close_over(), rec_b.close_over()
        model(input_ids=ids)
    rec_a.remove(), rec_b.remove()
    torch.testing.assert_close(rec_a.after[0] - rec_a.before[0], (4.0 * sae_a.W_dec[12]).expand(1, 4, 64))
    torch.testing.assert_close(rec_b.after[0] - rec_b.before[0], (-3.0 * sae_b.W_dec[7]).expand(1, 4, 64))


# ---------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("mode", ["add", "clamp", "ablate"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_greedy_generate_gives_the_same_tokens_with_and_without_cache(model, mode, positions):
    sae = _sae(k=16)
    ids = torch.randint(1, 1000, (1, 5))
    features = (
        {
            int(
                sae.encode(
                    capture_activations(model, [resolve_site(model, 1, "resid")], input_ids=ids)[(1, "resid")]
                ).indices[0, -1, 0]
            ): 0.0
        }
        if mode == "ablate"
        else {3: 30.0, 8: 20.0}
    )
    clean = model.generate(input_ids=ids, **GREEDY)
    outputs = []
    for use_cache in (True, False):
        with steer(model, sae, features, mode=mode, positions=positions):
            outputs.append(model.generate(input_ids=ids, use_cache=use_cache, **GREEDY))
    assert torch.equal(outputs[0], outputs[1])
    if mode != "ablate":
        assert not torch.equal(outputs[0], clean)


def test_steering_applies_at_prefill_and_at_every_decode_step(model):
    sae = _sae()
    ids = torch.randint(1, 1000, (1, 4))
    rec = _record_around(
        model, sae, lambda: steer(model, sae, {3: 5.0}), lambda: model.generate(input_ids=ids, **GREEDY)
    )
    assert [a.shape[1] for a in rec.after] == [4, 1, 1, 1, 1]
    for before, after in zip(rec.before, rec.after, strict=True):
        torch.testing.assert_close(after - before, (5.0 * sae.W_dec[3]).expand_as(before))


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_choose_prompt_or_generated_tokens(model, positions):
    sae = _sae()
    ids = torch.randint(1, 1000, (1, 4))
    for use_cache in (True, False):
        rec = _record_around(
            model,
            sae,
            lambda: steer(model, sae, {3: 5.0}, positions=positions),
            lambda: model.generate(input_ids=ids, use_cache=use_cache, **GREEDY),  # noqa: B023
        )
        step_vector = 5.0 * sae.W_dec[3]
        for step, (before, after) in enumerate(zip(rec.before, rec.after, strict=True)):
            start = 3 + step if use_cache and step > 0 else 0
            absolute = torch.arange(start, start + before.shape[1])
            steered = absolute < 4 if positions == "prompt" else absolute >= 4
            expected = steered[None, :, None].float() * step_vector
            torch.testing.assert_close(after - before, expected.expand_as(before), rtol=1e-5, atol=1e-6)


def test_left_padded_positions_are_never_steered(model):
    sae = _sae(k=16)
    input_ids, attention_mask = _left_padded()
    for mode in ("add", "clamp"):
        rec = _record_around(
            model,
            sae,
            lambda: steer(model, sae, {3: 9.0}, mode=mode),  # noqa: B023
            lambda: model(input_ids=input_ids, attention_mask=attention_mask),
        )
        delta = rec.after[0] - rec.before[0]
        assert delta[0, :2].abs().max() == 0
        assert delta[0, 2:].abs().amin(-1).max() > 0 or delta[0, 2:].norm(dim=-1).min() > 0


@pytest.mark.parametrize("mode", ["add", "clamp"])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_left_padded_batch_gives_each_rows_tokens_alone(model, mode, positions):
    sae = _sae(k=16)
    input_ids, attention_mask = _left_padded()
    features = {3: 30.0, 8: 20.0}
    with steer(model, sae, features, mode=mode, positions=positions):
        batch = model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    for row, pad in ((0, 2), (1, 0)):
        alone = steer(model, sae, features, mode=mode, positions=positions).generate(
            input_ids=input_ids[row : row + 1, pad:], **GREEDY
        )
        assert torch.equal(batch[row, pad:], alone[0])


# ------------------------------------------------------------------------------------------------- hook lifetime
def test_hooks_are_removed_when_the_body_raises(model):
    sae = _sae()
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), steer(model, sae, {1: 2.0}):
        assert _hook_count(model) > before
        raise RuntimeError("boom")
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"), attach(model, sae):
        raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_one_liner_generate_and_handle_remove_leave_no_hooks(model):
    sae = _sae()
    before = _hook_count(model)
    ids = torch.randint(1, 1000, (1, 4))
    steered = steer(model, sae, {3: 30.0}).generate(input_ids=ids, **GREEDY)
    assert _hook_count(model) == before
    handle = steer(model, sae, {3: 30.0})
    assert handle.active
    assert torch.equal(model.generate(input_ids=ids, **GREEDY), steered)
    assert torch.equal(model.generate(input_ids=ids, **GREEDY), steered)  # long-lived: still steering
    handle.remove()
    handle.remove()
    assert _hook_count(model) == before and not handle.active


def test_contexts_nest_and_compose(model):
    sae_a, sae_b = _sae(seed=1), _sae(seed=2)
    ids = torch.randint(1, 1000, (1, 3))
    site = resolve_site(model, 1, "resid")
    before = _hook_count(model)
    rec = _Recorder(site)
    with steer(model, sae_a, {1: 2.0}):
        with steer(model, sae_b, {2: 3.0}):
            rec.close_over()
            model(input_ids=ids)
        model(input_ids=ids)
    rec.remove()
    both = 2.0 * sae_a.W_dec[1] + 3.0 * sae_b.W_dec[2]
    torch.testing.assert_close(rec.after[0] - rec.before[0], both.expand(1, 3, 64))
    torch.testing.assert_close(rec.after[1] - rec.before[1], (2.0 * sae_a.W_dec[1]).expand(1, 3, 64))  # inner left
    assert _hook_count(model) == before


def test_transformers_own_hooks_survive(model):
    sae = _sae()
    model(input_ids=torch.tensor([[1, 2]]), output_hidden_states=True)  # installs transformers' own layer hooks
    before = _hook_count(model)
    with steer(model, sae, {1: 1.0}), attach(model, sae):
        pass
    assert _hook_count(model) == before


# ---------------------------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize(
    ("model_dtype", "sae_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_mixed_dtypes_cast_in_compute_and_cast_back(model_dtype, sae_dtype, mode):
    model = tiny_gemma2().to(model_dtype)
    sae = _sae(k=16).to(sae_dtype)
    ids = torch.randint(1, 1000, (1, 4))
    rec = _record_around(model, sae, lambda: steer(model, sae, {3: 4.0}, mode=mode), lambda: model(input_ids=ids))
    assert rec.after[0].dtype == model_dtype
    if mode == "add":
        expected = (4.0 * sae.W_dec[3].float()).expand(1, 4, 64)
        torch.testing.assert_close((rec.after[0] - rec.before[0]).float(), expected, rtol=0.05, atol=0.1)
    with steer(model, sae, {3: 4.0}, mode=mode):
        out = model.generate(input_ids=ids, **GREEDY)
    assert out.shape == (1, 9)
    with attach(model, sae, splice=True) as hook:
        model(input_ids=ids)
    assert hook.latents.values.dtype == sae_dtype


# ---------------------------------------------------------------------------------------------------------- attach
def test_attach_records_the_latents_of_the_last_forward(model):
    sae = _sae(layer=2)
    ids = torch.randint(1, 1000, (2, 5))
    h = capture_activations(model, [resolve_site(model, 2, "resid")], input_ids=ids)[(2, "resid")]
    clean = model(input_ids=ids).logits
    with attach(model, sae, keep_history=True) as hook:
        recorded = model(input_ids=ids).logits
        model.generate(input_ids=ids[:1], **GREEDY)
    torch.testing.assert_close(recorded, clean, rtol=0, atol=0)  # recording does not change the model
    expected = sae.encode(h)
    torch.testing.assert_close(hook.history[0].values, expected.values)
    assert torch.equal(hook.history[0].indices, expected.indices)
    assert hook.latents.values.shape == (1, 1, 8) and len(hook.history) == 1 + 5


def test_attach_splice_replaces_the_activation_by_the_reconstruction(model):
    sae = _sae()
    ids = torch.randint(1, 1000, (1, 5))
    h = capture_activations(model, [resolve_site(model, 1, "resid")], input_ids=ids)[(1, "resid")]
    rec = _record_around(model, sae, lambda: attach(model, sae, splice=True, k=4), lambda: model(input_ids=ids))
    torch.testing.assert_close(rec.after[0], sae.decode(sae.encode(h, 4)))


def test_sae_methods_delegate(monkeypatch):
    if not hasattr(SAEPreTrainedModel, "steer"):
        monkeypatch.setattr(
            SAEPreTrainedModel, "steer", lambda self, m, f, **kw: steer(m, self, f, **kw), raising=False
        )
        monkeypatch.setattr(SAEPreTrainedModel, "attach", lambda self, m, **kw: attach(m, self, **kw), raising=False)
    model, sae = tiny_gemma2(), _sae()
    ids = torch.randint(1, 1000, (1, 4))
    expected = steer(model, sae, {3: 30.0}, mode="clamp").generate(input_ids=ids, **GREEDY)
    assert torch.equal(sae.steer(model, {3: 30.0}, mode="clamp").generate(input_ids=ids, **GREEDY), expected)
    with sae.attach(model) as hook:
        model(input_ids=ids)
    assert hook.latents.indices.shape == (1, 4, 8)


# ---------------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_value_the_expectation_and_the_fix():
    model = tiny_gemma2()
    sae = _sae()
    with pytest.raises(SteeringError, match=r"feature 256 is out of range.*d_sae=256.*0\.\.255"):
        steer(model, sae, {256: 1.0})
    with pytest.raises(SteeringError, match=r"mode='push'.*\['add', 'clamp', 'ablate'\]"):
        steer(model, sae, {1: 1.0}, mode="push")
    with pytest.raises(SteeringError, match=r"positions='prefix'"):
        steer(model, sae, {1: 1.0}, positions="prefix")
    with pytest.raises(SteeringError, match="without strengths"):
        steer(model, sae, [1, 2])
    with pytest.raises(SteeringError, match="finite"):
        steer(model, sae, {1: float("nan")})
    with pytest.raises(SiteError, match=r"d_in=32 does not match the width 64"):
        steer(model, _sae(d_in=32), {1: 1.0})
    with pytest.raises(SiteError, match=r"layer 7 is out of range.*0\.\.3"):
        steer(model, _sae(layer=7), {1: 1.0})
    before = _hook_count(model)
    with pytest.raises(SteeringError):  # the second entry fails: the first one's hooks are removed again
        steer(model, [(sae, {1: 1.0}), (sae, {999: 1.0})])
    assert _hook_count(model) == before
    model.name_or_path = "google/gemma-2-2b"
    with pytest.warns(UserWarning, match=r"gemma-3-270m.*google/gemma-2-2b"):
        steer(model, _sae(base_model="google/gemma-3-270m"), {1: 1.0}).remove()


def test_clamp_delta_is_zero_when_clamping_to_the_current_value():
    sae = _sae(k=16)
    x = torch.randn(5, 64)
    z = sae.encode(x)
    f = int(z.indices[0, 0])
    delta = clamp_delta(sae, x[:1], torch.tensor([f]), z.values[0, :1])
    torch.testing.assert_close(delta, torch.zeros(1, 64))


def test_latent_values_agree_between_the_sparse_and_dense_paths():
    values = torch.tensor([[3.0, 2.0, 1.0], [5.0, 0.5, 0.0]])
    indices = torch.tensor([[4, 1, 7], [2, 4, 0]])
    ids = torch.tensor([4, 2, 6])
    expected = torch.tensor([[3.0, 0.0, 0.0], [0.5, 5.0, 0.0]])
    torch.testing.assert_close(latent_values(SparseLatents(values, indices), ids, 16), expected)  # k*m <= d_sae
    torch.testing.assert_close(latent_values(SparseLatents(values, indices), ids, 8), expected)  # dense gather


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_gradients_flow_through_a_steered_model(mode):
    model, sae = tiny_gemma2(), _sae(k=16)
    ids = torch.randint(1, 1000, (1, 4))
    with steer(model, sae, {3: 4.0}, mode=mode):
        model(input_ids=ids).logits.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()
    with attach(model, sae, splice=True) as hook:
        model(input_ids=ids).logits.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0 and sae.W_dec.grad is not None
    assert hook.latents.values.requires_grad


@pytest.mark.slow
def test_real_small_gemma_steering_with_and_without_cache():
    """The real Gemma 3 270M: clamping a feature changes greedy text identically with and without the KV cache."""
    embedded = pytest.importorskip("training.small_gemma")
    if not hasattr(embedded, "load_small_gemma"):
        pytest.skip("training.small_gemma.load_small_gemma is not available")
    model, tokenizer = embedded.load_small_gemma()
    sae = _sae(layer=6, d_in=model.config.hidden_size, d_sae=2048, k=32)
    inputs = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" or inputs["attention_mask"].all()
    greedy = dict(max_new_tokens=8, do_sample=False)
    clean = model.generate(**inputs, **greedy)
    hooks = _hook_count(model)
    outputs = [
        steer(model, sae, {5: 1000.0}, mode="clamp").generate(**inputs, use_cache=use_cache, **greedy)
        for use_cache in (True, False)
    ]
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], clean)
    assert _hook_count(model) == hooks

"""Which tokens steering touches: BOS left alone in every mode, beam search with and without the cache under every
``positions``, and handles that can be used again (tiny random Gemma-2 / Gemma-3, BOS id 2)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from hf_sae.sites import resolve_site
from hf_sae.steering import SteeringError, steer
from hf_sae.testing.tiny_models import tiny_sae

BOS = 2
pytestmark = pytest.mark.usefixtures("one_thread")
_sae = functools.partial(tiny_sae, b_dec_std=0.1)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def model(request, tiny_lm):
    return tiny_lm(request.param)


def _edits(model, sae, make_handle, **inputs):
    """(B, T, d) the change each hook made at the SAE's site during one forward."""
    site = resolve_site(model, sae.config.hook_layer, sae.config.hook_site)
    before, after = [], []
    first = site.register(lambda a: before.append(a.detach().clone()))
    handle = make_handle()
    last = site.register(lambda a: after.append(a.detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        first.remove()
        last.remove()
    return after[0] - before[0]


IDS = torch.tensor([[BOS, 11, 12, BOS, 13, 14], [BOS, 21, 22, 23, 24, 25]])  # a BOS mid-sequence too


@pytest.mark.parametrize("mode", ["add", "clamp", "ablate"])
def test_bos_is_never_steered_in_any_mode_by_default(model, mode):
    sae = _sae()
    features = {3: 5.0, 7: 2.0} if mode != "ablate" else [3, 7]
    delta = _edits(model, sae, lambda: steer(model, sae, features, mode=mode), input_ids=IDS)
    is_bos = IDS == BOS
    assert bool((delta[is_bos] == 0).all())
    if mode == "add":  # every other position moved by the same vector
        assert bool((delta[~is_bos].norm(dim=-1) > 0).all())
    everything = _edits(model, sae, lambda: steer(model, sae, features, mode=mode, exclude_token_ids=[]), input_ids=IDS)
    if mode == "add":
        assert bool((everything[is_bos].norm(dim=-1) > 0).all())  # [] opts back in


def test_the_saes_excluded_token_ids_are_left_alone_too(model):
    sae = _sae()
    sae.config.excluded_token_ids = [12]
    delta = _edits(model, sae, lambda: steer(model, sae, {3: 5.0}), input_ids=IDS)
    untouched = (IDS == BOS) | (IDS == 12)
    assert bool((delta[untouched] == 0).all()) and bool((delta[~untouched].norm(dim=-1) > 0).all())
    only = _edits(model, sae, lambda: steer(model, sae, {3: 5.0}, exclude_token_ids=[13]), input_ids=IDS)
    assert bool((only[IDS == 13] == 0).all()) and bool((only[IDS == BOS].norm(dim=-1) > 0).all())


def test_bos_stays_unsteered_during_generate_with_and_without_cache(model):
    sae = _sae()
    site = resolve_site(model, sae.config.hook_layer, sae.config.hook_site)
    prompt = torch.tensor([[BOS, 11, 12, 13]])
    for use_cache in (True, False):
        seen = []
        handle = steer(model, sae, {3: 50.0})
        recorder = site.register(lambda a: seen.append(a.detach().clone()))  # noqa: B023
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=use_cache)
        recorder.remove()
        handle.remove()
        with torch.no_grad():
            clean = _capture(model, site, prompt)
        assert torch.equal(seen[0][0, 0], clean[0, 0])  # BOS of the prefill forward: unsteered
        assert not torch.allclose(seen[0][0, 1], clean[0, 1])


def _capture(model, site, ids):
    out = []
    handle = site.register(lambda a: out.append(a.detach().clone()))
    model(input_ids=ids)
    handle.remove()
    return out[0]


def test_inputs_embeds_cannot_tell_bos_and_warn_once(model):
    sae = _sae()
    embeds = model.get_input_embeddings()(IDS)
    with steer(model, sae, {3: 5.0}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(inputs_embeds=embeds)
            model(inputs_embeds=embeds)
    assert len([w for w in caught if "inputs_embeds" in str(w.message)]) == 1
    with steer(model, sae, {3: 5.0}, exclude_token_ids=[BOS]), pytest.raises(SteeringError, match="inputs_embeds"):
        with torch.no_grad():
            model(inputs_embeds=embeds)


# ----------------------------------------------------------------------------------------------- beam search
def _steered_positions(model, sae, positions, **generate):
    """For each forward during generate: (absolute start, length, which of its positions were edited (B, T))."""
    site = resolve_site(model, sae.config.hook_layer, sae.config.hook_site)
    records = []
    before = []
    first = site.register(lambda a: before.append(a.detach().clone()))
    handle = steer(model, sae, {3: 40.0}, positions=positions, exclude_token_ids=[])
    last = site.register(lambda a: records.append((a - before[-1]).norm(dim=-1) > 0))
    try:
        out = model.generate(**generate)
    finally:
        handle.remove()
        first.remove()
        last.remove()
    return records, out


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_beam_search_steers_the_chosen_positions_with_and_without_cache(model, positions, use_cache):
    sae = _sae()
    prompt = torch.tensor([[11, 12, 13, 14]])
    prompt_length = prompt.shape[1]
    generate = dict(
        input_ids=prompt, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0, use_cache=use_cache
    )
    records, out = _steered_positions(model, sae, positions, **generate)
    assert len(records) == 4
    for step, edited in enumerate(records):
        start = 0 if not use_cache or step == 0 else prompt_length + step - 1
        absolute = torch.arange(start, start + edited.shape[1])
        expected = {
            "all": torch.ones_like(absolute, dtype=torch.bool),
            "prompt": absolute < prompt_length,
            "generated": absolute >= prompt_length,
        }[positions]
        assert torch.equal(edited, expected.expand_as(edited)), (step, edited)
    reference = model.generate(**{**generate, "use_cache": not use_cache}) if positions == "all" else None
    if reference is not None:  # the guarantee of the cache: beams too give the same tokens either way
        with steer(model, sae, {3: 40.0}, exclude_token_ids=[]):
            again = model.generate(**generate)
            other = model.generate(**{**generate, "use_cache": not use_cache})
        assert torch.equal(again, other)


# ------------------------------------------------------------------------------------------------ handles
def test_a_one_shot_handle_used_again_steers_again(model):
    sae = _sae()
    prompt = torch.tensor([[11, 12, 13]])
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    clean = model.generate(prompt, **greedy)
    handle = sae.steer(model, {3: 80.0})
    first = handle.generate(prompt, **greedy)
    assert not handle.active
    second = handle.generate(prompt, **greedy)
    assert not handle.active
    assert not torch.equal(first, clean) and torch.equal(first, second)
    assert torch.equal(model.generate(prompt, **greedy), clean)  # and the model is clean after each


def test_nested_with_blocks_of_one_handle_keep_the_hooks_until_the_outer_exits(model):
    sae = _sae()
    ids = torch.tensor([[11, 12, 13]])
    handle = steer(model, sae, {3: 5.0})
    with torch.no_grad():
        with handle:
            with handle:
                pass
            assert handle.active  # the inner exit removed nothing
            steered = model(input_ids=ids).logits
        assert not handle.active
        clean = model(input_ids=ids).logits
        with handle:  # and a removed handle can be entered again
            assert handle.active
            again = model(input_ids=ids).logits
    assert not handle.active
    assert not torch.allclose(steered, clean) and torch.equal(steered, again)

"""Harvesting (training/harvest.py) and packing (training/data.py): hooked activations, the early-stopped forward,
BOS-led windows, excluded tokens, resumable windows and the shuffle buffer, on the tiny saved LM."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

import hf_sae  # noqa: F401  (registers the SAE classes with AutoModel)
from hf_sae.sites import resolve_site
from training.harvest import ActivationBuffer, ActivationHarvester

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = 2, 1, 0


# ------------------------------------------------------------------------------------------- harvesting and data
@pytest.mark.parametrize("site", ["resid", "mlp", "attn", "attn_z"])
def test_harvest_equals_the_hooked_activations_of_a_full_forward(windows_of, load_saved_lm, saved_lm, site):
    model, tokenizer = load_saved_lm()
    input_ids, attention_mask = windows_of(tokenizer).next_batch(4)
    resolved = resolve_site(model, 1, site)
    harvested = ActivationHarvester(model, [resolved], [])
    got = harvested.activations(input_ids, attention_mask)[(1, site)]

    seen = {}
    module = resolved.module
    if resolved.kind == "forward_pre":
        handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.setdefault("x", out.clone()))
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    handle.remove()
    assert torch.equal(got, seen["x"])
    if site == "resid":  # and the residual stream after layer 1 is hidden_states[2]
        assert torch.equal(got, full.hidden_states[2])
    kept = harvested(input_ids, attention_mask)[(1, site)]
    assert torch.equal(kept, seen["x"][attention_mask.bool()])


def test_the_forward_stops_after_the_deepest_hooked_layer(load_saved_lm, windows_of, saved_lm):
    model, tokenizer = load_saved_lm()
    calls = collections.Counter()
    layers = model.model.layers
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.update([f"layer{i}"])) for i, layer in enumerate(layers)
    ]
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, a: calls.update(["norm"])))
    handles.append(model.lm_head.register_forward_pre_hook(lambda m, a: calls.update(["lm_head"])))
    sites = [resolve_site(model, 0, "mlp"), resolve_site(model, 1, "resid"), resolve_site(model, 1, "attn")]
    harvester = ActivationHarvester(model, sites, [BOS])
    result = harvester(*windows_of(tokenizer).next_batch(2))
    for handle in handles:
        handle.remove()
    assert set(result) == {(0, "mlp"), (1, "resid"), (1, "attn")}
    assert calls == {"layer0": 1, "layer1": 1}  # layers 2, 3, the final norm and the LM head never ran


def test_windows_start_with_bos_and_never_contain_it_elsewhere(windows_of, load_saved_lm, saved_lm):
    _, tokenizer = load_saved_lm()
    texts = ["the cat <bos> sat on the mat " * 7, "a short one", "<bos> starts with a literal bos " * 3]
    windows = windows_of(tokenizer, texts, context_length=16)
    rows = []
    while (window := windows.next_window()) is not None:
        rows.append(window)
    ids = torch.stack([r[0] for r in rows])
    mask = torch.stack([r[1] for r in rows])
    assert (ids[:, 0] == BOS).all() and not (ids[:, 1:] == BOS).any()
    assert mask[:-1].all() and not mask[-1].all()  # only the very last window of a finite stream is padded
    assert (ids[mask == 0] == PAD).all()
    text_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) - t.count("<bos>") for t in texts)
    assert int(mask.sum()) - len(rows) == text_tokens + len(texts)  # every text token + one EOS per document


def test_bos_and_padding_are_excluded_from_training_activations(load_saved_lm, windows_of, saved_lm):
    model, tokenizer = load_saved_lm()
    windows = windows_of(tokenizer, ["one two three four five six seven"] * 3, context_length=16)
    input_ids, attention_mask = windows.next_batch(8)
    assert (input_ids == BOS).sum() == input_ids.shape[0] and (attention_mask == 0).any()
    harvester = ActivationHarvester(model, [resolve_site(model, 1, "resid")], [BOS, PAD])
    kept = harvester(input_ids, attention_mask)[(1, "resid")]
    everything = harvester.activations(input_ids, attention_mask)[(1, "resid")]
    real = attention_mask.bool() & (input_ids != BOS)
    assert kept.shape[0] == int(real.sum()) == int(attention_mask.sum()) - input_ids.shape[0]
    assert torch.equal(kept, everything[real])
    configured = ActivationHarvester(model, [resolve_site(model, 1, "resid")], [PAD])  # BOS trained on if asked
    assert configured(input_ids, attention_mask)[(1, "resid")].shape[0] == int(attention_mask.sum())


def test_token_windows_resume_exactly_where_their_state_was_taken(windows_of, load_saved_lm, saved_lm):
    _, tokenizer = load_saved_lm()
    first = windows_of(tokenizer, loop=True, documents_per_group=4)
    for _ in range(37):
        first.next_window()
    state = first.state()
    expected = [first.next_window()[0] for _ in range(50)]
    again = windows_of(tokenizer, loop=True, documents_per_group=4)
    again.load_state(state)
    assert all(torch.equal(a, again.next_window()[0]) for a in expected)


def test_the_buffer_mixes_windows_and_replays_a_round_from_its_state(load_saved_lm, windows_of, saved_lm):
    model, tokenizer = load_saved_lm()
    sites = [resolve_site(model, 1, "resid"), resolve_site(model, 2, "mlp")]

    def buffer():
        return ActivationBuffer(
            windows_of(tokenizer, loop=True),
            ActivationHarvester(model, sites, [BOS]),
            buffer_size=600,
            batch_size=64,
            lm_batch_size=4,
            dtype=torch.float32,
            storage_device=torch.device("cpu"),
            seed=3,
        )

    first = buffer()
    batches = [first.next_batch() for _ in range(13)]  # crosses a round boundary (600 // 64 = 9 per round)
    assert first.round == 1 and set(batches[0]) == {(1, "resid"), (2, "mlp")}
    assert not torch.equal(batches[0][(1, "resid")], batches[1][(1, "resid")])
    state = first.state()
    expected = [first.next_batch() for _ in range(12)]
    second = buffer()
    second.load_state(state)
    for want in expected:
        got = second.next_batch()
        assert all(torch.equal(want[key], got[key]) for key in want)

"""Steering beyond SAE features: contrastive difference-of-means vectors, custom edit functions, and the strength
sweep's metrics against a direct computation (tiny random Gemma-2, BOS id 2)."""

from __future__ import annotations

import pytest
import torch

import hf_sae
from hf_sae import SteeringError, SteeringVector, contrastive_vector, steer, steering_sweep
from hf_sae.sites import capture_activations, resolve_site
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_sae

BOS, EOS = 2, 1
pytestmark = pytest.mark.usefixtures("one_thread")
POSITIVE = [[BOS, 11, 12, 13], [BOS, 14, 15]]
NEGATIVE = [[BOS, 21, 22], [BOS, 23, 24, 25, 26], [BOS, 27, 28]]


@pytest.fixture(scope="module")
def model():
    return tiny_gemma2()


def _site_rows(model, layer, site, prompts):
    where = resolve_site(model, layer, site)
    return [capture_activations(model, [where], input_ids=torch.tensor([p]))[where.key][0].double() for p in prompts]


# ------------------------------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("reduce", ["last", "mean"])
def test_contrastive_vector_is_the_difference_of_means(model, reduce):
    vector = contrastive_vector(model, 2, "resid", POSITIVE, NEGATIVE, reduce=reduce, batch_size=2)

    def reduced(rows):
        return torch.stack([r[-1] if reduce == "last" else r[1:].mean(0) for r in rows]).mean(0)  # BOS left out

    expected = reduced(_site_rows(model, 2, "resid", POSITIVE)) - reduced(_site_rows(model, 2, "resid", NEGATIVE))
    torch.testing.assert_close(vector.vector.double(), expected, rtol=1e-5, atol=1e-6)
    assert (vector.layer, vector.site) == (2, "resid") and "2 positive - 3 negative" in repr(vector)


def test_a_steering_vector_adds_strength_times_v_except_at_bos(model):
    vector = SteeringVector(torch.linspace(-1, 1, 64), 1, "mlp")
    ids = torch.tensor([[BOS, 11, 12, 13]])
    where = resolve_site(model, 1, "mlp")
    clean = capture_activations(model, [where], input_ids=ids)[where.key]
    seen = []
    with steer(model, vector, strength=3.0):
        handle = where.register(lambda a: seen.append(a.detach().clone()))
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
    delta = seen[0] - clean
    assert torch.equal(delta[0, 0], torch.zeros(64))
    torch.testing.assert_close(delta[0, 1:], (3.0 * vector.vector).expand(3, 64), rtol=1e-5, atol=1e-5)
    with pytest.raises(SteeringError, match="width 64"):
        steer(model, SteeringVector(torch.ones(10), 1, "resid"))


def test_vectors_steer_only_the_generated_tokens_when_asked(model):
    vector = contrastive_vector(model, 1, "resid", POSITIVE, NEGATIVE)
    prompt = torch.tensor([[BOS, 11, 12]])
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    clean = model.generate(prompt, **greedy)
    steered = vector.steer(model, strength=50.0, positions="generated").generate(prompt, **greedy)
    assert steered.shape == clean.shape and torch.equal(steered[:, :4], clean[:, :4])  # first token from the prompt
    assert not torch.equal(steered, clean)


# --------------------------------------------------------------------------------------------- edit functions
def test_an_edit_function_replaces_the_rows_at_the_steered_positions(model):
    sae = tiny_sae(layer=1)
    ids = torch.tensor([[BOS, 11, 12, 13]])
    where = resolve_site(model, 1, "resid")
    clean = capture_activations(model, [where], input_ids=ids)[where.key]
    makers = (
        lambda: steer(model, sae, fn=lambda h: 2 * h),
        lambda: steer(model, fn=lambda h: 2 * h, layer=1, site="resid"),
    )
    for make in makers:
        handle, seen = make(), []
        recorder = where.register(lambda a: seen.append(a.detach().clone()))  # noqa: B023
        with torch.no_grad():
            handle(input_ids=ids)  # one shot
        recorder.remove()
        assert not handle.active
        torch.testing.assert_close(seen[0][0, 1:], 2 * clean[0, 1:])
        assert torch.equal(seen[0][0, 0], clean[0, 0])  # BOS untouched


def test_edit_function_errors_name_the_fix(model):
    sae = tiny_sae(layer=1)
    with pytest.raises(SteeringError, match="needs layer= and site="):
        steer(model, fn=lambda h: h)
    with steer(model, sae, fn=lambda h: h[:, :3]), pytest.raises(SteeringError, match="same shape"):
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6]]))


# ------------------------------------------------------------------------------------------------------ sweep
def _direct_metrics(model, make_handle, prompts, targets, max_new_tokens):
    """Token-weighted KL, target log-prob, fluency and target rate, one prompt at a time with full forwards."""
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        handle = make_handle()
        generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        generated = generated[:, ids.shape[1] :]
        eos = (generated[0] == EOS).nonzero()
        if len(eos):
            generated = generated[:, : int(eos[0]) + 1]
        sequence = torch.cat([ids, generated], 1)
        with torch.no_grad():
            steered = model(input_ids=sequence).logits[0, ids.shape[1] - 1 : -1].double().log_softmax(-1)
            if handle is not None:
                handle.remove()
            clean = model(input_ids=sequence).logits[0, ids.shape[1] - 1 : -1].double().log_softmax(-1)
        n = generated.shape[1]
        sums[0] += float((steered.exp() * (steered - clean)).sum())
        sums[1] += float(steered[:, targets].logsumexp(-1).sum())
        sums[2] += float(-clean[torch.arange(n), generated[0]].sum())
        sums[3] += float(torch.isin(generated[0], torch.tensor(targets)).sum())
        count += n
    return (sums / count).tolist(), count


def test_sweep_metrics_match_a_direct_computation(model):
    sae = tiny_sae(layer=1, b_dec_std=0.1)
    prompts = [[BOS, 11, 12, 13], [BOS, 40, 41], [BOS, 7, 8, 9, 10]]  # batched with left padding
    targets = [5, 17, 300]
    result = steering_sweep(model, sae, [3, 7], [4.0, 16.0], prompts, targets=targets, max_new_tokens=5, batch_size=2)
    assert [row.strength for row in result.rows] == [0.0, 4.0, 16.0]
    for row, strength in zip(result.rows, (None, 4.0, 16.0), strict=True):

        def make(strength=strength):
            return None if strength is None else steer(model, sae, {3: strength, 7: strength})

        (kl, target, fluency, rate), count = _direct_metrics(model, make, prompts, targets, 5)
        assert row.tokens == count
        assert row.kl == pytest.approx(0.0 if strength is None else kl, abs=1e-4, rel=1e-3)
        assert row.target_logprob == pytest.approx(target, abs=1e-4, rel=1e-4)
        assert row.fluency_loss == pytest.approx(fluency, abs=1e-4, rel=1e-4)
        assert row.target_rate == pytest.approx(rate)
    assert result.rows[2].kl > result.rows[1].kl > 0  # stronger steering, further from the clean model
    assert "log p(target)" in str(result) and len(result.rows[1].texts) == 3


def test_sweep_of_a_vector_and_its_plot(model, tmp_path):
    vector = contrastive_vector(model, 1, "resid", POSITIVE, NEGATIVE)
    result = steering_sweep(model, vector, None, [1.0, 8.0], [[BOS, 11, 12]], targets=[5], max_new_tokens=3)
    path = result.plot(tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.pick(max_fluency_cost=100.0) in result.rows[1:]
    assert result.pick(max_fluency_cost=-100.0) is result.baseline  # nothing is that fluent: the unsteered row


def test_sweep_errors_name_the_fix(model):
    sae = tiny_sae(layer=1)
    with pytest.raises(SteeringError, match="strengths is empty"):
        steering_sweep(model, sae, [3], [], [[BOS, 11]])
    with pytest.raises(SteeringError, match="features=None"):
        steering_sweep(model, SteeringVector(torch.ones(64), 1, "resid"), [3], [1.0], [[BOS, 11]])
    with pytest.raises(hf_sae.HfSaeError, match="no tokenizer was given"):
        hf_sae.steering_sweep(model, sae, [3], [1.0], [[BOS, 11]], targets=["love"], tokenizer=None)

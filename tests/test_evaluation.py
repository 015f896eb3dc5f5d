"""hf_sae.evaluation: LM loss with the SAE spliced in, CE loss recovered, and feature finding, on tiny random Gemmas."""

from __future__ import annotations

import math
import os

import pytest
import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig
from hf_sae.evaluation import (
    EvaluationError,
    ce_loss_recovered,
    lm_loss_with_sae,
    max_activating_examples,
    top_features,
)
from hf_sae.sites import capture_activations, resolve_site
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_sae

BOS = 2
TEXTS = [[BOS, 17, 230, 41, 999, 5, 64], [BOS, 300, 301], [BOS, 8, 9, 10, 11, 12]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def model(request, tiny_lm):
    return tiny_lm(request.param)


def _perfect_sae(layer=1):
    """Encoder and decoder [I; -I], k = d_in: TopK keeps every non-zero of relu(x), relu(-x); decode(encode(x)) = x."""
    sae = tiny_sae(layer, d_sae=128, k=64)
    eye = torch.eye(64)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


def _naive_loss(model, sae, texts, replace=None):
    """Mean CE over t with ids[t] != BOS, one text at a time, with ``replace(h)`` at the SAE site (BOS kept)."""
    site = resolve_site(model, sae.config.hook_layer, sae.config.hook_site)
    total, count = 0.0, 0
    for ids in texts:
        ids = torch.tensor([ids])
        handle = None
        if replace is not None:
            not_bos = (ids != BOS)[..., None]
            handle = site.register(lambda h: torch.where(not_bos, replace(h), h))  # noqa: B023
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
        if handle is not None:
            handle.remove()
        for t in range(ids.shape[1] - 1):
            if ids[0, t] != BOS:
                total -= float(log_probs[t, ids[0, t + 1]])
                count += 1
    return total / count, count


def test_ce_loss_recovered_by_hand():
    assert ce_loss_recovered(2.0, 2.5, 7.0) == pytest.approx(0.9)  # 1 - 0.5 / 5
    assert ce_loss_recovered(2.0, 2.0, 7.0) == 1.0
    assert ce_loss_recovered(2.0, 7.0, 7.0) == 0.0
    assert ce_loss_recovered(2.0, 9.0, 7.0) == pytest.approx(-0.4)
    assert math.isnan(ce_loss_recovered(2.0, 2.0, 2.0))


def test_losses_match_a_naive_loop_excluding_bos_and_padding(model):
    sae = tiny_sae(k=16)
    result = lm_loss_with_sae(model, sae, TEXTS, batch_size=2)  # batches mix lengths, so padding is exercised
    clean, count = _naive_loss(model, sae, TEXTS)
    spliced, _ = _naive_loss(model, sae, TEXTS, lambda h: sae.decode(sae.encode(h)))
    ablated, _ = _naive_loss(model, sae, TEXTS, torch.zeros_like)
    assert result.n_tokens == count == 6 + 2 + 5 - 3
    assert result.clean_loss == pytest.approx(clean, rel=1e-5)
    assert result.spliced_loss == pytest.approx(spliced, rel=1e-5)
    assert result.ablated_loss == pytest.approx(ablated, rel=1e-5)
    assert result.ce_loss_recovered == pytest.approx(1 - (spliced - clean) / (ablated - clean), rel=1e-4)
    assert result.delta_loss == pytest.approx(spliced - clean, rel=1e-4, abs=1e-6)


def _site_mean(model, sae, texts):
    """Mean activation at the SAE's site over every non-BOS token of ``texts`` (one text at a time)."""
    site = resolve_site(model, sae.config.hook_layer, sae.config.hook_site)
    rows = [capture_activations(model, [site], input_ids=torch.tensor([ids]))[site.key][0][1:] for ids in texts]
    return torch.cat(rows).double().mean(0)


def test_mean_ablation_puts_the_texts_mean_activation_in_place(model):
    sae = tiny_sae(k=16)
    result = lm_loss_with_sae(model, sae, TEXTS, batch_size=2)
    mean = _site_mean(model, sae, TEXTS).float()
    clean, _ = _naive_loss(model, sae, TEXTS)
    spliced, _ = _naive_loss(model, sae, TEXTS, lambda h: sae.decode(sae.encode(h)))
    mean_ablated, _ = _naive_loss(model, sae, TEXTS, lambda h: mean.expand_as(h))
    assert result.mean_ablated_loss == pytest.approx(mean_ablated, rel=1e-5)
    assert result.ce_loss_recovered_mean == pytest.approx(1 - (spliced - clean) / (mean_ablated - clean), rel=1e-4)
    given = lm_loss_with_sae(model, sae, TEXTS, batch_size=3, mean_activation=torch.zeros(64))
    assert given.mean_ablated_loss == pytest.approx(result.ablated_loss, rel=1e-5)  # the zero vector: zero ablation
    assert set(result.as_dict()) >= {"mean_ablated_loss", "ce_loss_recovered_mean"}


def test_perfect_sae_splice_leaves_the_loss_unchanged(model):
    result = lm_loss_with_sae(model, _perfect_sae(), TEXTS)
    assert result.spliced_loss == pytest.approx(result.clean_loss, abs=1e-5)
    assert result.ablated_loss != pytest.approx(result.clean_loss, abs=1e-3)
    assert result.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)


def test_inputs_as_a_padded_batch_or_strings_give_the_same_result():
    model, sae = tiny_gemma2(), tiny_sae()
    reference = lm_loss_with_sae(model, sae, TEXTS)
    input_ids = torch.zeros(3, 7, dtype=torch.long)
    attention_mask = torch.zeros(3, 7, dtype=torch.long)
    for row, ids in enumerate(TEXTS):  # left-padded this time
        input_ids[row, 7 - len(ids) :] = torch.tensor(ids)
        attention_mask[row, 7 - len(ids) :] = 1
    batch = lm_loss_with_sae(model, sae, {"input_ids": input_ids, "attention_mask": attention_mask})
    assert batch.as_dict() == pytest.approx(reference.as_dict(), rel=1e-5)
    strings = lm_loss_with_sae(
        model, sae, ["a", "b", "c"], tokenizer=_TableTokenizer(dict(zip("abc", TEXTS, strict=True)))
    )
    assert strings.as_dict() == pytest.approx(reference.as_dict(), rel=1e-5)


class _TableTokenizer:
    """A stand-in tokenizer with the two methods hf_sae uses: __call__ (-> input_ids) and convert_ids_to_tokens."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text):
        return {"input_ids": list(self.table[text])}

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


@torch.no_grad()
def _dense_latents(model, sae, ids):
    h = capture_activations(model, [resolve_site(model, 1, "resid")], input_ids=torch.tensor([ids]))[(1, "resid")]
    return sae.encode(h).to_dense(sae.config.d_sae)[0]  # (T, d_sae)


def test_top_features_ranks_by_peak_activation_without_bos(model):
    sae = tiny_sae()
    ids = TEXTS[0]
    dense = _dense_latents(model, sae, ids)
    found = top_features(model, sae, ids, n=5)
    expected = dense[1:].amax(0).topk(5)
    assert found.feature_ids.tolist() == expected.indices.tolist()
    torch.testing.assert_close(found.max_activations, expected.values)
    counted = dense[:, expected.indices].T.clone()
    counted[:, 0] = 0  # BOS is neither ranked nor shown
    torch.testing.assert_close(found.activations, counted)
    assert found.activations.shape == (5, len(ids)) and found.tokens == [str(i) for i in ids]
    by_sum = top_features(model, sae, torch.tensor(ids), n=3, by="sum")
    assert by_sum.feature_ids.tolist() == dense[1:].sum(0).topk(3).indices.tolist()
    named = top_features(model, sae, "a", tokenizer=_TableTokenizer({"a": ids}), n=2)
    assert named.tokens[:2] == ["<2>", "<17>"] and "feature" in str(named)
    assert "<2>" not in str(named)  # the BOS token is never printed as a top token


def test_top_features_never_names_bos_even_where_a_feature_peaks_at_bos(model):
    sae = tiny_sae()
    ids = TEXTS[0]
    dense = _dense_latents(model, sae, ids)
    at_bos = int(dense[0].argmax())  # the feature strongest at BOS
    found = top_features(model, sae, ids, n=sae.config.d_sae, tokenizer=_TableTokenizer({}))
    row = found.feature_ids.tolist().index(at_bos)
    assert float(found.activations[row, 0]) == 0.0
    assert "'<2>'" not in str(found)


def test_max_activating_examples_are_each_texts_peak_strongest_first(model):
    sae = tiny_sae()
    feature = int(top_features(model, sae, TEXTS[0], n=1).feature_ids[0])
    examples = max_activating_examples(model, sae, feature, TEXTS, context=2, batch_size=2)
    peaks = {}
    for index, ids in enumerate(TEXTS):
        column = _dense_latents(model, sae, ids)[:, feature]
        column[0] = 0  # BOS is not counted
        if column.max() > 0:
            peaks[index] = (float(column.max()), int(column.argmax()))
    assert [e.text_index for e in examples] == sorted(peaks, key=lambda i: -peaks[i][0])
    for example in examples:
        activation, position = peaks[example.text_index]
        assert example.activation == pytest.approx(activation, rel=1e-5) and example.position == position
        ids = TEXTS[example.text_index]
        lo = max(0, position - 2)
        assert example.tokens == [str(i) for i in ids[lo : position + 3]]
        assert example.activations[example.peak] == pytest.approx(activation, rel=1e-5)
    assert len(max_activating_examples(model, sae, feature, TEXTS, n=1)) == 1


def test_errors_name_the_value_and_the_fix():
    model, sae = tiny_gemma2(), tiny_sae()
    with pytest.raises(EvaluationError, match=r"feature 256 is out of range.*0\.\.255"):
        max_activating_examples(model, sae, 256, TEXTS)
    with pytest.raises(EvaluationError, match="no tokenizer"):
        lm_loss_with_sae(model, sae, ["some text"])
    with pytest.raises(EvaluationError, match="empty"):
        lm_loss_with_sae(model, sae, [])
    with pytest.raises(EvaluationError, match="by='mean'"):
        top_features(model, sae, TEXTS[0], by="mean")


@pytest.mark.slow
def test_real_small_gemma_splice_recovers_most_of_the_loss(tmp_path):
    """The real Gemma 3 270M with an untrained SAE: the numbers are finite and ordered clean < spliced-ish < ablated."""
    embedded = pytest.importorskip("training.small_gemma")
    if not hasattr(embedded, "load_small_gemma"):
        pytest.skip("training.small_gemma.load_small_gemma is not available")
    model, tokenizer = embedded.load_small_gemma(cache_dir=os.environ.get("HF_SAE_CACHE"))
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=model.config.hidden_size, d_sae=1024, k=32, hook_layer=5))
    texts = ["The cat sat on the mat and looked out of the window.", "def add(a, b):\n    return a + b\n"]
    result = lm_loss_with_sae(model, sae, texts, tokenizer=tokenizer)
    assert 0 < result.clean_loss < result.ablated_loss and math.isfinite(result.spliced_loss)
    found = top_features(model, sae, texts[0], tokenizer=tokenizer, n=5)
    assert len(found.tokens) == found.activations.shape[1]


def test_a_given_clean_loss_skips_the_clean_forwards_and_changes_nothing_else(model):
    sae = tiny_sae(k=16)
    reference = lm_loss_with_sae(model, sae, TEXTS, batch_size=2)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    reused = lm_loss_with_sae(model, sae, TEXTS, batch_size=2, clean_loss=reference.clean_loss, progress=True)
    handle.remove()
    assert len(calls) == 2 * 3  # 2 batches x (spliced, zero-, mean-ablated): no clean forward (the mean's stop early)
    assert reused.as_dict() == pytest.approx(reference.as_dict(), rel=1e-6)

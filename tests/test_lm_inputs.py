"""hf_sae.lm_inputs: texts to token lists, padded batches, the tokens that count and the summed next-token loss."""

import pytest
import torch
import torch.nn.functional as F

from hf_sae.errors import EvaluationError
from hf_sae.lm_inputs import (
    batches,
    counted_predictions,
    eval_mode,
    excluded_token_ids,
    kept_tokens,
    next_token_loss_sum,
    token_strings,
    tokenize_texts,
)
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_sae


class _Tokenizer:
    def __call__(self, text):
        return {"input_ids": [2] + [ord(c) for c in text]}

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


def test_every_kind_of_texts_gives_the_same_token_lists():
    lists = [[2, 5, 6, 7], [2, 8]]
    padded = {
        "input_ids": torch.tensor([[2, 5, 6, 7], [0, 0, 2, 8]]),
        "attention_mask": torch.tensor([[1] * 4, [0, 0, 1, 1]]),
    }
    model = tiny_gemma2()
    assert tokenize_texts(model, lists) == (lists, None)
    assert tokenize_texts(model, padded)[0] == lists
    assert tokenize_texts(model, torch.tensor([2, 5, 6, 7]))[0] == [[2, 5, 6, 7]]
    assert tokenize_texts(model, lists, max_length=2)[0] == [[2, 5], [2, 8]]
    tokenizer = _Tokenizer()
    assert tokenize_texts(model, ["ab", "c"], tokenizer) == ([[2, 97, 98], [2, 99]], tokenizer)
    assert tokenize_texts(model, "ab", tokenizer)[0] == [[2, 97, 98]]
    with pytest.raises(EvaluationError, match="no tokenizer"):
        tokenize_texts(model, ["ab"])
    with pytest.raises(EvaluationError, match="no tokens"):
        tokenize_texts(model, [[], []])
    assert token_strings(tokenizer, [3, 4]) == ["<3>", "<4>"] and token_strings(None, [3, 4]) == ["3", "4"]


def test_batches_are_right_padded_and_numbered_by_their_first_text():
    out = list(batches([[1, 2, 3], [4], [5, 6]], 2, torch.device("cpu")))
    assert [first for first, _, _ in out] == [0, 2]
    assert out[0][1].tolist() == [[1, 2, 3], [4, 0, 0]] and out[0][2].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out[1][1].tolist() == [[5, 6]] and out[1][2].tolist() == [[1, 1]]


def test_bos_padding_and_excluded_ids_do_not_count():
    model = tiny_gemma2()
    configs = [tiny_sae(excluded_token_ids=[7]).config, tiny_sae(excluded_token_ids=[9]).config]
    assert excluded_token_ids(model, configs) == [2, 7, 9]  # BOS 2 and each SAE's ids
    assert excluded_token_ids(model, configs, exclude_token_ids=[5, 5]) == [5]
    input_ids = torch.tensor([[2, 7, 4, 5], [2, 3, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    kept = kept_tokens(input_ids, attention_mask, [2, 7])
    assert kept.tolist() == [[False, False, True, True], [False, True, False, False]]
    # predictions at t count when t is kept and t + 1 is real: (0, 2) predicts 5; (1, 1) would predict padding
    assert counted_predictions(kept, attention_mask).tolist() == [[False, False, True], [False, False, False]]


def test_next_token_loss_sum_is_the_sum_over_counted_positions():
    logits = torch.randn(2, 4, 11)
    input_ids = torch.randint(0, 11, (2, 4))
    counted = torch.tensor([[True, False, True], [False, True, True]])
    expected = sum(
        F.cross_entropy(logits[b, t], input_ids[b, t + 1], reduction="sum")
        for b in range(2)
        for t in range(3)
        if counted[b, t]
    )
    torch.testing.assert_close(next_token_loss_sum(logits, input_ids, counted), expected)


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_also_when_the_block_raises(training):
    model = tiny_gemma2().train(training)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not model.training
            raise RuntimeError
    assert model.training == training

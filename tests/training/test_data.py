"""training.data: the files and streams a `--dataset` name stands for."""

import json

from training.config import EMBEDDED, EMBEDDED_EXTENDED
from training.data import _load, data_files


def _write_built_corpus(folder, name):
    """A corpus folder as training.corpus leaves it: both splits, and manifest.json (the build finished)."""
    folder.mkdir(parents=True)
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": f"{name} {split} document"}) + "\n")
    (folder / "manifest.json").write_text("{}")


def test_embedded_extended_reads_its_own_corpus_folder_and_embedded_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SAE_CACHE", str(tmp_path))
    _write_built_corpus(tmp_path / "corpus", "default")
    _write_built_corpus(tmp_path / "corpus-extended", "extended")
    for dataset, folder in ((EMBEDDED, "corpus"), (EMBEDDED_EXTENDED, "corpus-extended")):
        assert data_files(dataset) == [tmp_path / folder / "train.jsonl", tmp_path / folder / "validation.jsonl"]
    assert [record["text"] for record in _load(EMBEDDED_EXTENDED, "validation", None)] == [
        "extended validation document"
    ]
    assert [record["text"] for record in _load(EMBEDDED, "train", None)] == ["default train document"]

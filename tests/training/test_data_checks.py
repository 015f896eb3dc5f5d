"""Data problems a run used to miss or report badly (training/data.py): a shard read many times over, a folder of
mixed formats, data changed between a kill and its resume, excluded ids outside the vocabulary, rows that are not
text, malformed or empty files. Each is refused or reported in one line that names the file and the fix."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
from datasets import IterableDataset

import hf_sae  # noqa: F401  (registers the SAE classes with AutoModel)
from hf_sae.errors import DataError, ResumeError, TrainConfigError
from training import train as train_module
from training.cli import parse_args
from training.config import make_config
from training.data import TokenWindows, dataset_factories


def run(args: list[str]):
    cfg, explicit = parse_args(args)
    return train_module.train(cfg, explicit)


def cli_error(args: list[str], capsys) -> str:
    """The one line ``python -m training.train ARGS`` prints for bad input (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-sae: error: "), err
    return err[-1]


def stopped_run(args: list[str], monkeypatch, at: int = 15):
    """Run ``args`` in this process and stop it with SIGTERM after step ``at`` (a checkpoint is saved then)."""
    step, count = train_module.training_step, [0]

    def signalled_step(*a, **kw):
        out = step(*a, **kw)
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_module, "training_step", signalled_step)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
        run(args)
    monkeypatch.setattr(train_module, "training_step", step)


def test_a_small_shard_read_many_times_warns_naming_the_rank_and_the_epochs(load_saved_lm, saved_lm, tmp_path, caplog):
    docs = tmp_path / "few.jsonl"
    docs.write_text("".join(saved_lm[1].read_text().splitlines(keepends=True)[:4]))
    cfg = make_config({"dataset": str(docs), "eval_holdout_documents": 0, "eval_split": None, "eval_tokens": 0})
    cfg.eval_lm_windows = 0
    train, _ = dataset_factories(cfg, rank=1, world_size=2)
    _, tokenizer = load_saved_lm()
    windows = TokenWindows(train, tokenizer, 32, name=str(docs), rank=1, tokens_needed=10_000_000)
    with caplog.at_level(logging.WARNING, logger="training"):
        for _ in range(200):
            windows.next_window()
    assert "rank 1" in caplog.text and "epochs" in caplog.text and "few.jsonl" in caplog.text


def test_a_folder_of_mixed_formats_is_refused(tiny_args, tmp_path, saved_lm, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(saved_lm[1].read_text())
    (folder / "b.txt").write_text("a line of plain text\n" * 50)
    line = cli_error(tiny_args(tmp_path / "x", dataset=folder), capsys)
    assert "several formats" in line and "a.jsonl" in line and "b.txt" in line


def test_changed_data_is_refused_on_resume_and_a_touched_file_is_announced(
    tiny_args, saved_lm, tmp_path, monkeypatch, caplog
):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(saved_lm[1].read_text())
    out = tmp_path / "run"
    stopped_run(tiny_args(out, dataset=docs), monkeypatch)
    os.utime(docs, ns=(1, 1))  # the same bytes, another time (a copy): announced, not refused
    with caplog.at_level(logging.WARNING):
        stopped_run(["--resume", str(out)], monkeypatch, at=5)
    assert "docs.jsonl" in caplog.text and "modified" in caplog.text
    with docs.open("a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(ResumeError, match=r"training data changed since the checkpoint: docs.jsonl: \d+ -> \d+ bytes"):
        run(["--resume", str(out)])
    with caplog.at_level(logging.WARNING):
        run(["--resume", str(out), "--accept-changed-data"])  # the user's call
    assert "continuing on changed training data" in caplog.text and (out / "model.safetensors").is_file()


def test_excluded_token_ids_outside_the_vocabulary_are_refused(tiny_args, tmp_path):
    with pytest.raises(TrainConfigError, match=r"--excluded-token-ids 5000.*vocabulary of 1000 tokens \(ids 0..999\)"):
        run(tiny_args(tmp_path / "x", excluded_token_ids=5000))
    assert not (tmp_path / "x").exists()


def test_rows_that_are_not_text_are_counted_and_reported(load_saved_lm, caplog):
    _, tokenizer = load_saved_lm()
    rows = [{"text": "the first document"}, {"text": 17}, {"text": None}, {"text": "the last one"}]
    source = lambda: IterableDataset.from_generator(lambda: iter(rows))  # noqa: E731
    windows = TokenWindows(source, tokenizer, 32, loop=False, name="rows")
    with caplog.at_level(logging.WARNING, logger="training"):
        while windows.next_window() is not None:
            pass
    assert windows.non_text_rows == 2
    assert "rows: row 2 of column 'text' is int, not text" in caplog.text
    assert "2 of 4 rows" in caplog.text


def test_a_malformed_jsonl_names_the_file_and_the_line(tiny_args, saved_lm, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = saved_lm[1].read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:7]) + '{"text": "cut off\n' + "".join(lines[7:]))
    line = cli_error(tiny_args(tmp_path / "x", dataset=bad), capsys)
    assert "bad.jsonl line 8" in line and "not valid JSON" in line, line
    assert not (tmp_path / "x").exists()


def test_an_empty_jsonl_says_the_file_is_empty(tiny_args, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = cli_error(tiny_args(tmp_path / "x", dataset=empty), capsys)
    assert "empty.jsonl is empty (0 bytes)" in line and "Hub id" not in line, line


def test_no_held_out_split_and_no_held_out_documents_is_refused_before_training(tiny_args, tmp_path):
    with pytest.raises(DataError, match="has no held-out split 'validation' and --eval-holdout-documents is 0"):
        run(tiny_args(tmp_path / "x", eval_holdout_documents=0))
    assert not (tmp_path / "x").exists()

"""Text for SAE training: load a data set (local files or a Hub id, streamed), tokenise it, pack it into windows.

Packing: documents are tokenised without special tokens, each followed by EOS, concatenated, and cut into windows of
``context_length`` tokens that each start with BOS: ``[BOS] t_1 ... t_{T-1}``. So BOS is only ever at position 0 (a
BOS id inside the text is dropped), no window is padded except possibly the very last one of a finite stream
(evaluation), and a document may continue into the next window. Activations at BOS and padding positions are then
excluded from training (see ``training/harvest.py``).

:class:`TokenWindows` is resumable: its ``state()`` (the data set's own ``state_dict()`` plus the tokens not yet
emitted) restores the exact next window, and training streams loop over the data (epochs) so every process can
always produce another batch, whatever the data set's size or the number of processes.

Problems are said, not passed over: an empty file, a folder of several formats (a folder is read as one), a
malformed row (by file and line), rows that are not text (counted), a shard read many times over (by rank and
epochs), token ids outside the vocabulary, and local files changed between a checkpoint and its resume
(:func:`data_file_state` goes into every checkpoint).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow
import torch
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from torch import Tensor

from hf_sae.errors import DataChangedError, DataError, MissingSplitError, TrainConfigError

from .config import EMBEDDED_CORPORA, TrainConfig
from .corpus import corpus_paths

logger = logging.getLogger(__name__)

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".gz": None,
}


# ---------------------------------------------------------------------------------------------------- files
def _builder_of(path: Path) -> str | None:
    """The ``datasets`` builder of a data file by its suffixes (``a.jsonl.gz`` is json), None if not a data file."""
    suffixes = [s for s in path.suffixes if s in _BUILDERS]
    return _BUILDERS.get(suffixes[0]) if suffixes else None


def data_files(dataset: str) -> list[Path]:
    """The local files behind ``--dataset``: the file, a folder's data files (hidden ones aside, as ``datasets``
    does), the embedded corpus's (or its extended variant's); [] for a Hub data set."""
    if dataset in EMBEDDED_CORPORA:
        return sorted(corpus_paths(variant=EMBEDDED_CORPORA[dataset]).values())
    path = Path(dataset).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    found = [p for p in path.rglob("*") if p.is_file() and _builder_of(p)]
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts))


def _check_local(dataset: str, path: Path) -> None:
    """Refuse an empty file, a folder without data files or with files of several formats (only one is read)."""
    files = data_files(dataset)
    if path.is_dir():
        if not files:
            raise DataError(
                f"--dataset {dataset}: the folder holds no data files. Put .jsonl/.json, .txt, .csv or .parquet "
                "files in it."
            )
        formats: dict[str, list[str]] = {}
        for file in files:
            formats.setdefault(_builder_of(file), []).append(file.relative_to(path).as_posix())
        if len(formats) > 1:
            listed = "; ".join(f"{builder}: {', '.join(names[:3])}" for builder, names in sorted(formats.items()))
            raise DataError(
                f"--dataset {dataset} holds files of several formats ({listed}); a folder is read as one format, so "
                "the others would be skipped. Put each format in a folder of its own, or convert them to one format."
            )
    if all(file.stat().st_size == 0 for file in files):
        what = "is empty" if path.is_file() else "holds only empty files"
        raise DataError(
            f"--dataset {dataset} {what} (0 bytes), so there are no documents. Pass a file with documents, e.g. "
            'one {"text": "..."} object per line of a .jsonl file.'
        )


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first line of a JSON Lines file that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return number, error.msg
            if not isinstance(value, dict):
                return number, f"a JSON {type(value).__name__}, not an object"
    return None


def unreadable_data_message(name: str, files: Sequence[Path], error: Exception) -> str:
    """What a reader's exception (pyarrow's ArrowInvalid, ...) means: the file and line when it can be found."""
    for file in files:
        if file.suffix == ".jsonl" and (bad := _first_bad_json_line(file)) is not None:
            number, problem = bad
            return (
                f"{file} line {number}: not valid JSON ({problem}). Fix or delete that line: each line of a .jsonl "
                'file is one JSON object, e.g. {"text": "..."}.'
            )
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = str(files[0]) if len(files) == 1 else f"{name} ({len(files)} files)" if files else name
    return f"{where}: cannot read it ({type(error).__name__}: {text}). Check that the file(s) are valid {name!r} data."


def data_file_state(dataset: str) -> list[dict[str, Any]]:
    """Name, size and modification time of each local training file (what a checkpoint records of its data)."""
    files = data_files(dataset)
    root = Path(dataset).expanduser() if Path(dataset).expanduser().is_dir() else None
    return [
        {
            "file": f.relative_to(root).as_posix() if root else f.name,
            "bytes": f.stat().st_size,
            "mtime_ns": f.stat().st_mtime_ns,
        }
        for f in files
    ]


def check_data_unchanged(saved: list[dict[str, Any]] | None, cfg: TrainConfig) -> list[dict[str, Any]]:
    """On ``--resume``: refuse local training files that were added, removed or resized since the checkpoint (unless
    ``--accept-changed-data``); announce a file with only another modification time (a copy). Returns the files as
    they are now."""
    current = data_file_state(cfg.dataset)
    if saved is None:  # a checkpoint of an hf-sae that did not record its files
        return current
    old, new = {e["file"]: e for e in saved}, {e["file"]: e for e in current}
    changes = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            changes.append(f"{name}: gone")
        elif name not in old:
            changes.append(f"{name}: new")
        elif old[name]["bytes"] != new[name]["bytes"]:
            changes.append(f"{name}: {old[name]['bytes']} -> {new[name]['bytes']} bytes")
    if changes and not cfg.accept_changed_data:
        raise DataChangedError(
            f"--resume {cfg.resume}: the training data changed since the checkpoint: {'; '.join(changes)}. The "
            "checkpoint's position in the data may point elsewhere now. Restore the files, start a new run on the new "
            "data, or pass --accept-changed-data to continue anyway."
        )
    if changes:
        logger.warning("--resume %s: continuing on changed training data (%s)", cfg.resume, "; ".join(changes))
    touched = sorted(name for name in old.keys() & new.keys() if old[name]["mtime_ns"] != new[name]["mtime_ns"])
    if touched:
        logger.warning(
            "--resume %s: %s modified since the checkpoint but of the same size: taken to be the same data (a copy)",
            cfg.resume,
            ", ".join(touched),
        )
    return current


# ---------------------------------------------------------------------------------------------------- loading
def _load(dataset: str, split: str, dataset_config: str | None):
    """A streaming ``datasets.IterableDataset`` for one split of a local file / folder / Hub id / 'embedded' /
    'embedded-extended'."""
    if dataset in EMBEDDED_CORPORA:
        paths = corpus_paths(variant=EMBEDDED_CORPORA[dataset])
        if split not in paths:
            raise MissingSplitError(split)
        return load_dataset("json", data_files={split: str(paths[split])}, split=split, streaming=True)
    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            builder = _builder_of(path)
            if builder is None:
                raise DataError(
                    f"--dataset {dataset}: cannot tell the format of this file. Use a .jsonl/.json, .txt, .csv or "
                    ".parquet file, or a folder of them."
                )
            if split != "train":  # a single file is one split
                raise MissingSplitError(split)
            return load_dataset(builder, data_files={"train": str(path)}, split="train", streaming=True)
        if path.is_dir():
            return load_dataset(str(path), dataset_config, split=split, streaming=True)
        if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
            raise DataError(
                f"--dataset {dataset}: no such file or folder. Pass an existing local file/folder, a Hub data set "
                "id such as HuggingFaceFW/fineweb, or 'embedded' / 'embedded-extended'."
            )
        return load_dataset(dataset, dataset_config, split=split, streaming=True)
    except (DataError, MissingSplitError):
        raise
    except (ValueError, pyarrow.ArrowException) as error:
        text = str(error).lower()
        if "split" in text and any(word in text for word in ("unknown", "bad split", "not found", "should be one of")):
            raise MissingSplitError(split) from None
        if path.exists():  # a local file its reader cannot parse (pyarrow reads the first rows to infer columns)
            raise DataError(unreadable_data_message(dataset, data_files(dataset), error)) from None
        raise DataError(f"--dataset {dataset} (split {split!r}): {error}") from None
    except Exception as error:  # datasets raises several types for "not found" / offline; name them all the same
        kind = type(error).__name__
        raise DataError(
            f"--dataset {dataset}: cannot load it ({kind}: {str(error).strip().splitlines()[0] if str(error) else ''})."
            " Check the Hub id and --dataset-config (and network access, or HF_DATASETS_OFFLINE), or pass a local "
            ".jsonl/.txt/.parquet file, or 'embedded' / 'embedded-extended'."
        ) from None


def _check_text_column(ds, dataset: str, text_column: str) -> None:
    features = getattr(ds, "features", None)
    if features is not None and text_column not in features:
        raise DataError(
            f"--dataset {dataset} has no column {text_column!r}; its columns are {list(features)}. "
            f"Pass --text-column with one of them."
        )


def dataset_factories(cfg: TrainConfig, rank: int, world_size: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(train_factory, eval_factory): each call returns a fresh streaming IterableDataset.

    The training stream is this process's shard (``split_dataset_by_node``); the evaluation stream is the full
    held-out split (evaluation runs on the main process). Without ``cfg.eval_split`` in the data set, the first
    ``cfg.eval_holdout_documents`` documents of the training split are held out of training.
    """

    def load_split(split: str):
        try:
            ds = _load(cfg.dataset, split, cfg.dataset_config)
        except MissingSplitError:
            return None
        _check_text_column(ds, cfg.dataset, cfg.text_column)
        return ds

    local = Path(cfg.dataset).expanduser()
    if cfg.dataset not in EMBEDDED_CORPORA and local.exists():
        _check_local(cfg.dataset, local)
    train = load_split(cfg.split)
    if train is None:
        raise DataError(f"--dataset {cfg.dataset} has no split {cfg.split!r}. Pass --split with an existing split.")
    holdout = 0
    eval_split = cfg.eval_split
    if eval_split is not None and eval_split != cfg.split and load_split(eval_split) is None:
        eval_split = None
    if eval_split is None or eval_split == cfg.split:
        holdout = cfg.eval_holdout_documents
        if holdout == 0 and (cfg.eval_tokens or cfg.eval_lm_windows):
            raise DataError(
                f"--dataset {cfg.dataset} has no held-out split {cfg.eval_split!r} and --eval-holdout-documents is 0: "
                "the final evaluation would read training documents (or nothing). Pass --eval-holdout-documents N, "
                "an existing --eval-split, or --eval-tokens 0 --eval-lm-windows 0 to skip the evaluation."
            )
        logger.info(
            "no held-out split %r: holding out the first %d documents of %r", cfg.eval_split, holdout, cfg.split
        )

    def train_factory():
        ds = load_split(cfg.split)
        if holdout:
            ds = ds.skip(holdout)
        return split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds

    def eval_factory():
        if holdout:
            return load_split(cfg.split).take(holdout)
        return load_split(eval_split)

    return train_factory, eval_factory


# ---------------------------------------------------------------------------------------------------- packing
class TokenWindows:
    """Packed, BOS-led token windows from a streaming data set, resumable by :meth:`state` / :meth:`load_state`.

    Args:
        make_dataset: returns a fresh IterableDataset (called once per epoch, and after :meth:`load_state`).
        tokenizer: the language model's tokenizer.
        context_length: T, tokens per window (BOS included).
        text_column: column holding the text.
        loop: restart the data set when it ends (training); a finite stream (evaluation) pads its last window.
        documents_per_group: documents tokenised per tokenizer call.
        name: the data set's name for messages.
        files: the local files behind the stream (:func:`data_files`), to name a malformed one.
        rank, tokens_needed: this process's index and how many activations training draws from it, to warn when a
            small shard would be read many times over.
    """

    def __init__(
        self,
        make_dataset: Callable[[], Any],
        tokenizer,
        context_length: int,
        text_column: str = "text",
        loop: bool = True,
        documents_per_group: int = 64,
        name: str = "dataset",
        files: Sequence[Path] = (),
        rank: int = 0,
        tokens_needed: int | None = None,
    ):
        self.make_dataset = make_dataset
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.text_column = text_column
        self.loop = loop
        self.documents_per_group = documents_per_group
        self.name = name
        self.files = list(files)
        self.rank, self.tokens_needed = rank, tokens_needed
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.body = context_length - (1 if self.bos_id is not None else 0)  # text tokens per window
        # Resumable state: where the data set stands, the tokens read but not yet emitted, epochs and counts.
        self._dataset = None
        self._dataset_state: dict | None = None
        self._pending: list[int] = []  # token ids read but not yet emitted start at self._offset
        self._offset = 0
        self.epoch = 0
        self.documents = 0
        self.windows = 0
        self.non_text_rows = 0  # rows whose text column held no string (skipped), in total
        self._iterator: Iterator[dict] | None = None
        self._finished = False
        self._fresh_pass = True  # the current pass over the data set started at its beginning
        self._texts_this_pass = self._rows_this_pass = self._non_text_this_pass = self._tokens_this_pass = 0

    # ------------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Everything needed to produce the same next window again (small: a dict and < T + a group of ids)."""
        return {
            "dataset": self._dataset_state,
            "pending": self._pending[self._offset :],
            "epoch": self.epoch,
            "documents": self.documents,
            "windows": self.windows,
            "non_text_rows": self.non_text_rows,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._dataset = self.make_dataset()
        if state["dataset"] is not None:
            self._dataset.load_state_dict(state["dataset"])
        self._dataset_state = state["dataset"]
        self._pending, self._offset = list(state["pending"]), 0
        self.epoch = state["epoch"]
        self.documents = state["documents"]
        self.windows = state["windows"]
        self.non_text_rows = state.get("non_text_rows", 0)
        self._iterator = None
        self._finished = False
        self._fresh_pass = state["dataset"] is None
        self._texts_this_pass = self._rows_this_pass = self._non_text_this_pass = self._tokens_this_pass = 0

    # ---------------------------------------------------------------------------------------------- reading
    def _read_group(self) -> list[str] | None:
        """The next documents' texts (None when a finite stream ended); restarts the data set when looping."""
        texts: list[str] = []
        while len(texts) < self.documents_per_group:
            if self._iterator is None:
                if self._dataset is None:
                    self._dataset = self.make_dataset()
                    self._fresh_pass = True
                    self._texts_this_pass = self._rows_this_pass = self._non_text_this_pass = 0
                    self._tokens_this_pass = 0
                self._iterator = iter(self._dataset)
            try:
                example = next(self._iterator)
            except StopIteration:
                if self._fresh_pass and self._texts_this_pass == 0:
                    raise DataError(
                        f"{self.name}: the data set (this process's shard) yields no text in column "
                        f"{self.text_column!r}. Check --dataset, --split and --text-column, and that the data has "
                        "at least as many documents as there are processes."
                    ) from None
                self._end_of_pass(texts)
                self._iterator, self._dataset, self._dataset_state = None, None, None
                if not self.loop:
                    self._finished = True
                    return texts or None
                self.epoch += 1
                logger.info("%s: starting epoch %d (the data repeats)", self.name, self.epoch)
                if texts:
                    return texts
                continue
            except (pyarrow.ArrowException, ValueError) as error:  # a row the reader cannot parse
                raise DataError(unreadable_data_message(self.name, self.files, error)) from None
            if self.text_column not in example:
                raise DataError(
                    f"{self.name} has no column {self.text_column!r}; its columns are {sorted(example)}. "
                    "Pass --text-column with one of them."
                )
            text = example[self.text_column]
            self.documents += 1
            self._rows_this_pass += 1
            if not isinstance(text, str):
                self.non_text_rows += 1
                self._non_text_this_pass += 1
                if self.non_text_rows == 1:
                    logger.warning(
                        "%s: row %d of column %r is %s, not text: skipped (such rows are counted)",
                        self.name,
                        self._rows_this_pass,
                        self.text_column,
                        type(text).__name__,
                    )
            elif text.strip():
                texts.append(text)
                self._texts_this_pass += 1
        self._dataset_state = self._dataset.state_dict()
        return texts

    def _end_of_pass(self, texts: list[str]) -> None:
        """Report a pass's rows that were not text, and (after a whole first pass) a shard read many times over."""
        if self._non_text_this_pass:
            logger.warning(
                "%s: %d of %d rows of column %r were not text and were skipped",
                self.name,
                self._non_text_this_pass,
                self._rows_this_pass,
                self.text_column,
            )
        if self.epoch == 0 and self._fresh_pass and self.tokens_needed:
            last_group = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            pass_tokens = self._tokens_this_pass + sum(len(ids) + 1 for ids in last_group)  # + EOS each
            epochs = self.tokens_needed / max(pass_tokens, 1)
            if epochs >= 2:
                logger.warning(
                    "rank %d: %s (this process's shard: %d documents, about %s tokens) is read about %s times "
                    "(epochs) to give the %s activations training draws from it; an SAE then fits these documents, "
                    "not the text they stand for. Use more data, fewer --tokens or fewer processes.",
                    self.rank,
                    self.name,
                    self._texts_this_pass,
                    f"{pass_tokens:,}",
                    f"{epochs:,.0f}",
                    f"{self.tokens_needed:,}",
                )

    def _tokenize(self, texts: list[str]) -> None:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self._pending, self._offset = self._pending[self._offset :], 0
        dropped = {self.bos_id, self.pad_id} - {None}
        before = len(self._pending)
        for doc in ids:
            self._pending.extend(t for t in doc if t not in dropped)
            if self.eos_id is not None:
                self._pending.append(self.eos_id)
        self._tokens_this_pass += len(self._pending) - before

    def next_window(self) -> tuple[Tensor, Tensor] | None:
        """(input_ids (T,), attention_mask (T,)) of the next window, or None at the end of a finite stream."""
        while len(self._pending) - self._offset < self.body and not self._finished:
            texts = self._read_group()
            if texts:
                self._tokenize(texts)
        if len(self._pending) == self._offset:
            return None
        body = self._pending[self._offset : self._offset + self.body]
        self._offset += len(body)
        ids = ([self.bos_id] if self.bos_id is not None else []) + body
        mask = [1] * len(ids) + [0] * (self.context_length - len(ids))
        ids = ids + [self.pad_id] * (self.context_length - len(ids))
        self.windows += 1
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def next_batch(self, batch_size: int) -> tuple[Tensor, Tensor] | None:
        """(input_ids (B, T), attention_mask (B, T)) with B <= batch_size, or None when a finite stream ended."""
        rows = []
        for _ in range(batch_size):
            window = self.next_window()
            if window is None:
                break
            rows.append(window)
        if not rows:
            return None
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def training_windows(
    cfg: TrainConfig, tokenizer, make_dataset: Callable[[], Any], rank: int, activations: int
) -> TokenWindows:
    """This process's looping stream of training windows; ``activations``: how many training draws from it."""
    return TokenWindows(
        make_dataset,
        tokenizer,
        cfg.context_length,
        cfg.text_column,
        loop=True,
        name=cfg.dataset,
        files=data_files(cfg.dataset),
        rank=rank,
        tokens_needed=activations,
    )


def excluded_token_ids(cfg: TrainConfig, tokenizer) -> list[int]:
    """The token ids whose activations are not trained on: ``cfg.excluded_token_ids`` or BOS + padding."""
    if cfg.excluded_token_ids is not None:
        vocab = len(tokenizer)
        outside = [t for t in cfg.excluded_token_ids if not 0 <= t < vocab]
        if outside:
            raise TrainConfigError(
                f"--excluded-token-ids {' '.join(map(str, outside))}: outside the vocabulary of {vocab} tokens (ids "
                f"0..{vocab - 1}) of {cfg.model}'s tokenizer. Pass ids in 0..{vocab - 1}, or leave it out to exclude "
                f"BOS ({tokenizer.bos_token_id}) and padding ({tokenizer.pad_token_id})."
            )
        return sorted(set(cfg.excluded_token_ids))
    return sorted({t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None})

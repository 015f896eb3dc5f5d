"""The activation cache: run the language model once, write its activations to disk, train any number of SAEs from
them, for any number of epochs, on any number of processes.

    python -m training.harvest --layer 6 8 --site resid --tokens 10M --out acts/gemma    # harvest
    python -m training.harvest --resume acts/gemma                                       # after a kill
    python -m training.train --activations acts/gemma --epochs 4                         # train from it
    datasets.load_from_disk("acts/gemma")                                                # a datasets.Dataset

(``hf-sae harvest ...`` runs the same harvest; until ``training.harvest`` forwards to :func:`main`, use
``python -m training.activation_cache``.) The whole format is described in ``docs/activation_cache.md``; in short:

Layout (the ``datasets.Dataset.save_to_disk`` layout, so ``datasets.load_from_disk(DIR)`` reads it)::

    DIR/data-00000-of-00012.arrow ...   the activations: Arrow IPC stream files, one row per kept token
    DIR/dataset_info.json, state.json   what datasets.load_from_disk reads (features, the list of files)
    DIR/windows/...                     the token windows (also a save_to_disk data set): ids, documents
    DIR/manifest.json                   hf-sae's record: model, revision, sites, widths, dtype, data, options,
                                        token count, every shard's rows and sha256 (written last)
    DIR/harvest_state.json              only while a harvest is unfinished: where to resume

Columns of a row: one per site, ``layer_<L>.<site>`` (a fixed-size list of ``width`` values: float16/float32 as
they are, bfloat16 as its uint16 bit pattern since Arrow has no bfloat16: ``torch.from_numpy(a).view(torch.bfloat16)``),
``window`` (global index of its window), ``position`` (in the window) and ``token`` (the token id there).

Harvest. The text is packed exactly as training packs it (:class:`training.data.TokenWindows`, the training split
with the held-out documents left out, one pass, no repeat) and each window goes through
:class:`training.harvest.ActivationHarvester` (the early-stopped forward; BOS, padding and ``--excluded-token-ids``
dropped). ``--tokens T`` plans ``ceil(T / (context_length - 1))`` windows (T activations when only BOS and padding are
excluded, up to one window more), ``--shard-tokens S`` puts ``ceil(S / (context_length - 1))`` windows in each shard,
and each shard's LM batches are its windows in groups of ``--lm-batch-size``. A shard is therefore a pure function of
(model, data, options, shard index): it starts where the previous one ended (the data position is saved after every
shard), its batches have the same composition in every session, and it is written to a temporary file that is fsync-ed
and renamed when complete (:mod:`hf_sae._io`). A SIGKILL at any moment loses at most the shard being written;
``--resume`` continues after the last finished one, and the finished folder is byte-identical to an uninterrupted
harvest's (CPU; deterministic algorithms; no times or paths of the session in any file). When the data ends before
``--tokens``, the harvest stops there and the shards are renamed ``-of-<the real count>``.

Training (:class:`CachedActivations`, the :class:`training.harvest.ActivationBuffer` interface: ``peek``,
``next_batch``, ``state``/``load_state``). The cache's rows are cut into chunks of :data:`CHUNK_ROWS` consecutive
rows (rows [256 i, 256 (i + 1)), across record batches and shards). Epoch ``e``: a permutation of all chunks, seeded
by (seed, e) and the same on every process; process ``r`` of ``w`` takes every ``w``-th chunk from ``r`` (disjoint
parts of the cache, at most a chunk apart in size), then reads them ``--buffer-size`` rows at a time (a *window* of
chunks, gathered from the memory-mapped shards into RAM), and hands out those rows in an order seeded by (seed, rank,
e, window). A batch is the next ``--batch-size`` rows of that stream (it may span two windows or two epochs), so a
checkpoint stores only (epoch, window, offset) and a resume is bit-exact. Only the windows (two with prefetching, on
by default when training on GPU) are in RAM; the shards are memory-mapped (``pyarrow.memory_map``) and viewed as
torch tensors without a copy. A cache is refused, in one line naming both sides and the fix, when the run's model is
not the cache's, or an SAE's (layer, site) is not in it or has another width.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import typing
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from filelock import FileLock, Timeout
from torch import Tensor
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from hf_sae._io import atomic_path, remove_stale_temporaries, remove_tree, sha256_of, write_json_atomic
from hf_sae._version import __version__
from hf_sae.errors import BufferMemoryError, DataError, HfSaeError, TrainConfigError
from hf_sae.sites import Site, num_layers, resolve_site

from .config import EMBEDDED_CORPORA, RunOptions, TrainConfig, flag, make_config, parse_sae_flag
from .data import TokenWindows, data_files, dataset_factories, excluded_token_ids
from .harvest import ActivationHarvester, available_memory
from .language_model import dataset_id, load_language_model, model_id, resolve_layers
from .sae_options import Count

logger = logging.getLogger(__name__)

SiteKey = tuple[int, str]
FORMAT = "hf-sae activation cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "harvest_state.json"
WINDOWS = "windows"
LOCK = ".hf-sae-harvest.lock"
DATASET_INFO, DATASET_STATE = "dataset_info.json", "state.json"
CHUNK_ROWS = 256
"""Consecutive cached rows that the training reader moves as one piece (the unit of the shuffle across shards)."""
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ARROW_VALUE = {
    "bfloat16": ("uint16", pa.uint16()),
    "float16": ("float16", pa.float16()),
    "float32": ("float32", pa.float32()),
}
_NUMPY_VIEW = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}

HARVEST_SHARED = (
    "model",
    "dataset",
    "dataset_config",
    "split",
    "eval_split",
    "eval_holdout_documents",
    "text_column",
    "context_length",
    "lm_batch_size",
    "lm_dtype",
    "excluded_token_ids",
    "cpu",
)
"""The training options the harvest takes as they are (same flags, same help, same checks)."""
ADOPTED = tuple(name for name in HARVEST_SHARED if name not in ("lm_batch_size", "cpu"))
"""The run options a training run on a cache takes from the cache's manifest unless given (evaluation reads the LM
and the held-out text the cache was harvested from)."""


class ActivationCacheError(DataError):
    """An activation cache folder cannot be used: missing, unfinished, damaged, or not the run's."""


def column_name(layer: int, site: str) -> str:
    """The column of site ``(layer, site)``: ``layer_6.resid``."""
    return f"layer_{layer}.{site}"


def shard_name(index: int, count: int) -> str:
    """``data-00003-of-00012.arrow`` (the name ``datasets.Dataset.save_to_disk`` gives its shards)."""
    return f"data-{index:05d}-of-{count:05d}.arrow"


def _normalize_source(name: str) -> str:
    """A local model / data path made absolute (so another working directory finds it); ids stay as they are."""
    if name in EMBEDDED_CORPORA:  # 'embedded' (the model or the corpus), 'embedded-extended'
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _features(sites: list[dict[str, Any]], dtype: str):
    from datasets import Features, List, Value

    value = _ARROW_VALUE[dtype][0]
    columns = {site["column"]: List(Value(value), length=site["width"]) for site in sites}
    columns.update(window=Value("int64"), position=Value("int32"), token=Value("int32"))
    return Features(columns)


def _window_features(context_length: int):
    from datasets import Features, List, Value

    return Features(
        {
            "window": Value("int64"),
            "input_ids": List(Value("int32"), length=context_length),
            "length": Value("int32"),
            "first_document": Value("int64"),
            "document_starts": List(Value("int32")),
            "harvested": Value("bool"),
        }
    )


def _schema(features, meta: dict[str, Any]) -> pa.Schema:
    schema = features.arrow_schema
    return schema.with_metadata({**schema.metadata, b"hf_sae": json.dumps(meta, sort_keys=True).encode()})


# ============================================================================================== writing shards
class _ArrowShard:
    """One Arrow IPC stream file written atomically: record batches go to a temporary file beside ``path``, which
    is fsync-ed and renamed to ``path`` by :meth:`close` (a kill before that leaves only the temporary)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self._atomic = atomic_path(self.path)
        self.tmp = self._atomic.__enter__()
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self.rows = 0
        self.batches: list[int] = []

    def write(self, columns: list[pa.Array]) -> None:
        batch = pa.record_batch(columns, schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self.batches.append(batch.num_rows)

    def close(self) -> dict[str, Any]:
        """Finish the file and move it into place; returns its rows, record batches, size and sha256."""
        self._writer.close()
        self._sink.close()
        info = {"rows": self.rows, "record_batches": self.batches, "bytes": self.tmp.stat().st_size}
        info["sha256"] = sha256_of(self.tmp)
        self._atomic.__exit__(None, None, None)
        return info

    def abort(self, error: BaseException) -> None:
        """Remove the temporary file (a full disk is reported as :class:`hf_sae.errors.DiskFullError`)."""
        try:
            self._writer.close()
            self._sink.close()
        except (OSError, pa.ArrowException):
            pass
        self._atomic.__exit__(type(error), error, error.__traceback__)


def site_columns(activations: dict[SiteKey, Tensor], sites: list[dict[str, Any]], dtype: str) -> list[pa.Array]:
    """The Arrow columns of a batch of activations ``{(layer, site): (n, width)}`` in the cache's storage dtype."""
    columns = []
    for site in sites:
        x = activations[(site["layer"], site["site"])].detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
        flat = (x.view(torch.uint16) if dtype == "bfloat16" else x).reshape(-1).numpy()
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), site["width"]))
    return columns


def _dataset_files(folder: Path, files: list[str], features, description: str, fingerprint: str) -> None:
    """``dataset_info.json`` and ``state.json`` as ``Dataset.save_to_disk`` writes them (what load_from_disk reads)."""
    info = {
        "citation": "",
        "description": description,
        "features": features.to_dict(),
        "homepage": "",
        "license": "",
    }
    write_json_atomic(folder / DATASET_INFO, info)
    state = {
        "_data_files": [{"filename": name} for name in files],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    write_json_atomic(folder / DATASET_STATE, state, sort_keys=True)


# ==================================================================================================== harvest
@dataclass
class HarvestOptions:
    """What only the harvest has (the model, data and LM options are training's own, see ``--help``)."""

    _argument_group_name = "harvest"

    out: str | None = field(
        default=None, metadata={"help": "cache folder; default activations/<model>-L<layer>-<site>"}
    )
    layer: list[int] | None = field(
        default=None,
        metadata={"help": "decoder layers to harvest (0-based); default the middle one, (num_layers - 1) // 2"},
    )
    site: list[str] = field(
        default_factory=lambda: ["resid"],
        metadata={"help": "hook sites to harvest at every --layer: resid, mlp, attn, attn_z"},
    )
    dtype: str = field(
        default="bfloat16", metadata={"help": "storage dtype of the activations: bfloat16, float16 or float32"}
    )
    tokens: Count = field(
        default=RunOptions.tokens,
        metadata={"help": "activations to harvest (per site); 1e9, 10M, 2_000_000; stops earlier if the data ends"},
    )
    shard_tokens: Count = field(
        default=131072, metadata={"help": "activations per shard file (a kill loses at most one shard's work)"}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "continue an unfinished harvest in this folder (or in --out when given without a value)",
            "nargs": "?",
            "const": "",
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache folder instead of refusing"})


_RESUME_MAY_CHANGE = {"out", "resume", "overwrite", "cpu"}


def _shared_dataclass() -> type:
    """A dataclass of the training options the harvest shares (their fields, defaults and help as they are)."""
    hints = typing.get_type_hints(RunOptions)
    fields_ = []
    for f in dataclasses.fields(RunOptions):
        if f.name in HARVEST_SHARED:
            copy = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
            fields_.append((f.name, hints[f.name], copy))
    shared = dataclasses.make_dataclass("HarvestModelOptions", fields_)
    shared._argument_group_name = "language model and data (the options of python -m training.train)"
    return shared


class _HarvestParser(HfArgumentParser):
    """argparse, but a bad command line is a :class:`TrainConfigError` (one line, exit 2), not usage + exit."""

    def error(self, message: str):
        message = message.replace("invalid Count value", "not a count (write e.g. 64, 4096, 1e9 or 10M)")
        raise TrainConfigError(f"{message}. Run `python -m training.harvest --help` for the options.")


def build_harvest_parser() -> HfArgumentParser:
    """The harvest CLI: training's model/data options (:data:`HARVEST_SHARED`) and :class:`HarvestOptions`."""
    parser = _HarvestParser(
        [_shared_dataclass(), HarvestOptions],
        prog="python -m training.harvest",
        description="Run the language model once over a data set and write the activations of any number of "
        "(layer, site) pairs to a folder (memory-mapped Arrow shards + manifest.json; datasets.load_from_disk reads "
        "it). Then: python -m training.train --activations DIR. With no arguments: the embedded Gemma 3 270M and "
        "English corpus. Resumable: --resume after a kill continues and ends byte-identical.",
    )
    parser.add_argument(
        "--config", metavar="YAML", help="a training YAML file: its model/data options and its SAEs' (layer, site)"
    )
    for action in parser._actions:
        if action.dest != "help" and action.help and "(default: " not in action.help:
            action.help = f"{action.help} (default: {action.default!r})"
        if action.dest != "help":
            action.default = argparse.SUPPRESS  # only what the user gave reaches the namespace (YAML < flags)
    return parser


def _defaults() -> dict[str, Any]:
    """Every harvest option's default (the shared ones are training's)."""
    shared = [f for f in dataclasses.fields(RunOptions) if f.name in HARVEST_SHARED]
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in [*shared, *dataclasses.fields(HarvestOptions)]
    }


def _yaml_values(path: str) -> dict[str, Any]:
    """A training YAML's model/data options, and its SAEs' layers and sites (every other key is the SAEs')."""
    from .cli import load_yaml

    data = load_yaml(path)
    values = {name: data[name] for name in HARVEST_SHARED if name in data}
    pairs = []
    for entry in data.get("saes") or []:
        entry = parse_sae_flag(entry) if isinstance(entry, str) else dict(entry)
        pairs.append((entry.get("layer", data.get("layer")), entry.get("site", data.get("site", "resid"))))
    if not pairs and ("layer" in data or "site" in data):
        pairs = [(data.get("layer"), data.get("site", "resid"))]
    if pairs:
        values["pairs"] = [(None if layer is None else int(layer), str(site)) for layer, site in pairs]
    return values


def parse_harvest_args(argv: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLI (+ YAML) -> (every option's value, the options given explicitly)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_harvest_parser().parse_args(argv))
    explicit = _yaml_values(args.pop("config")) if "config" in args else {}
    if "layer" in args or "site" in args:
        explicit.pop("pairs", None)
    explicit.update(args)
    return {**_defaults(), **explicit}, explicit


def _pairs(values: dict[str, Any]) -> list[tuple[int | None, str]]:
    """The (layer, site) pairs to harvest: a --config file's, or every --layer with every --site (in that order)."""
    if values.get("pairs"):
        pairs = values["pairs"]
    else:
        layers = values["layer"] if values.get("layer") else [None]
        pairs = [(layer, site) for layer in layers for site in values["site"]]
    return list(dict.fromkeys((layer, site) for layer, site in pairs))


def harvest_config(values: dict[str, Any]) -> TrainConfig:
    """The training config whose model/data/sites the harvest uses (validated by training's own checks)."""
    if values["dtype"] not in STORAGE_DTYPES:
        raise TrainConfigError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {values['dtype']!r}.")
    for name in ("tokens", "shard_tokens"):
        if isinstance(values[name], bool) or not isinstance(values[name], int) or values[name] < 1:
            raise TrainConfigError(f"{flag(name)} must be a positive count, got {values[name]!r}.")
    run = {name: values[name] for name in HARVEST_SHARED}
    run["tokens"] = int(values["tokens"])
    saes = [{"site": site, **({"layer": layer} if layer is not None else {})} for layer, site in _pairs(values)]
    return make_config({**run, "saes": saes})


def _default_out(model_name: str, pairs: list[SiteKey]) -> Path:
    short = model_name.rstrip("/").split("/")[-1]
    where = "-".join(f"L{layer}-{site}" for layer, site in pairs) if len(pairs) <= 3 else f"{len(pairs)}sites"
    return Path("activations") / f"{short}-{where}"


@dataclass
class _Plan:
    """How the harvest cuts the data: windows in all, windows per shard, shards."""

    per_window: int
    windows: int
    windows_per_shard: int
    shards: int

    @classmethod
    def of(cls, tokens: int, shard_tokens: int, context_length: int, has_bos: bool) -> _Plan:
        per_window = context_length - (1 if has_bos else 0)
        windows = math.ceil(tokens / per_window)
        per_shard = min(windows, math.ceil(shard_tokens / per_window))
        return cls(per_window, windows, per_shard, math.ceil(windows / per_shard))


class _FolderLock:
    """One harvest at a time in a folder (the OS drops the lock when its process dies, even by SIGKILL)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.lock = FileLock(str(self.path))

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise ActivationCacheError(
                f"{self.path.parent} is in use by another harvest (it holds {self.path}). Wait for it to end or stop "
                "it, or pick another --out."
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()
        self.path.unlink(missing_ok=True)


def _check_free(out: Path, overwrite: bool, clear: bool = False) -> None:
    """Refuse a folder that holds files (unless ``overwrite``; ``clear`` then empties it)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ActivationCacheError(f"--out {out} is a file; pass a folder for the activation cache.")
    contents = [p for p in out.iterdir() if p.name != LOCK]
    if not contents:
        return
    if not overwrite:
        shown = sorted(p.name for p in contents if not p.name.startswith("."))
        if (out / PROGRESS).is_file():
            hint = f"continue it with --resume {out}"
        elif (out / MANIFEST).is_file():
            hint = f"train from it with python -m training.train --activations {out}"
        else:
            hint = "pick an empty or new folder"
        raise ActivationCacheError(
            f"--out {out} already holds {'an unfinished harvest' if (out / PROGRESS).is_file() else 'files'} "
            f"({', '.join(shown[:5])}); {hint}, another --out, or --overwrite to replace it."
        )
    if clear:
        for item in contents:
            remove_tree(item) if item.is_dir() else item.unlink()


def _resume_values(out: Path, values: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The options of the harvest being resumed (refusing explicit ones that differ)."""
    if (out / MANIFEST).is_file() and not (out / PROGRESS).is_file():
        return {**json.loads((out / MANIFEST).read_text())["options"], "out": str(out), "complete": True}
    if not (out / PROGRESS).is_file():
        raise ActivationCacheError(
            f"--resume {out}: no {PROGRESS} there, so there is no unfinished harvest to continue. Start it without "
            "--resume (with --overwrite to replace what is there)."
        )
    recorded = json.loads((out / PROGRESS).read_text())["options"]
    requested = harvest_options_record(values)
    differ = [
        f"{flag(name)}: the harvest has {recorded.get(name)!r}, you passed {requested.get(name)!r}"
        for name in sorted(set(explicit) - _RESUME_MAY_CHANGE)
        if name in recorded and recorded.get(name) != requested.get(name)
    ]
    if {"layer", "site", "pairs"} & set(explicit):  # a layer left out (the middle one) matches the resolved one
        wanted, had = requested["pairs"], recorded["pairs"]
        same = len(wanted) == len(had) and all(w[1] == h[1] and w[0] in (None, h[0]) for w, h in zip(wanted, had))
        if not same:
            differ.append(f"--layer/--site: the harvest has {had}, you passed {wanted}")
    if differ:
        raise ActivationCacheError(
            f"--resume {out}: the harvest was started with other options ({'; '.join(differ)}). Drop those options to "
            "continue it (a shard is a function of them), or start a new harvest with another --out."
        )
    return {**values, **recorded, "out": str(out), **{k: explicit[k] for k in ("cpu",) if k in explicit}}


def harvest_options_record(values: dict[str, Any]) -> dict[str, Any]:
    """What defines a harvest's shards (recorded in the manifest; a resume must match it)."""
    record = {name: values[name] for name in HARVEST_SHARED if name != "cpu"}
    record.update(model=_normalize_source(str(values["model"])), dataset=_normalize_source(str(values["dataset"])))
    record.update({name: int(values[name]) for name in ("tokens", "shard_tokens")})
    record.update(dtype=values["dtype"], pairs=[[layer, site] for layer, site in _pairs(values)])
    excluded = values["excluded_token_ids"]
    record["excluded_token_ids"] = None if excluded is None else sorted({int(t) for t in excluded})
    return record


def harvest(values: dict[str, Any], explicit: dict[str, Any] | None = None) -> Path:
    """Run (or resume) a harvest with the options ``values`` (see :func:`parse_harvest_args`); returns the folder."""
    explicit = dict(explicit if explicit is not None else values)
    if values.get("resume") is not None:
        where = values["resume"] or values.get("out")
        if not where:
            raise ActivationCacheError("--resume needs the folder: --resume DIR (or --resume with --out DIR).")
        if values.get("out") and values["resume"] and Path(values["out"]).resolve() != Path(values["resume"]).resolve():
            raise ActivationCacheError(
                f"--out {values['out']} differs from --resume {values['resume']}: a harvest continues in its own "
                "folder. Drop --out."
            )
        values = _resume_values(Path(where), values, explicit)
        if values.get("complete"):
            print(f"{where} is already a complete activation cache; nothing to do.", file=sys.stderr)
            return Path(where)
    resuming = values.get("resume") is not None
    values = {**values, "model": _normalize_source(str(values["model"]))}
    values["dataset"] = _normalize_source(str(values["dataset"]))
    cfg = harvest_config(values)
    if not resuming and values.get("out"):
        _check_free(Path(values["out"]), bool(values.get("overwrite")))  # before the (slow) model load

    use_cpu = cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available()
    device = torch.device("cpu") if use_cpu else torch.device("cuda")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu")
    try:
        model, tokenizer = load_language_model(cfg, device)
        specs = resolve_layers(cfg, model)
        sites: list[Site] = list({s.key: s for s in (resolve_site(model, p.layer, p.site) for p in specs)}.values())
        out = Path(values["out"]) if values.get("out") else _default_out(model_id(cfg, model), [s.key for s in sites])
        if not resuming:
            _check_free(out, bool(values.get("overwrite")))
        excluded = excluded_token_ids(cfg, tokenizer)
        train_data, _ = dataset_factories(cfg, 0, 1)
        windows = TokenWindows(
            train_data,
            tokenizer,
            cfg.context_length,
            cfg.text_column,
            loop=False,
            name=cfg.dataset,
            files=data_files(cfg.dataset),
        )
        harvester = ActivationHarvester(model, sites, excluded)
        record = harvest_options_record({**values, "pairs": [list(s.key) for s in sites]})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg.model,
            "model_name": model_id(cfg, model),
            "revision": getattr(model.config, "_commit_hash", None),
            "model_type": getattr(model.config, "model_type", None),
            "num_layers": num_layers(model),
            "lm_dtype": str(model.dtype).removeprefix("torch."),
            "dtype": values["dtype"],
            "dtype_storage": (
                "uint16 bit patterns of bfloat16 values (Arrow has no bfloat16): "
                "torch.from_numpy(a).view(torch.bfloat16)"
                if values["dtype"] == "bfloat16"
                else f"{values['dtype']} values"
            ),
            "sites": [
                {"layer": s.layer, "site": s.name, "width": s.width, "column": column_name(s.layer, s.name)}
                for s in sites
            ],
            "dataset": cfg.dataset,
            "dataset_name": dataset_id(cfg),
            "dataset_config": cfg.dataset_config,
            "split": cfg.split,
            "eval_split": cfg.eval_split,
            "eval_holdout_documents": cfg.eval_holdout_documents,
            "text_column": cfg.text_column,
            "context_length": cfg.context_length,
            "excluded_token_ids": list(excluded),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": windows.pad_id,
            "options": record,
            "versions": {"hf_sae": __version__, "torch": torch.__version__.split("+")[0]},
        }
        plan = _Plan.of(cfg.tokens, int(values["shard_tokens"]), cfg.context_length, tokenizer.bos_token_id is not None)
        with _FolderLock(out):
            if not resuming:  # checked above; now (locked, everything loaded) --overwrite clears the old cache
                _check_free(out, bool(values.get("overwrite")), clear=True)
            return _Harvest(out, manifest, plan, windows, harvester, cfg.lm_batch_size, resuming).run()
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


class _Harvest:
    """The harvest loop: shard after shard, the data position saved after each (see the module docstring)."""

    def __init__(
        self, out: Path, manifest: dict[str, Any], plan: _Plan, windows, harvester, lm_batch_size: int, resume: bool
    ):
        self.out, self.manifest, self.plan = out, manifest, plan
        self.windows, self.harvester, self.lm_batch_size = windows, harvester, lm_batch_size
        self.sites = manifest["sites"]
        self.dtype = manifest["dtype"]
        self.context_length = manifest["context_length"]
        self.eos = manifest["eos_token_id"]
        meta = {k: manifest[k] for k in ("format", "format_version", "model", "dtype", "sites", "context_length")}
        self.schema = _schema(_features(self.sites, self.dtype), meta)
        self.window_schema = _schema(_window_features(self.context_length), meta)
        identity = ("model_name", "model_type", "num_layers", "lm_dtype", "sites", "excluded_token_ids")
        self.state: dict[str, Any] = {
            "options": manifest["options"],
            "plan": dataclasses.asdict(plan),
            "identity": {name: manifest[name] for name in identity},  # what the options do not pin down
            "shards": [],
            "windows": 0,
            "rows": 0,
            "document": 0,
            "document_pending": True,
            "nonfinite_lm_batches": 0,
            "ended": False,
            "data": None,
        }
        if resume:
            saved = json.loads((out / PROGRESS).read_text())
            for name in ("plan", "identity"):
                if saved[name] != self.state[name]:
                    differ = {
                        k: (v, self.state[name].get(k)) for k, v in saved[name].items() if v != self.state[name].get(k)
                    }
                    listed = "; ".join(
                        f"{k}: the harvest had {a!r}, this session {b!r}" for k, (a, b) in differ.items()
                    )
                    raise ActivationCacheError(
                        f"--resume {out}: this session would not write the same shards ({listed}): another model, "
                        "tokenizer or kind of machine (--lm-dtype auto picks by the CPU). Resume it where it began, "
                        "or start a new harvest with another --out."
                    )
            self.state = saved
            if saved["data"] is not None:
                self.windows.load_state(saved["data"])
            remove_stale_temporaries(out)
            remove_stale_temporaries(out / WINDOWS)

    # ----------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        (self.out / WINDOWS).mkdir(parents=True, exist_ok=True)
        if not self.state["shards"] and not (self.out / PROGRESS).is_file():
            self._save_state()  # the folder is now an unfinished harvest (--resume continues it)
        done = len(self.state["shards"])
        planned_rows = self.plan.windows * self.plan.per_window
        with tqdm(
            total=planned_rows,
            initial=self.state["rows"],
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
            desc="harvest",
        ) as progress:
            for index in range(done, self.plan.shards):
                if self.state["ended"]:
                    break
                self._shard(index, progress)
        return self._finish()

    def _shard(self, index: int, progress) -> None:
        first = index * self.plan.windows_per_shard
        count = min(self.plan.windows_per_shard, self.plan.windows - first)
        batch = self.windows.next_batch(min(self.lm_batch_size, count))
        if batch is None:  # the data ended exactly at the last shard's end
            self.state["ended"] = True
            self._save_state()
            return
        name = shard_name(index, self.plan.shards)
        shard = _ArrowShard(self.out / name, self.schema)
        try:
            rows_before = self.state["rows"]
            window_rows: list[dict[str, Any]] = []
            taken = 0
            while batch is not None:
                input_ids, attention_mask = batch
                n = input_ids.shape[0]
                kept = self.harvester(input_ids, attention_mask)
                self._windows_of(input_ids, attention_mask, first + taken, kept is not None, window_rows)
                if kept is None:
                    self.state["nonfinite_lm_batches"] += 1
                    logger.warning("skipped a language-model batch with NaN/inf activations (its windows have no rows)")
                else:
                    keep = self.harvester.keep_mask(input_ids, attention_mask).cpu()
                    b, position = keep.nonzero(as_tuple=True)
                    rows = int(b.numel())
                    shard.write(
                        [
                            *site_columns(kept, self.sites, self.dtype),
                            pa.array((b + first + taken).numpy().astype(np.int64)),
                            pa.array(position.numpy().astype(np.int32)),
                            pa.array(input_ids.cpu()[keep].numpy().astype(np.int32)),
                        ]
                    )
                    self.state["rows"] += rows
                    progress.update(rows)
                taken += n
                if n < min(self.lm_batch_size, count - (taken - n)):  # a finite stream gave fewer: it ended
                    self.state["ended"] = True
                    break
                if taken >= count:
                    break
                batch = self.windows.next_batch(min(self.lm_batch_size, count - taken))
                if batch is None:
                    self.state["ended"] = True
            info = shard.close()
        except BaseException as error:
            shard.abort(error)
            raise
        window_shard = _ArrowShard(self.out / WINDOWS / name, self.window_schema)
        try:
            window_shard.write(self._window_columns(window_rows))
            window_info = window_shard.close()
        except BaseException as error:
            window_shard.abort(error)
            raise
        self.state["windows"] += taken
        self.state["shards"].append(
            {
                "index": index,
                "file": name,
                "first_window": first,
                "windows": taken,
                **info,
                "first_row": rows_before,
                "windows_file": f"{WINDOWS}/{name}",
                "windows_sha256": window_info["sha256"],
            }
        )
        self.state["data"] = self.windows.state()
        self._save_state()

    def _windows_of(self, input_ids: Tensor, attention_mask: Tensor, first: int, harvested: bool, out: list) -> None:
        """The windows table rows of a batch: ids, real length, the documents (EOS separates packed documents)."""
        ids = input_ids.cpu().tolist()
        lengths = attention_mask.cpu().sum(1).tolist()
        bos = self.manifest["bos_token_id"] is not None
        for i, (row, length) in enumerate(zip(ids, lengths)):
            starts, first_document = [], self.state["document"]
            for position in range(1 if bos else 0, int(length)):
                if self.state["document_pending"]:
                    starts.append(position)
                    self.state["document_pending"] = False
                if self.eos is not None and row[position] == self.eos:
                    self.state["document"] += 1
                    self.state["document_pending"] = True
            out.append(
                {
                    "window": first + i,
                    "input_ids": row,
                    "length": int(length),
                    "first_document": first_document,
                    "document_starts": starts,
                    "harvested": harvested,
                }
            )

    def _window_columns(self, rows: list[dict[str, Any]]) -> list[pa.Array]:
        T = self.context_length
        ids = np.asarray([r["input_ids"] for r in rows], dtype=np.int32).reshape(-1)
        return [
            pa.array([r["window"] for r in rows], type=pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(ids), T),
            pa.array([r["length"] for r in rows], type=pa.int32()),
            pa.array([r["first_document"] for r in rows], type=pa.int64()),
            pa.array([r["document_starts"] for r in rows], type=pa.list_(pa.int32())),
            pa.array([r["harvested"] for r in rows], type=pa.bool_()),
        ]

    def _save_state(self) -> None:
        write_json_atomic(self.out / PROGRESS, self.state)

    def _finish(self) -> Path:
        """Rename the shards to their real count if the data ended early, write the datasets files and the
        manifest (last), remove the harvest state. Every step can be redone (a kill here is resumed too)."""
        shards = self.state["shards"]
        if not shards:
            raise ActivationCacheError(
                f"{self.manifest['dataset']}: the data gave no windows to harvest. Check --dataset, --split and "
                "--text-column."
            )
        count = len(shards)
        for shard in shards:
            final = shard_name(shard["index"], count)
            for folder in (self.out, self.out / WINDOWS):
                if shard["file"] != final and (folder / shard["file"]).exists():
                    os.replace(folder / shard["file"], folder / final)
            shard["file"], shard["windows_file"] = final, f"{WINDOWS}/{final}"
        manifest = {
            **self.manifest,
            "tokens": self.state["rows"],
            "windows": self.state["windows"],
            "documents": self.state["document"] + (0 if self.state["document_pending"] else 1),
            "nonfinite_lm_batches": self.state["nonfinite_lm_batches"],
            "data_ended": self.state["ended"],
            "windows_per_shard": self.plan.windows_per_shard,
            "columns": {
                "<layer_L.site>": f"the activation at site (L, site), {self.manifest['dtype_storage']}",
                "window": "index of the row's window in windows/ (0-based, global)",
                "position": "position of the token in its window (0 is BOS)",
                "token": "the token id at that position",
            },
            "window_columns": {
                "input_ids": "the window's token ids (BOS first, then packed documents each ended by EOS; excluded "
                "tokens included)",
                "length": "real tokens (the rest is padding, only in the very last window of a finite data set)",
                "first_document": "index of the document the window's first text token belongs to",
                "document_starts": "positions where a document begins",
                "harvested": "false when the LM gave NaN/inf activations for its batch (the window has no rows)",
            },
            "shards": [{k: v for k, v in s.items() if k != "index"} for s in shards],
            "complete": True,
        }
        _write_final(self.out, manifest, windows=True)
        (self.out / PROGRESS).unlink(missing_ok=True)
        gib = sum(s["bytes"] for s in manifest["shards"]) / 2**30
        print(
            f"wrote {manifest['tokens']:,} activations x {len(self.sites)} site(s) "
            f"({', '.join(s['column'] for s in self.sites)}, {self.dtype}) to {self.out}: {count} shard(s), "
            f"{gib:.2f} GiB"
            + (" (the data ended before --tokens)" if self.state["ended"] else "")
            + f"\ntrain from it: python -m training.train --activations {self.out}",
            flush=True,
        )
        return self.out


def _write_final(out: Path, manifest: dict[str, Any], windows: bool) -> None:
    """What makes a folder of shards a cache: the files ``datasets.load_from_disk`` reads (of the activations and,
    with ``windows``, of windows/), then the manifest, last."""
    text = json.dumps(manifest, indent=2) + "\n"
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    description = (
        f"hf-sae activation cache of {manifest['model_name']} ({manifest['tokens']:,} tokens of "
        f"{manifest['dataset_name']}, context {manifest['context_length']}). Columns layer_L.site: "
        f"{manifest['dtype_storage']}. See manifest.json."
    )
    files = [s["file"] for s in manifest["shards"]]
    _dataset_files(out, files, _features(manifest["sites"], manifest["dtype"]), description, fingerprint)
    if windows:
        features = _window_features(manifest["context_length"])
        _dataset_files(out / WINDOWS, files, features, "token windows of " + description, fingerprint)
    write_json_atomic(out / MANIFEST, manifest)


def write_synthetic_cache(
    out: str | os.PathLike,
    activations: dict[SiteKey, Tensor],
    dtype: str = "bfloat16",
    rows_per_shard: int = 65536,
    rows_per_batch: int = 4096,
    model: str = "synthetic",
    context_length: int = 128,
) -> Path:
    """A cache of the given activations ``{(layer, site): (N, width)}`` (no language model; no windows/): for
    benchmarks and tests of the reader. Rows are numbered as if they came from windows of ``context_length``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sites = [
        {"layer": layer, "site": site, "width": int(x.shape[1]), "column": column_name(layer, site)}
        for (layer, site), x in activations.items()
    ]
    rows = next(iter(activations.values())).shape[0]
    storage = f"{dtype} values" if dtype != "bfloat16" else "uint16 bit patterns of bfloat16 values"
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "dtype": dtype, "sites": sites}
    schema = _schema(_features(sites, dtype), {**meta, "context_length": context_length})
    count = math.ceil(rows / rows_per_shard)
    shards = []
    for index in range(count):
        shard = _ArrowShard(out / shard_name(index, count), schema)
        first = index * rows_per_shard
        for start in range(first, min(rows, first + rows_per_shard), rows_per_batch):
            stop = min(rows, first + rows_per_shard, start + rows_per_batch)
            row = torch.arange(start, stop)
            part = {key: x[start:stop] for key, x in activations.items()}
            window, position = row // (context_length - 1), row % (context_length - 1) + 1
            ids = [pa.array(window.numpy()), pa.array(position.numpy().astype(np.int32))]
            shard.write([*site_columns(part, sites, dtype), *ids, pa.array(np.zeros(stop - start, np.int32))])
        shards.append({"file": shard_name(index, count), "first_row": first, **shard.close()})
    manifest = {
        **meta,
        "model_name": model,
        "revision": None,
        "num_layers": None,
        "lm_dtype": None,
        "dtype_storage": storage,
        "dataset": "synthetic",
        "dataset_name": "synthetic",
        "context_length": context_length,
        "excluded_token_ids": [],
        "options": {},
        "tokens": rows,
        "windows": 0,
        "shards": shards,
        "complete": True,
    }
    _write_final(out, manifest, windows=False)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m training.harvest`` (and ``hf-sae harvest``)."""
    from transformers.utils import logging as transformers_logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.disable_progress_bar()
    for noisy in ("httpx", "datasets", "filelock", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        values, explicit = parse_harvest_args(argv)
        harvest(values, explicit)
    except HfSaeError as error:
        print(f"hf-sae: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("hf-sae: interrupted; the finished shards are kept: continue with --resume", file=sys.stderr)
        sys.exit(130)


# ================================================================================================ reading a cache
def read_manifest(path: str | os.PathLike, option: str = "--activations") -> dict[str, Any]:
    """The manifest of a finished cache (refusing a missing, unfinished or foreign folder, in one line)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ActivationCacheError(
            f"{option} {folder}: no such folder. Harvest one with: python -m training.harvest --out {folder}"
        )
    if not (folder / MANIFEST).is_file():
        if (folder / PROGRESS).is_file():
            state = json.loads((folder / PROGRESS).read_text())
            raise ActivationCacheError(
                f"{option} {folder} is an unfinished harvest ({len(state['shards'])} of {state['plan']['shards']} "
                f"shards). Finish it first: python -m training.harvest --resume {folder}"
            )
        raise ActivationCacheError(
            f"{option} {folder}: no {MANIFEST} there, so it is not an activation cache. Harvest one with: "
            f"python -m training.harvest --out {folder}"
        )
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except ValueError as error:
        raise ActivationCacheError(f"{option} {folder}: {MANIFEST} is not valid JSON ({error}).") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ActivationCacheError(
            f"{option} {folder}: {MANIFEST} is not an hf-sae activation cache of format version <= {FORMAT_VERSION} "
            f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r}). Upgrade hf-sae or "
            "harvest it again."
        )
    return manifest


def cache_id(path: str | os.PathLike) -> str:
    """An identity of a cache's contents (the sha256 of its manifest, which holds every shard's sha256)."""
    return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()[:16]


def _site_list(manifest: dict[str, Any]) -> str:
    return ", ".join(f"layer {s['layer']} {s['site']}" for s in manifest["sites"])


def cache_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Training option values with the cache's model/data options filled in where not given, one SAE per cached site
    when no SAE placement is given, and ``--tokens`` from ``--epochs`` (default one epoch). Refuses a ``--model``
    that is not the cache's."""
    values = dict(values)
    folder = values["activations"]
    manifest = read_manifest(folder)
    if "model" in values and _normalize_source(str(values["model"])) != manifest["model"]:
        raise TrainConfigError(
            f"--activations {folder} was harvested from {manifest['model']} ({manifest['model_name']}), but --model "
            f"is {values['model']}. Drop --model (a run on a cache uses the cache's model), or harvest a cache of "
            f"{values['model']}: python -m training.harvest --model {values['model']} --out DIR."
        )
    for name in ADOPTED:
        if name not in values:
            values[name] = manifest.get(name)
    if not any(name in values for name in ("saes", "layer", "site")):
        values["saes"] = [{"layer": s["layer"], "site": s["site"]} for s in manifest["sites"]]
    epochs = values.get("epochs")
    try:
        tokens = max(1, math.ceil(float(epochs or 1) * manifest["tokens"]))
    except (TypeError, ValueError):
        raise TrainConfigError(f"--epochs must be a number > 0, got {epochs!r}.") from None
    if "tokens" not in values:
        values["tokens"] = tokens
    elif epochs is not None and values["tokens"] != tokens:  # (a saved config has both, and they agree)
        raise TrainConfigError(f"--tokens and --epochs both say how long to train on {folder}; pass one of them.")
    return values


def check_config_against_cache(cfg: TrainConfig) -> None:
    """Refuse SAEs whose (layer, site) the cache does not hold (layers still None are checked once resolved)."""
    manifest = read_manifest(cfg.activations)
    cached = {(s["layer"], s["site"]) for s in manifest["sites"]}
    for spec in cfg.saes:
        if spec.layer is not None and (spec.layer, spec.site) not in cached:
            raise TrainConfigError(
                f"SAE {spec.name} reads layer {spec.layer} {spec.site}, but --activations {cfg.activations} holds "
                f"{_site_list(manifest)}. Train on one of those sites, or harvest this one: python -m "
                f"training.harvest --model {manifest['model']} --layer {spec.layer} --site {spec.site} --out DIR."
            )


def check_run_against_cache(manifest: dict[str, Any], folder: str, model_name: str, sites: list[Site], layers: int):
    """Refuse a cache whose model, sites or widths are not the run's (the loaded model's)."""
    if manifest.get("num_layers") is not None and manifest["num_layers"] != layers:
        raise ActivationCacheError(
            f"--activations {folder} was harvested from {manifest['model_name']} with {manifest['num_layers']} "
            f"layers; the run's model {model_name} has {layers}. Use the cache's model, or harvest this one."
        )
    by_key = {(s["layer"], s["site"]): s for s in manifest["sites"]}
    for site in sites:
        cached = by_key.get(site.key)
        if cached is None:
            raise ActivationCacheError(
                f"an SAE reads layer {site.layer} {site.name}, but --activations {folder} holds {_site_list(manifest)}."
                f" Train on one of those sites (--layer/--site), or harvest this one: python -m training.harvest "
                f"--layer {site.layer} --site {site.name} --out DIR."
            )
        if cached["width"] != site.width:
            raise ActivationCacheError(
                f"--activations {folder}: layer {site.layer} {site.name} is {cached['width']} wide in the cache "
                f"({manifest['model_name']}) but {site.width} wide in the run's model {model_name}. Use the cache's "
                "model, or harvest this model's activations."
            )


class ActivationCache:
    """A finished cache folder, memory-mapped: :meth:`batch_view` views a record batch's rows of a site as a torch
    tensor without reading the file (pages come in when touched; nothing is copied into RAM), :meth:`copy_rows`
    copies any range of rows out, :meth:`site_rows` gives a range as one tensor (small caches, tests)."""

    def __init__(self, path: str | os.PathLike, option: str = "--activations"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, option)
        self.id = cache_id(self.path)
        self.dtype = self.manifest["dtype"]
        self.torch_dtype = STORAGE_DTYPES[self.dtype]
        self.sites = {(s["layer"], s["site"]): s for s in self.manifest["sites"]}
        self._tables: list[list[pa.RecordBatch] | None] = [None] * len(self.manifest["shards"])
        self._views: dict[tuple[int, SiteKey], Tensor] = {}
        starts, counts = [], []  # every record batch: global first row, rows
        row = 0
        for shard in self.manifest["shards"]:
            for n in shard["record_batches"]:
                starts.append(row)
                counts.append(n)
                row += n
        self.num_rows = row
        if row != self.manifest["tokens"]:
            raise ActivationCacheError(
                f"{option} {self.path}: the manifest's shards hold {row:,} rows but it says {self.manifest['tokens']:,}"
                " tokens; the manifest is damaged. Harvest the cache again."
            )
        self.batch_starts = torch.tensor(starts, dtype=torch.long)
        self.batch_counts = torch.tensor(counts, dtype=torch.long)
        self._starts, self._counts = starts, counts
        self._batch_shard = []
        for s, shard in enumerate(self.manifest["shards"]):
            self._batch_shard += [(s, b) for b in range(len(shard["record_batches"]))]

    def _batches(self, shard: int) -> list[pa.RecordBatch]:
        """The record batches of shard ``shard``, memory-mapped (opened once; checked against the manifest)."""
        if self._tables[shard] is None:
            info = self.manifest["shards"][shard]
            path = self.path / info["file"]
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                size = f"{path.stat().st_size:,} bytes" if path.is_file() else "missing"
                raise ActivationCacheError(
                    f"{path}: {size}, the manifest says {info['bytes']:,} bytes. The cache is damaged or incomplete: "
                    "copy it again, or harvest it again."
                )
            batches = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_batches()
            if [b.num_rows for b in batches] != info["record_batches"]:
                raise ActivationCacheError(f"{path}: its record batches are not the manifest's; harvest it again.")
            self._tables[shard] = batches
        return self._tables[shard]

    def batch_view(self, batch: int, key: SiteKey) -> Tensor:
        """Record batch ``batch`` (global index) of site ``key`` as a read-only (rows, width) tensor on the mmap."""
        view = self._views.get((batch, key))
        if view is None:
            shard, local = self._batch_shard[batch]
            column = self._batches(shard)[local].column(self.sites[key]["column"])
            width = self.sites[key]["width"]
            values = column.values
            kind = _NUMPY_VIEW[self.dtype]
            array = np.frombuffer(
                values.buffers()[1],
                dtype=kind,
                count=len(column) * width,
                offset=(values.offset + column.offset * width) * np.dtype(kind).itemsize,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only memory: the reader only ever copies out of it
                tensor = torch.from_numpy(array)
            view = (tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor).view(-1, width)
            self._views[(batch, key)] = view
        return view

    def site_rows(self, key: SiteKey, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of site ``key`` as one (rows, width) tensor in the storage dtype (a copy in RAM:
        for small caches and tests; training reads :meth:`batch_view` chunks)."""
        stop = self.num_rows if stop is None else stop
        parts = []
        for batch, (first, count) in enumerate(zip(self.batch_starts.tolist(), self.batch_counts.tolist())):
            lo, hi = max(start, first), min(stop, first + count)
            if lo < hi:
                parts.append(self.batch_view(batch, key)[lo - first : hi - first])
        width = self.sites[key]["width"]
        return torch.cat(parts) if parts else torch.empty(0, width, dtype=self.torch_dtype)

    def copy_rows(self, start: int, stop: int, key: SiteKey, out: Tensor) -> None:
        """Copy global rows [start, stop) of site ``key`` (across record batches and shards) into ``out``."""
        batch = bisect.bisect_right(self._starts, start) - 1
        at = 0
        while start < stop:
            first = self._starts[batch]
            take = min(stop, first + self._counts[batch]) - start
            if take > 0:
                out[at : at + take].copy_(self.batch_view(batch, key)[start - first : start - first + take])
                at += take
                start += take
            batch += 1

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> dict[str, Tensor]:
        """The chunks: rows [i * chunk_rows, (i + 1) * chunk_rows) of the whole cache (the last one shorter), each
        chunk's first row and rows."""
        starts = torch.arange(0, self.num_rows, chunk_rows, dtype=torch.long)
        return {"start": starts, "rows": (self.num_rows - starts).clamp(max=chunk_rows)}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the reader's copies on one thread. They are memory-bound (a core copies ~4096 x 640 bf16 rows in ~1 ms):
    more threads gain little on an idle machine, and on a busy one (or beside other processes) each multi-threaded
    copy waits for its slowest thread, which made the reader 20x slower in a trial on 2 shared cores."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generator(*parts: int) -> torch.Generator:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class _Window:
    key: tuple[int, int]
    storage: dict[SiteKey, Tensor]  # rows [0, rows) of the buffers (on the storage device)
    order: Tensor
    rows: int
    buffers: dict[SiteKey, Tensor] | None = None  # the reusable CPU buffers it was gathered into


class CachedActivations:
    """Training batches from an activation cache, with :class:`training.harvest.ActivationBuffer`'s interface
    (``peek``, ``next_batch``, ``state``/``load_state``); see the module docstring for the order of the rows.

    Args:
        cache: the opened cache.
        keys: the (layer, site) pairs the run trains on (a subset of the cache's).
        buffer_size: rows per window (the mixing span, as the shuffle buffer's).
        batch_size: rows per batch.
        seed, rank, world: the shuffle's seed and this process's part of the cache.
        storage_device: where a window lives (CPU, pinned when ``pin_memory``, or the training device).
        prefetch: gather the next window in a background thread while this one is used.
        chunk_rows: consecutive rows moved as one piece.
    """

    def __init__(
        self,
        cache: ActivationCache,
        keys: list[SiteKey],
        buffer_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        storage_device: torch.device | str = "cpu",
        pin_memory: bool = False,
        prefetch: bool = False,
        chunk_rows: int = CHUNK_ROWS,
    ):
        self.cache, self.keys = cache, list(dict.fromkeys(keys))
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.storage_device = torch.device(storage_device)
        self.pin = pin_memory and self.storage_device.type == "cpu" and torch.cuda.is_available()
        self.chunk = cache.chunks(chunk_rows)
        self.num_chunks = len(self.chunk["start"])
        if self.num_chunks < world:
            raise ActivationCacheError(
                f"--activations {cache.path} has {cache.num_rows:,} rows ({self.num_chunks} chunks of up to "
                f"{chunk_rows}), fewer chunks than the {world} processes: each needs a part of its own. Harvest more "
                "tokens or launch fewer processes."
            )
        self.chunks_per_window = max(1, buffer_size // chunk_rows)
        self.my_chunks = len(range(rank, self.num_chunks, world))  # the same in every epoch
        self.windows_per_epoch = math.ceil(self.my_chunks / self.chunks_per_window)
        capacity = self.capacity = self.chunks_per_window * chunk_rows
        widths = {key: cache.sites[key]["width"] for key in self.keys}
        need = capacity * sum(widths.values()) * torch.empty((), dtype=cache.torch_dtype).element_size()
        free = available_memory(self.storage_device)
        if need * (2 if prefetch else 1) > 0.8 * free:
            raise BufferMemoryError(
                f"a window of the activation cache needs {need / 2**30:.1f} GiB ({capacity:,} rows x widths "
                f"{list(widths.values())} in {cache.dtype}{', twice with prefetching' if prefetch else ''}) on "
                f"{self.storage_device}, but only {free / 2**30:.1f} GiB is free per process. Lower --buffer-size."
            )
        self.prefetch = prefetch
        self.epoch, self.window, self.offset = 0, 0, 0
        self.nonfinite_batches = 0  # the harvest dropped NaN/inf batches already
        self._current: _Window | None = None
        self._pending: tuple[tuple[int, int], Future] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-cache") if prefetch else None
        self._epoch_chunks: tuple[int, Tensor] | None = None
        self._spare: list[dict[SiteKey, Tensor]] = []  # window buffers free for the next window

    @classmethod
    def for_run(
        cls, cfg: TrainConfig, model_name: str, model, sites: list[Site], rank: int, world: int, device
    ) -> CachedActivations:
        """The training source of ``train.py`` for ``--activations``: checked against the run's model and sites."""
        cache = ActivationCache(cfg.activations)
        check_run_against_cache(cache.manifest, cfg.activations, model_name, sites, num_layers(model))
        on_device = cfg.buffer_device == "device"
        source = cls(
            cache,
            [site.key for site in sites],
            cfg.buffer_size,
            cfg.batch_size,
            seed=cfg.seed,
            rank=rank,
            world=world,
            storage_device=device if on_device else torch.device("cpu"),
            pin_memory=device.type == "cuda" and not on_device,
            prefetch=device.type == "cuda",
        )
        epochs = cfg.tokens / cache.num_rows
        logger.info(
            "training from the activation cache %s: %s tokens, %.3g epoch(s), %d process(es)",
            cfg.activations,
            f"{cache.num_rows:,}",
            epochs,
            world,
        )
        return source

    # --------------------------------------------------------------------------------------------- the order
    def _chunks_of_epoch(self, epoch: int) -> Tensor:
        """This process's chunks in epoch ``epoch``: every world-th of a permutation shared by all processes."""
        cached = self._epoch_chunks  # (read once: the prefetch thread may replace it meanwhile)
        if cached is None or cached[0] != epoch:
            permutation = torch.randperm(self.num_chunks, generator=_generator(self.seed, epoch))
            cached = self._epoch_chunks = (epoch, permutation[self.rank :: self.world])
        return cached[1]

    def _buffers(self) -> dict[SiteKey, Tensor]:
        """A set of CPU window buffers: a released one (reused: fresh memory costs a page fault per 4 KiB on first
        touch, as much as the copy itself), else new ones."""
        try:
            return self._spare.pop()
        except IndexError:
            pin = self.pin or (self.storage_device.type != "cpu" and torch.cuda.is_available())
            return {
                key: torch.empty(
                    self.capacity, self.cache.sites[key]["width"], dtype=self.cache.torch_dtype, pin_memory=pin
                )
                for key in self.keys
            }

    def _release(self, window: _Window | None) -> None:
        if window is not None and window.buffers is not None:
            self._spare.append(window.buffers)
            window.buffers = None

    def _load(self, key: tuple[int, int]) -> _Window:
        """Gather window ``key`` = (epoch, window) into memory and draw its row order."""
        epoch, window = key
        chunks = self._chunks_of_epoch(epoch)[window * self.chunks_per_window : (window + 1) * self.chunks_per_window]
        chunks = chunks.sort().values  # read the files in order; the row order is drawn below
        starts, lengths = self.chunk["start"][chunks].tolist(), self.chunk["rows"][chunks].tolist()
        rows = sum(lengths)
        buffers = self._buffers()
        for site, buffer in buffers.items():
            at = 0
            for start, length in zip(starts, lengths):
                self.cache.copy_rows(start, start + length, site, buffer[at : at + length])
                at += length
        order = torch.randperm(rows, generator=_generator(self.seed, self.rank, epoch, window))
        return _Window(key, {site: buffer[:rows] for site, buffer in buffers.items()}, order, rows, buffers)

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, window = key
        return (epoch, window + 1) if window + 1 < self.windows_per_epoch else (epoch + 1, 0)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._release(self._pending[1].result())  # (its thread may still be filling the buffers)
            self._pending = None

    def _window_at(self, key: tuple[int, int]) -> _Window:
        if self._current is not None and self._current.key == key:
            return self._current
        if self._pending is not None and self._pending[0] == key:
            window = self._pending[1].result()
            self._pending = None
        else:
            self._drop_pending()
            self._release(self._current)  # batches are copies (index_select): its buffers can take the new rows
            self._current = None
            window = self._load(key)
        if self.storage_device.type != "cpu":  # (synchronous: the CPU buffers are reused right away)
            window.storage = {k: v.to(self.storage_device) for k, v in window.storage.items()}
            window.order = window.order.to(self.storage_device)
            self._release(window)
        self._release(self._current)  # batches are copies (index_select), so its buffers are free now
        self._current = window
        if self._pool is not None:
            following = self._next_key(key)
            self._pending = (following, self._pool.submit(self._load, following))
        if key[1] == 0 and key[0] > 0:
            logger.info("activation cache: epoch %d (rank %d)", key[0], self.rank)
        return window

    def _take(self, rows: int, position: tuple[int, int, int], advance: bool) -> dict[SiteKey, Tensor]:
        """The next ``rows`` rows of the stream from ``position`` = (epoch, window, offset)."""
        epoch, window, offset = position
        parts: dict[SiteKey, list[Tensor]] = {key: [] for key in self.keys}
        left = rows
        while left:
            current = self._window_at((epoch, window))
            if offset >= current.rows:
                epoch, window = self._next_key((epoch, window))
                offset = 0
                continue
            take = min(left, current.rows - offset)
            index = current.order[offset : offset + take]
            for key in self.keys:
                parts[key].append(current.storage[key].index_select(0, index))
            offset += take
            left -= take
        if advance:
            self.epoch, self.window, self.offset = epoch, window, offset
        return {key: chunks[0] if len(chunks) == 1 else torch.cat(chunks) for key, chunks in parts.items()}

    # --------------------------------------------------------------------------------- the buffer interface
    def next_batch(self, device: torch.device | None = None) -> dict[SiteKey, Tensor]:
        """{(layer, site): (batch_size, width)} of the next rows of this process's stream, on ``device``."""
        with _one_thread():
            batch = self._take(self.batch_size, (self.epoch, self.window, self.offset), advance=True)
        return {key: x.to(device or self.storage_device) for key, x in batch.items()}

    def peek(self, rows: int) -> dict[SiteKey, Tensor]:
        """The first ``rows`` rows the next batches will use (at most one epoch of this process's part)."""
        rows = min(rows, int(self.chunk["rows"][self._chunks_of_epoch(self.epoch)].sum()))
        with _one_thread():
            return self._take(rows, (self.epoch, self.window, self.offset), advance=False)

    def state(self) -> dict[str, Any]:
        """Where this process's stream stands (and which cache it is): what a checkpoint needs to continue."""
        return {
            "cache": self.cache.id,
            "rank": self.rank,
            "world": self.world,
            "epoch": self.epoch,
            "window": self.window,
            "offset": self.offset,
            "nonfinite_batches": 0,
            "non_text_rows": 0,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("cache") != self.cache.id:
            raise ActivationCacheError(
                f"--activations {self.cache.path} is not the cache this run was trained on (cache id "
                f"{self.cache.id}, the checkpoint's {state.get('cache')}): resume with the same cache "
                "(--activations DIR may point to a copy of it)."
            )
        self.epoch, self.window, self.offset = state["epoch"], state["window"], state["offset"]
        self._drop_pending()
        self._release(self._current)
        self._current = None

    def close(self) -> None:
        """Stop the prefetch thread (if any) and free the window buffers."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending, self._current, self._spare = None, None, []


if __name__ == "__main__":
    main()

"""The activation cache (training/activation_cache.py): harvest once to memory-mapped Arrow shards + a manifest, read
it back (as a ``datasets.Dataset`` and as training batches), resume a killed harvest to the same bytes, refuse a cache
that is not the run's, shard it across processes, and train from it (bit-exact resume included).

Real components: the tiny random-weight Gemma-2 saved with a word-level tokenizer and English documents
(tests/conftest.py's ``saved_lm``), and the real harvester, packing and training loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

import hf_sae  # noqa: F401  (registers the SAE classes with AutoModel)
from hf_sae.sites import resolve_site
from training import activation_cache as ac
from training import checkpoint as ckpt
from training import train as train_module
from training.cli import parse_args
from training.config import TrainConfigError
from training.data import TokenWindows, dataset_factories
from training.harvest import ActivationHarvester

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = 2, 1, 0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def harvest_args(saved_lm):
    """``harvest_args(out, **overrides)``: a small harvest of the tiny LM (2 layers x 2 sites, ~6 shards)."""
    model_dir, docs = saved_lm

    def arguments(out, **overrides) -> list[str]:
        options = {
            "model": model_dir,
            "dataset": docs,
            "eval_holdout_documents": 5,
            "layer": "1 2",
            "site": "resid mlp",
            "context_length": 32,
            "lm_batch_size": 4,
            "lm_dtype": "float32",
            "tokens": 1800,
            "shard_tokens": 320,
            "out": out,
            **overrides,
        }
        args = []
        for name, value in options.items():
            if value is True:
                args.append("--" + name.replace("_", "-"))
            elif value is not None and value is not False:
                args += ["--" + name.replace("_", "-"), *str(value).split(" ")]
        return args

    return arguments


def harvest(args: list[str]) -> Path:
    values, explicit = ac.parse_harvest_args(args)
    return ac.harvest(values, explicit)


def run(args: list[str]):
    cfg, explicit = parse_args(args)
    return train_module.train(cfg, explicit)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cache(harvest_args, tmp_path_factory) -> Path:
    return harvest(harvest_args(tmp_path_factory.mktemp("caches") / "bf16"))


@pytest.fixture(scope="module")
def fp32_cache(harvest_args, tmp_path_factory) -> Path:
    """The same harvest stored in float32 (for an exact comparison with the harvester)."""
    return harvest(harvest_args(tmp_path_factory.mktemp("caches") / "fp32", dtype="float32"))


# ------------------------------------------------------------------------------------------------- round trip
def test_the_cache_is_a_datasets_dataset_with_a_manifest(cache, saved_lm):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "bfloat16" and manifest["context_length"] == 32
    assert [(s["layer"], s["site"], s["width"]) for s in manifest["sites"]] == [
        (1, "resid", 64),
        (1, "mlp", 64),
        (2, "resid", 64),
        (2, "mlp", 64),
    ]
    assert manifest["model"] == str(saved_lm[0].resolve()) and manifest["excluded_token_ids"] == [PAD, BOS]
    assert manifest["windows"] == 59 and manifest["tokens"] == 59 * 31  # ceil(1800 / 31) windows, BOS dropped
    assert len(manifest["shards"]) == 6 and all(s["windows"] <= 11 for s in manifest["shards"])
    assert not (cache / "harvest_state.json").exists()

    ds = datasets.load_from_disk(str(cache))
    assert len(ds) == manifest["tokens"]
    assert ds.column_names == [
        "layer_1.resid",
        "layer_1.mlp",
        "layer_2.resid",
        "layer_2.mlp",
        "window",
        "position",
        "token",
    ]
    bits = np.asarray(ds.with_format("numpy")[:100]["layer_2.resid"]).astype(np.uint16)
    mapped = ac.ActivationCache(cache).site_rows((2, "resid"), 0, 100)
    assert torch.equal(torch.from_numpy(bits).view(torch.bfloat16), mapped)

    windows = datasets.load_from_disk(str(cache / "windows"))
    assert len(windows) == manifest["windows"] and windows[0]["input_ids"][0] == BOS
    rows = ds.select(range(0, len(ds), 97))[:]
    for window, position, token in zip(rows["window"], rows["position"], rows["token"]):
        assert windows[window]["input_ids"][position] == token and position >= 1  # BOS is never a row


def test_rows_are_the_harvesters_activations_of_the_training_windows(fp32_cache, cache, load_saved_lm, saved_lm):
    """The windows are training's packing of the same documents (held-out ones left out), each row is the
    harvester's activation of its (window, position), and the bf16 cache is the fp32 one rounded."""
    model, tokenizer = load_saved_lm()
    cfg, _ = parse_args(["--model", str(saved_lm[0]), "--dataset", str(saved_lm[1]), "--eval-holdout-documents", "5"])
    train_data, _ = dataset_factories(cfg, 0, 1)
    stream = TokenWindows(train_data, tokenizer, 32, loop=False)
    windows = datasets.load_from_disk(str(fp32_cache / "windows")).with_format("torch")[:]
    ids = windows["input_ids"].long()
    expected_ids, mask = stream.next_batch(len(ids))
    assert torch.equal(ids, expected_ids) and windows["length"].tolist() == mask.sum(1).tolist()

    sites = [resolve_site(model, layer, site) for layer in (1, 2) for site in ("resid", "mlp")]
    expected = ActivationHarvester(model, sites, [PAD, BOS])(ids, mask)
    fp32, bf16 = ac.ActivationCache(fp32_cache), ac.ActivationCache(cache)
    for site in sites:
        got = fp32.site_rows(site.key)
        torch.testing.assert_close(got, expected[site.key], rtol=1e-5, atol=1e-5)
        assert torch.equal(got.to(torch.bfloat16), bf16.site_rows(site.key))  # bf16 storage: the fp32 rounded

    # document boundaries: a document starts after every EOS (and at the first text token)
    starts = windows["document_starts"]
    assert starts[0].tolist()[0] == 1
    for row, length, begun in zip(ids.tolist(), windows["length"].tolist(), starts):
        after_eos = [p + 1 for p in range(1, length - 1) if row[p] == EOS]
        assert set(after_eos) <= set(begun.tolist())


def test_the_reader_maps_the_shards_without_copying_them(cache):
    before = pa.total_allocated_bytes()
    opened = ac.ActivationCache(cache)
    view = opened.batch_view(3, (1, "mlp"))
    shard, local = opened._batch_shard[3]
    column = opened._batches(shard)[local].column("layer_1.mlp")
    assert view.data_ptr() == column.values.buffers()[1].address  # a view of the memory-mapped file
    assert pa.total_allocated_bytes() == before  # pyarrow allocated nothing: the shards are not in RAM
    reader = ac.CachedActivations(opened, [(1, "mlp")], buffer_size=512, batch_size=64)
    reader.next_batch()
    assert reader._current.rows <= 512  # only one window of rows is in memory


# ------------------------------------------------------------------------------------------------------ resume
KILLER = """
import os, signal, sys
import training.activation_cache as ac
calls = [0]
original = getattr(ac.{owner}, "{method}")
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {when}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(ac.{owner}, "{method}", killing)
ac.main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "owner, method, when",
    [
        ("_ArrowShard", "write", 9),  # inside the third shard (a record batch per LM batch, 3 per shard)
        ("_Harvest", "_save_state", 3),  # the second shard is in place, the state that says so is not
        ("_ArrowShard", "close", 12),  # the last shard's windows file is being finished
    ],
)
def test_a_harvest_killed_anywhere_resumes_to_the_same_bytes(cache, harvest_args, tmp_path, owner, method, when):
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = KILLER.format(owner=owner, method=method, when=when)
    proc = subprocess.run(
        [sys.executable, "-c", script, *harvest_args(killed)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "harvest_state.json").is_file() and not (killed / "manifest.json").exists()
    with pytest.raises(ac.ActivationCacheError, match="is an unfinished harvest .* --resume"):
        ac.read_manifest(killed)
    with pytest.raises(ac.ActivationCacheError, match=r"holds an unfinished harvest \(data-.*\); continue it with"):
        harvest(harvest_args(killed))

    harvest(["--resume", str(killed)])
    assert folder_hashes(killed) == folder_hashes(cache)


def test_resuming_with_other_options_is_refused_and_a_finished_cache_is_left_alone(cache, harvest_args, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    (partial / "manifest.json").unlink()
    state = {"options": json.loads((cache / "manifest.json").read_text())["options"], "shards": []}
    (partial / "harvest_state.json").write_text(json.dumps(state))
    with pytest.raises(
        ac.ActivationCacheError, match=r"other options \(--tokens: the harvest has 1800, you passed 999"
    ):
        harvest(["--resume", str(partial), "--tokens", "999"])
    with pytest.raises(ac.ActivationCacheError, match="--layer/--site"):
        harvest(["--resume", str(partial), "--layer", "3"])
    before = folder_hashes(cache)
    assert harvest(["--resume", str(cache)]) == cache and folder_hashes(cache) == before


def test_a_harvest_stops_where_the_data_ends_and_names_its_shards_by_the_real_count(harvest_args, saved_lm, tmp_path):
    docs = tmp_path / "few.jsonl"
    docs.write_text("".join(saved_lm[1].read_text().splitlines(keepends=True)[:8]))  # 5 held out, 3 harvested
    out = harvest(harvest_args(tmp_path / "short", dataset=docs, tokens=10**6, shard_tokens=31 * 8))
    manifest = json.loads((out / "manifest.json").read_text())
    count = len(manifest["shards"])
    assert manifest["data_ended"] and manifest["tokens"] < 10**6
    assert sorted(p.name for p in out.glob("data-*.arrow")) == [ac.shard_name(i, count) for i in range(count)]
    assert len(datasets.load_from_disk(str(out))) == manifest["tokens"]


def test_an_existing_folder_is_refused_without_overwrite(cache, harvest_args, tmp_path):
    with pytest.raises(ac.ActivationCacheError, match="already holds files .* --overwrite"):
        harvest(harvest_args(cache))
    with pytest.raises(TrainConfigError, match="--dtype must be one of bfloat16, float16, float32"):
        harvest(harvest_args(tmp_path / "x", dtype="int8"))


# ------------------------------------------------------------------------------------------- the run and the cache
def test_a_cache_that_is_not_the_runs_is_refused_in_one_line(cache, tmp_path, capsys):
    with pytest.raises(TrainConfigError, match=r"was harvested from .*model .* but --model is .*Drop --model"):
        parse_args(["--activations", str(cache), "--model", "embedded"])
    with pytest.raises(TrainConfigError, match=r"reads layer 3 resid, but --activations .* holds layer 1 resid"):
        parse_args(["--activations", str(cache), "--layer", "3"])
    with pytest.raises(TrainConfigError, match="--tokens and --epochs"):
        parse_args(["--activations", str(cache), "--tokens", "100", "--epochs", "2"])
    with pytest.raises(TrainConfigError, match="--epochs counts passes over an activation cache"):
        parse_args(["--epochs", "2"])
    with pytest.raises(ac.ActivationCacheError, match="no manifest.json there, so it is not an activation cache"):
        parse_args(["--activations", str(tmp_path)])

    # a cache whose site has another width than the run's model (the same name, another shape)
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["sites"][0]["width"] = 32
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--activations", str(other), "--layer", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "layer 1 resid is 32 wide in the cache" in err and "but 64 wide in the run's model" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_training_from_the_cache_runs_epochs_and_resumes_bit_exactly(cache, tmp_path, monkeypatch):
    """Two SAEs (of the cache's four sites) over two epochs; killed at step 15 and resumed: the weights of an
    uninterrupted run."""
    common = ["--activations", str(cache), "--sae", "layer=1,site=mlp", "--sae", "layer=2,site=resid"]
    common += ["--d-sae", "64", "--k", "4", "--batch-size", "128", "--buffer-size", "512", "--epochs", "2"]
    common += ["--checkpoint-every", "10", "--eval-tokens", "300", "--eval-lm-windows", "2", "--log-every", "5"]
    uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
    metrics = run([*common, "--out", str(uninterrupted)])
    steps = -(-2 * 59 * 31 // 128)
    assert metrics["run"]["tokens"] == steps * 128 and set(metrics["saes"]) == {
        "L1_mlp_hierarchical_k4_d64",
        "L2_resid_hierarchical_k4_d64",
    }
    state = torch.load(ckpt.latest_checkpoint(uninterrupted) / "process_states.pt", weights_only=True)
    assert state[0]["buffer"]["epoch"] == 2  # 29 x 128 rows: round the cache twice and into a third time

    step, calls = train_module.training_step, [0]

    def failing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 15:
            raise RuntimeError("stopped at step 15")
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="stopped at step 15"):
        run([*common, "--out", str(interrupted)])
    monkeypatch.setattr(train_module, "training_step", step)
    assert ckpt.latest_checkpoint(interrupted).name == "step-00000010"
    run(["--resume", str(interrupted)])
    for name in metrics["saes"]:
        a = load_file(uninterrupted / name / "model.safetensors")
        b = load_file(interrupted / name / "model.safetensors")
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_a_run_on_a_cache_takes_its_model_data_and_sites(cache, saved_lm):
    cfg, _ = parse_args(["--activations", str(cache)])
    assert cfg.model == str(saved_lm[0].resolve()) and cfg.dataset == str(saved_lm[1].resolve())
    assert cfg.context_length == 32 and cfg.eval_holdout_documents == 5 and cfg.excluded_token_ids == [PAD, BOS]
    assert [(s.layer, s.site) for s in cfg.saes] == [(1, "resid"), (1, "mlp"), (2, "resid"), (2, "mlp")]
    assert cfg.tokens == 59 * 31  # one epoch
    cfg, _ = parse_args(["--activations", str(cache), "--epochs", "2.5", "--site", "mlp", "--layer", "2"])
    assert cfg.tokens == math.ceil(2.5 * 59 * 31) and [(s.layer, s.site) for s in cfg.saes] == [(2, "mlp")]


# --------------------------------------------------------------------------------------- shuffling and sharding
@pytest.fixture(scope="module")
def numbered_cache(tmp_path_factory) -> Path:
    """A synthetic cache whose row i holds the value i (exact in float32), in 3 shards of record batches of 300."""
    rows = 2000
    x = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 4)
    return ac.write_synthetic_cache(
        tmp_path_factory.mktemp("numbered") / "c", {(0, "resid"): x}, "float32", rows_per_shard=700, rows_per_batch=300
    )


def test_processes_read_disjoint_parts_that_cover_the_cache_in_every_epoch(numbered_cache):
    cache = ac.ActivationCache(numbered_cache)
    readers = [
        ac.CachedActivations(cache, [(0, "resid")], buffer_size=512, batch_size=1, seed=3, rank=r, world=2)
        for r in range(2)
    ]
    orders = []
    for epoch in range(2):
        parts = []
        for reader in readers:
            mine = int(reader.chunk["rows"][reader._chunks_of_epoch(epoch)].sum())
            parts.append([int(reader.next_batch()[(0, "resid")][0, 0]) for _ in range(mine)])
            assert reader.epoch == epoch  # exactly one epoch drawn (the next batch starts epoch + 1)
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == list(range(2000))
        assert abs(len(parts[0]) - len(parts[1])) <= 256  # at most a chunk apart
        orders.append(parts[0])
    assert orders[0] != orders[1]  # a new shuffle each epoch
    first = orders[0][: readers[0]._window_at((0, 0)).rows]  # one window mixes rows of several shards, shuffled
    assert len({row // 700 for row in first}) >= 2 and first != sorted(first)


def test_the_reader_resumes_bit_exactly_from_its_state_and_batches_span_windows(numbered_cache):
    cache = ac.ActivationCache(numbered_cache)
    make = lambda: ac.CachedActivations(cache, [(0, "resid")], buffer_size=256, batch_size=100, seed=1)  # noqa: E731
    reference = make()
    batches = [reference.next_batch()[(0, "resid")] for _ in range(50)]  # 5000 rows: 2.5 epochs, windows of 256
    assert all(b.shape == (100, 4) for b in batches)
    resumed = make()
    for batch in batches[:17]:
        assert torch.equal(resumed.next_batch()[(0, "resid")], batch)
    state = resumed.state()
    fresh = make()
    fresh.load_state(state)
    assert torch.equal(fresh.peek(150)[(0, "resid")], torch.cat(batches[17:19])[:150])
    for batch in batches[17:]:
        assert torch.equal(fresh.next_batch()[(0, "resid")], batch)
    other = ac.write_synthetic_cache(numbered_cache.parent / "other", {(0, "resid"): torch.zeros(300, 4)}, "float32")
    with pytest.raises(ac.ActivationCacheError, match="is not the cache this run was trained on"):
        ac.CachedActivations(ac.ActivationCache(other), [(0, "resid")], 64, 32).load_state(state)


def test_a_prefetching_reader_gives_the_same_batches(numbered_cache):
    cache = ac.ActivationCache(numbered_cache)
    plain = ac.CachedActivations(cache, [(0, "resid")], buffer_size=256, batch_size=96, seed=2)
    ahead = ac.CachedActivations(cache, [(0, "resid")], buffer_size=256, batch_size=96, seed=2, prefetch=True)
    for _ in range(40):
        assert torch.equal(plain.next_batch()[(0, "resid")], ahead.next_batch()[(0, "resid")])
    ahead.close()


@pytest.mark.slow
def test_two_processes_train_from_one_cache(cache, tmp_path):
    """torchrun, 2 gloo ranks: each reads its own part of the cache, only rank 0 writes, and it resumes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training.train"]
    args = ["--activations", str(cache), "--layer", "2", "--site", "resid", "--d-sae", "64", "--k", "4"]
    args += ["--batch-size", "64", "--buffer-size", "512", "--checkpoint-every", "5", "--eval-lm-windows", "0"]
    proc = subprocess.run([*command, *args, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["processes"] == 2 and metrics["run"]["tokens"] == -(-59 * 31 // 128) * 128
    state = torch.load(ckpt.latest_checkpoint(out) / "process_states.pt", weights_only=True)
    assert [s["buffer"]["rank"] for s in state] == [0, 1] and state[0]["buffer"]["world"] == 2
    (ckpt.latest_checkpoint(out)).rename(out / "checkpoints" / "step-99999999-removed")
    proc = subprocess.run([*command, "--resume", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

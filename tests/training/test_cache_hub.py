"""An activation cache on the Hub (training.cache_hub): pushed as a dataset repo with a generated card, pulled back
as the same cache, through the local Hub (push server + olah) with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import DatasetCard, HfApi

from hf_sae.errors import HfSaeError
from hf_sae.testing.hub_server import LocalHub, hub_client
from training import activation_cache as ac
from training.cache_hub import main as cache_hub_main
from training.cache_hub import pull_activation_cache, push_activation_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(saved_lm, tmp_path_factory) -> Path:
    """A small real harvest of the tiny LM: layers 1 and 2 at resid and mlp, two shards, bfloat16, with windows."""
    model_dir, docs = saved_lm
    args = ["--model", str(model_dir), "--dataset", str(docs), "--eval-holdout-documents", "5", "--layer", "1", "2"]
    args += ["--site", "resid", "mlp", "--context-length", "32", "--lm-batch-size", "4", "--lm-dtype", "float32"]
    args += ["--tokens", "600", "--shard-tokens", "320", "--out", str(tmp_path_factory.mktemp("acts") / "cache")]
    values, explicit = ac.parse_harvest_args(args)
    return ac.harvest(values, explicit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, olah_cli):
    with LocalHub(tmp_path_factory.mktemp("hub"), olah_cli=olah_cli) as local_hub:
        yield local_hub


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(folder).parts and p.name not in ("README.md", ".gitattributes")
    }


def test_a_cache_pushes_as_a_dataset_with_a_card_and_pulls_back_byte_identical(cache, hub, tmp_path):
    manifest = json.loads((cache / "manifest.json").read_text())
    with hub_client(hub.push_url, tmp_path / "hf-cache"):
        commit = push_activation_cache(cache, "me/tiny-acts")
    assert len(commit.oid) == 40 and len(hub.push.commits) >= 1
    with hub_client(hub.pull_url, tmp_path / "hf-cache"):
        files = HfApi().list_repo_files("me/tiny-acts", repo_type="dataset")
        card = DatasetCard.load("me/tiny-acts")
        pulled = pull_activation_cache("me/tiny-acts", tmp_path / "pulled")
    assert {"manifest.json", "README.md", "dataset_info.json", "windows/state.json"} <= set(files)
    assert _hashes(pulled) == _hashes(cache)  # every shard, windows file and datasets file as harvested
    # the card says what the activations are: model, sites, tokens, dtype
    assert {"hf-sae", "activation-cache"} <= set(card.data.tags)
    assert [c["config_name"] for c in card.data.configs] == ["activations", "windows"]
    assert manifest["model_name"] in card.text and f"{manifest['tokens']:,} activations per site" in card.text
    assert f"| dtype | bfloat16 (stored as {manifest['dtype_storage']}) |" in card.text
    for site in manifest["sites"]:
        assert f"| {site['layer']} | `{site['site']}` | {site['width']} | `{site['column']}` |" in card.text
    # the pulled folder is a cache: the reader and datasets take it as they take the original
    original, copy = ac.ActivationCache(cache), ac.ActivationCache(pulled)
    for key in [(1, "resid"), (2, "mlp")]:
        assert torch.equal(original.site_rows(key), copy.site_rows(key))
    assert datasets.load_from_disk(str(pulled)).num_rows == manifest["tokens"]


def test_a_pulled_cache_whose_shard_changed_is_refused(cache, hub, tmp_path):
    with hub_client(hub.push_url, tmp_path / "hf-cache"):
        push_activation_cache(cache, "me/tampered-acts")
        shard = json.loads((cache / "manifest.json").read_text())["shards"][0]["file"]
        HfApi().upload_file(
            path_or_fileobj=b"not the shard", path_in_repo=shard, repo_id="me/tampered-acts", repo_type="dataset"
        )
    with hub_client(hub.pull_url, tmp_path / "hf-cache"), pytest.raises(HfSaeError, match="sha256"):
        pull_activation_cache("me/tampered-acts", tmp_path / "pulled")


def test_the_command_line_pushes_and_pulls_and_refuses_a_folder_that_is_no_cache(cache, hub, tmp_path, capsys):
    with hub_client(hub.push_url, tmp_path / "hf-cache"):
        assert cache_hub_main(["push", str(cache), "me/cli-acts"]) == 0
        assert cache_hub_main(["push", str(tmp_path), "me/cli-acts"]) == 2
    assert "pushed" in capsys.readouterr().out
    with hub_client(hub.pull_url, tmp_path / "hf-cache"):
        assert cache_hub_main(["pull", "me/cli-acts", str(tmp_path / "copy")]) == 0
        assert cache_hub_main(["pull", "me/no-such-acts", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-sae: error: ") and "me/no-such-acts" in err[-1]
    assert (tmp_path / "copy" / "manifest.json").is_file()

"""An activation cache (:mod:`training.activation_cache`) on the Hub: pushed as a dataset repo, pulled back as a cache.

    python -m training.cache_hub push acts/g2b me/g2b-acts [--private] [--revision BRANCH]
    python -m training.cache_hub pull me/g2b-acts acts/g2b-copy [--revision REV]
    hf-sae activations push|pull ...                   (the same commands)

The repo holds the cache folder as it is (Arrow shards, ``windows/``, the ``datasets`` files, ``manifest.json``) and a
generated dataset card (``README.md``: the model, the sites with their widths, the tokens, the storage dtype, the
data set, and how to load it), all in one commit. The pushed folder is a cache again once pulled: ``pull`` downloads
it (every file, or nothing new when the local copy is current), checks every shard against the sha256 the manifest
records, and returns a folder ``python -m training.train --activations`` and ``datasets.load_from_disk`` read.
The card's ``configs`` let ``datasets.load_dataset(repo)`` read the activations (and ``name="windows"`` the windows)
straight from the Hub too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, snapshot_download

from hf_sae._io import sha256_of
from hf_sae.cli import error_line
from hf_sae.errors import HfSaeError, HubError

from .activation_cache import LOCK, MANIFEST, PROGRESS, WINDOWS, ActivationCacheError, read_manifest

CARD = "README.md"


def _site_rows(manifest: dict[str, Any]) -> str:
    return "\n".join(f"| {s['layer']} | `{s['site']}` | {s['width']} | `{s['column']}` |" for s in manifest["sites"])


def activation_cache_card(manifest: dict[str, Any], repo_id: str) -> DatasetCard:
    """The dataset card of a cache: YAML (tags, the base model, ``configs`` for ``load_dataset``) and a body saying
    what the activations are (model, sites, tokens, dtype, data) and how to use them."""
    model = manifest.get("model_name") or manifest.get("model")
    sites = ", ".join(f"layer {s['layer']} {s['site']}" for s in manifest["sites"])
    has_windows = any("windows_file" in shard for shard in manifest["shards"])
    configs = [{"config_name": "activations", "data_files": "data-*.arrow", "default": True}]
    if has_windows:
        configs.append({"config_name": "windows", "data_files": f"{WINDOWS}/data-*.arrow"})
    header = {
        "tags": ["hf-sae", "activation-cache", "sparse-autoencoder", "interpretability"],
        "configs": configs,
    }
    if model and "/" in str(model) and not Path(str(model)).exists():
        header["base_model"] = str(model)
    gib = sum(shard["bytes"] for shard in manifest["shards"]) / 2**30
    data = f"`{manifest.get('dataset_name') or manifest.get('dataset')}`"
    if manifest.get("dataset_config"):
        data += f" ({manifest['dataset_config']})"
    excluded = "BOS, padding" + (
        f", ids {manifest['excluded_token_ids']}" if manifest.get("excluded_token_ids") else ""
    )
    windows = f"{manifest.get('windows', 0):,} windows of {manifest['context_length']} tokens"
    body = f"""
# Activations of {model}: {sites}

An hf-sae activation cache: the language model run once over a data set, its activations at each site stored for
training sparse autoencoders without the model in the loop.

| | |
|---|---|
| model | `{model}` (revision `{manifest.get("revision") or "unknown"}`, run in {manifest.get("lm_dtype") or "?"}) |
| sites | {len(manifest["sites"])}: {sites} |
| tokens | {manifest["tokens"]:,} activations per site ({windows}) |
| dtype | {manifest["dtype"]} (stored as {manifest["dtype_storage"]}) |
| data | {data}, split `{manifest.get("split", "?")}` |
| excluded tokens | {excluded} |
| files | {len(manifest["shards"])} shard(s), {gib:.2f} GiB; `manifest.json` records every shard's rows and sha256 |

## Sites

| layer | site | width | column |
|---|---|---|---|
{_site_rows(manifest)}

## Use

```bash
python -m training.cache_hub pull {repo_id} acts/local      # checks every shard's sha256
python -m training.train --activations acts/local            # train SAEs of these sites from it
```

```python
import datasets
ds = datasets.load_from_disk("acts/local")                   # memory-mapped rows, one per token
ds = datasets.load_dataset("{repo_id}", split="train")       # or straight from the Hub
```

bfloat16 columns hold the uint16 bit patterns of the values (Arrow has no bfloat16): view them with
`torch.from_numpy(np.asarray(rows).astype(np.uint16)).view(torch.bfloat16)`.
"""
    return DatasetCard(f"---\n{_yaml(header)}---\n{body}")


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def _cache_files(folder: Path) -> list[Path]:
    """The files that make the cache: not the lock, temporaries of a killed write, or the download metadata
    (``.cache/``) a pulled copy holds."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK and ".tmp" not in p.name and ".cache" not in p.relative_to(folder).parts
    )


def push_activation_cache(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Push a finished cache to the dataset repo ``repo_id`` (created if missing) with its card, in one commit.
    Returns the commit info."""
    folder = Path(folder)
    manifest = read_manifest(folder, option="push")
    if (folder / PROGRESS).exists():
        raise ActivationCacheError(f"push {folder}: the harvest is unfinished; finish it with --resume first.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(p.relative_to(folder).as_posix(), str(p))
            for p in _cache_files(folder)
            if p.relative_to(folder).as_posix() != CARD
        ]
        card = activation_cache_card(manifest, repo_id)
        operations.append(CommitOperationAdd(CARD, str(card).encode()))
        return api.create_commit(
            repo_id,
            operations,
            repo_type="dataset",
            revision=revision,
            commit_message=commit_message
            or f"hf-sae activation cache: {manifest['tokens']:,} tokens x {len(manifest['sites'])} site(s)",
        )
    except HfSaeError:
        raise
    except Exception as err:
        raise HubError(f"pushing the cache {folder} to the dataset repo {repo_id} failed: {err}") from err


def pull_activation_cache(
    repo_id: str, out: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> Path:
    """Download the cache in the dataset repo ``repo_id`` into ``out``, check every shard against the manifest's
    sha256, and return ``out`` (a cache ``--activations`` reads)."""
    out = Path(out)
    try:
        snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=out, token=token)
    except Exception as err:
        raise HubError(
            f"cannot download the dataset repo {repo_id}{'@' + revision if revision else ''}: {err}. Check the "
            "repo id (and HF_ENDPOINT / HF_TOKEN)."
        ) from err
    if not (out / MANIFEST).is_file():
        raise ActivationCacheError(f"{repo_id}: the repo has no {MANIFEST}, so it holds no hf-sae activation cache.")
    manifest = read_manifest(out, option=f"pull {repo_id} ->")
    for shard in manifest["shards"]:
        for key, name in (("sha256", shard["file"]), ("windows_sha256", shard.get("windows_file"))):
            if name is None or key not in shard:
                continue
            path = out / name
            if not path.is_file() or sha256_of(path) != shard[key]:
                raise ActivationCacheError(
                    f"pull {repo_id}: {path} is missing or does not match the sha256 in {MANIFEST}; the download is "
                    "incomplete or the repo was changed by hand. Delete the folder and pull again."
                )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m training.cache_hub {push,pull}`` (and ``hf-sae activations``)."""
    parser = argparse.ArgumentParser(
        prog="hf-sae activations",
        description="Push an activation cache to the Hub as a dataset repo (with a generated card), or pull one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="push a finished cache as a Hub dataset with a generated card")
    push.add_argument("folder", metavar="DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--message", help="commit message")
    pull = sub.add_parser("pull", help="download a cache pushed by `push` and check its shards")
    pull.add_argument("repo_id", metavar="REPO_ID")
    pull.add_argument("out", metavar="OUT")
    pull.add_argument("--revision")
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            commit = push_activation_cache(
                args.folder,
                args.repo_id,
                revision=args.revision,
                private=args.private or None,
                commit_message=args.message,
            )
            print(f"pushed {args.folder} -> dataset {args.repo_id}@{commit.oid}  {commit.commit_url}")
        else:
            out = pull_activation_cache(args.repo_id, args.out, revision=args.revision)
            print(
                f"pulled dataset {args.repo_id} -> {out}; train from it: python -m training.train --activations {out}"
            )
    except HfSaeError as error:
        print(error_line(error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

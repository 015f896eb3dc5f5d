"""Loading hf-sae SAEs, and saying exactly why a load failed.

Loading goes through ``transformers.AutoModel`` (``import hf_sae`` registers every architecture). When it fails,
:func:`explain_load_failure` turns transformers' generic ``OSError`` into an :class:`SAEHubError` that names the
repo, the revision, the endpoint and the state of the local cache, and says which converter to run when the folder
is a SAELens, sparsify or Gemma Scope layout rather than an hf-sae one.

    load_sae("me/gemma-2-2b-saes", subfolder="layer_12/resid", revision="v1")

This module sits below the models (``SAEPreTrainedModel.from_pretrained`` asks it to explain failures), so it knows
no model class: :func:`load_sae` asks ``AutoModel``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import get_session
from transformers import AutoModel

from .errors import SAEConfigError, SAEHubError, SAELoadError


def detect_layout(files: Sequence[str], subfolder: str | None = None) -> tuple[str, list[str]]:
    """What a repo/folder holds, from its file list (paths relative to the repo root).

    Returns (kind, where): kind is ``"hf-sae"`` (config.json + model.safetensors at ``subfolder``),
    ``"hf-sae-collection"`` (such SAEs in subfolders), ``"sae-lens"``, ``"sparsify"``, ``"gemma-scope"``,
    ``"pickle"`` (PyTorch .bin/.pt weights, never loaded) or ``"unknown"``; ``where`` lists the folders (relative to
    ``subfolder``) where that layout was found (for ``"pickle"``: the pickled files).
    """
    prefix = (subfolder.strip("/") + "/") if subfolder else ""
    rel = [f[len(prefix) :] for f in files if f.startswith(prefix)]
    folders: dict[str, set[str]] = {}
    for f in rel:
        head, _, name = f.rpartition("/")
        folders.setdefault(head, set()).add(name)

    def where(*names: str) -> list[str]:
        return sorted(d for d, contents in folders.items() if all(n in contents for n in names))

    if {"config.json", "model.safetensors"} <= folders.get("", set()):
        return "hf-sae", [""]
    for kind, names in (
        ("gemma-scope", ("params.npz",)),
        ("sae-lens", ("cfg.json", "sae_weights.safetensors")),
        ("sparsify", ("cfg.json", "sae.safetensors")),
    ):
        if found := where(*names):
            return kind, found
    if found := [d for d in where("config.json", "model.safetensors") if d]:
        return "hf-sae-collection", found
    if found := sorted(f for f in rel if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))):
        return "pickle", found
    return "unknown", []


_CONVERTERS = {
    "sae-lens": ("hf_sae.convert.from_sae_lens({path!r})", "hf-sae convert sae-lens {src} OUT"),
    "sparsify": ("hf_sae.convert.from_sparsify({path!r})", "hf-sae convert sparsify {src} OUT"),
    "gemma-scope": ("hf_sae.convert.from_gemma_scope({repo!r}, {sub!r})", "hf-sae convert gemma-scope {src} OUT"),
}


def describe_cache(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str:
    """One sentence on what the local Hub cache holds for ``repo_id`` (for error messages)."""
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    repo_cache = cache / f"models--{repo_id.replace('/', '--')}"
    if not (repo_cache / "snapshots").is_dir():
        return f"the local cache ({cache}) has no copy of {repo_id}"
    refs = {}
    if (repo_cache / "refs").is_dir():
        refs = {
            p.relative_to(repo_cache / "refs").as_posix(): p.read_text().strip()[:8]
            for p in (repo_cache / "refs").rglob("*")
            if p.is_file()
        }
    snapshots = sorted(p.name[:8] for p in (repo_cache / "snapshots").iterdir())
    text = f"the local cache ({cache}) holds {len(snapshots)} snapshot(s) of {repo_id} ({', '.join(snapshots)}"
    text += f"; refs {', '.join(f'{k}->{v}' for k, v in sorted(refs.items()))})" if refs else ")"
    if revision and revision not in refs and not any(revision.startswith(s) for s in snapshots):
        text += f" but not revision {revision!r}"
    return text


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _connection_failure(error: BaseException | None) -> str | None:
    """The network error behind ``error`` (walking its causes), as one line; None if it is not one."""
    network: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    for module in ("httpx2", "httpx", "requests"):  # huggingface_hub 2.x uses httpx2, 1.x httpx, 0.x requests
        try:
            imported = __import__(module)
        except ImportError:
            continue
        network += tuple(getattr(imported, n) for n in ("TransportError", "ConnectionError") if hasattr(imported, n))
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, network):
            return _one_line(error)
        error = error.__cause__ or error.__context__
    return None


def _refs(repo_id: str) -> list[str] | None:
    """The repo's branch and tag names (None if the repo cannot be listed)."""
    try:
        refs = HfApi().list_repo_refs(repo_id)
    except Exception:
        return None
    return sorted({ref.name for ref in (*refs.branches, *refs.tags)})


def _probe(endpoint: str) -> str | None:
    """One request to the endpoint, no retries: None if it answers at all, else the error."""
    try:
        get_session().get(f"{endpoint}/api/whoami-v2", timeout=5)
    except Exception as err:
        return _one_line(err)
    return None


def _converter_hint(kind: str, where: list[str], name: str, subfolder: str | None) -> str:
    sub = "/".join(p for p in (subfolder or "", where[0] if where else "") if p)
    is_local = Path(name).exists()
    path = str(Path(name) / sub) if is_local else f"{name}" + (f" (subfolder {sub})" if sub else "")
    python, shell = _CONVERTERS[kind]
    shown = ", ".join(where[:5]) + (", ..." if len(where) > 5 else "")
    call = python.format(path=str(Path(name) / sub) if is_local else name, repo=name, sub=sub)
    if kind == "sae-lens" and not is_local:
        call = f"hf_sae.convert.from_sae_lens({name!r}, subfolder={sub!r})"
    if kind == "sparsify" and not is_local:
        call = f"hf_sae.convert.from_sparsify({name!r}, hookpoint={sub!r})"
    return (
        f"{path} is a {kind} layout (found in: {shown or '.'}), not an hf-sae SAE. Convert it first: "
        f"sae = {call}, or from the shell `{shell.format(src=name)}`; then save_pretrained / push the result."
    )


def explain_load_failure(
    name_or_path: str | os.PathLike,
    error: BaseException | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
) -> SAEHubError | None:
    """An :class:`SAEHubError` explaining why ``name_or_path`` did not load, or None when there is nothing to add.

    Looks at the folder (or asks the Hub for the repo's file list, unless offline) and names: a repo, revision or
    subfolder that does not exist; offline mode or an unreachable endpoint with the state of the local cache; a
    SAELens / sparsify / Gemma Scope layout and the converter to run; a collection root and its subfolders; pickled
    weights (never loaded).
    """
    name = str(name_or_path)
    where = (
        name + (f" (subfolder {subfolder!r})" if subfolder else "") + (f" at revision {revision!r}" if revision else "")
    )
    local = Path(name)
    if local.is_dir():
        files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and ".git" not in p.parts]
        if subfolder and not (local / subfolder).is_dir():
            kind, found = detect_layout(files)
            extra = f"; SAEs found in: {', '.join(found[:10])}" if kind == "hf-sae-collection" else ""
            return SAEHubError(f"{local}: has no subfolder {subfolder!r}{extra}.")
    elif local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        if local.exists():
            return SAEHubError(
                f"{name} is a file, not a folder: pass the folder holding config.json and model.safetensors."
            )
        return SAEHubError(f"{name}: no such local folder, and not a Hub repo id ('namespace/name').")
    else:
        cache = describe_cache(name, revision)
        if constants.HF_HUB_OFFLINE:
            return SAEHubError(
                f"{where} cannot be loaded: offline mode is on (HF_HUB_OFFLINE=1), so only the local cache is used, "
                f"and {cache}. Unset HF_HUB_OFFLINE to download it from {constants.ENDPOINT}, or copy the SAE folder "
                "locally and pass its path."
            )
        unreachable = _connection_failure(error) or _probe(constants.ENDPOINT)
        if unreachable:
            return SAEHubError(
                f"{where} cannot be loaded: the Hub at {constants.ENDPOINT} did not answer ({unreachable}); {cache}. "
                "Check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a cached copy."
            )
        try:
            files = HfApi().list_repo_files(name, revision=revision)
        except RepositoryNotFoundError:
            refs = _refs(name) if revision else None
            if refs is not None:  # some servers answer a missing revision with RepoNotFound
                return SAEHubError(
                    f"{where}: the repo exists on {constants.ENDPOINT} but revision {revision!r} does not (branches "
                    f"and tags: {', '.join(refs) or 'none'}); {cache}."
                )
            return SAEHubError(
                f"{where}: no such repo on {constants.ENDPOINT} (or it is private and the token cannot see it); "
                f"{cache}. Check the repo id (namespace/name) and HF_TOKEN."
            )
        except RevisionNotFoundError:
            refs = _refs(name)
            return SAEHubError(
                f"{where}: the repo exists on {constants.ENDPOINT} but revision {revision!r} does not (branches and "
                f"tags: {', '.join(refs or []) or 'none'}); {cache}."
            )
        except Exception as err:  # the endpoint went away, TLS, proxy...
            return SAEHubError(
                f"{where} cannot be loaded: the Hub at {constants.ENDPOINT} did not answer ({_one_line(err)}); "
                f"{cache}. Check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a cached copy."
            )
    kind, found = detect_layout(files, subfolder)
    if subfolder and not any(f.startswith(subfolder.strip("/") + "/") for f in files):
        root_kind, root_found = detect_layout(files)
        available = f"; SAEs in this repo: {', '.join(root_found[:10])}" if root_kind == "hf-sae-collection" else ""
        return SAEHubError(f"{where}: the subfolder does not exist{available}.")
    if kind in _CONVERTERS:
        return SAEHubError(_converter_hint(kind, found, name, subfolder))
    if kind == "hf-sae-collection":
        return SAEHubError(
            f"{where} is an hf-sae collection, not a single SAE: pass subfolder=, one of {found[:20]}"
            f"{' ...' if len(found) > 20 else ''} (e.g. AutoModel.from_pretrained({name!r}, subfolder={found[0]!r}))."
        )
    if kind == "pickle":
        return SAEHubError(
            f"{where} holds pickled PyTorch weights ({', '.join(found)}), which hf-sae never loads (pickles can run "
            "code). Re-save the SAE as safetensors."
        )
    if kind == "unknown":
        shown = ", ".join(sorted(files)[:10]) or "no files"
        return SAEHubError(
            f"{where} is not an hf-sae SAE: expected config.json and model.safetensors, found {shown}. If it is a "
            "SAELens, sparsify or Gemma Scope SAE, use hf_sae.convert."
        )
    return None


def load_sae(name_or_path: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None, **kwargs):
    """``AutoModel.from_pretrained`` for hf-sae SAEs (a local folder or a Hub repo), with explained failures.

    Raises :class:`SAEHubError` (an ``OSError`` and an ``SAELoadError``) for a missing repo / revision / subfolder,
    no network or offline mode without a cached copy, or a peer-library layout (naming the converter); config and
    weight errors (``SAEConfigError``, ``SAELoadError``) pass through unchanged.
    """
    if subfolder:
        kwargs["subfolder"] = subfolder
    if revision:
        kwargs["revision"] = revision
    kwargs.setdefault("use_safetensors", True)  # never unpickle: a folder with only pytorch_model.bin is refused
    try:
        return AutoModel.from_pretrained(str(name_or_path), **kwargs)
    except (SAEConfigError, SAELoadError):
        raise
    except (OSError, ValueError, KeyError) as err:
        better = explain_load_failure(name_or_path, err, subfolder=subfolder, revision=revision)
        if better is None:
            raise
        raise better from err

"""Loading hf-sae SAEs, and saying exactly why a load failed.

Loading goes through ``transformers.AutoModel`` (``import hf_sae`` registers every architecture). When it fails,
:func:`explain_load_failure` turns transformers' generic ``OSError`` into an :class:`SAEHubError` that names the
repo, the revision, the endpoint and the state of the local cache, and says which converter to run when the folder
is a SAELens, sparsify or Gemma Scope layout rather than an hf-sae one.

    load_sae("me/gemma-2-2b-saes", subfolder="layer_12/resid", revision="v1")

This module sits below the models (``SAEPreTrainedModel.from_pretrained`` asks it to explain failures), so it knows
no model class: :func:`load_sae` asks ``AutoModel``.

``import hf_sae`` also makes ``transformers.AutoModel.from_pretrained`` explain the failures transformers itself
cannot (:func:`explain_auto_model_failures`, installed by :mod:`hf_sae.push`): a missing repo, revision or subfolder
named with the real endpoint (``HF_ENDPOINT``), offline mode without a cached copy, an hf-sae collection root, a
folder without config.json, a SAELens / sparsify / Gemma Scope layout. Any other failure keeps transformers' own
error. The replacement errors are :class:`SAEHubError`, both an ``OSError`` and a ``ValueError``, so code that
catches transformers' errors keeps working.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import get_session
from transformers import CONFIG_MAPPING, AutoModel, PreTrainedConfig

from .configuration_sae import SAEConfig
from .errors import HfSaeError, SAEConfigError, SAEHubError, SAELoadError


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
        text += f" but not revision {revision_text(revision)}"
    return text


def revision_text(revision: str | None) -> str:
    """A revision as messages show it: ``'v1'``, or ``'main' (commit 54fc7e83)`` for a revision huggingface_hub has
    already resolved (a ``ResolvedRevision``, whose repr would otherwise leak into the message)."""
    resolved = getattr(revision, "resolved", None)
    name = repr(str(revision) if revision is not None else "main")
    if resolved and resolved != str(revision):
        return f"{name} (commit {resolved[:8]})"
    return name


def describe_location(name: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """``me/saes (subfolder 'layer_12/resid') at revision 'v1'``: where a load looked, for messages."""
    return (
        str(name)
        + (f" (subfolder {subfolder!r})" if subfolder else "")
        + (f" at revision {revision_text(revision)}" if revision else "")
    )


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a failed connection (refused, DNS, TLS, timeout) in the HTTP clients huggingface_hub
    uses (2.x httpx2, 1.x httpx, 0.x requests); none of theirs is an ``OSError``."""
    found: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    for module in ("httpx2", "httpx", "requests"):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        found += tuple(getattr(imported, n) for n in ("TransportError", "ConnectionError") if hasattr(imported, n))
    return found


NETWORK_ERRORS = _network_errors()


def network_failure(error: BaseException | None) -> str | None:
    """The network error behind ``error`` (walking its causes), as one line; None if it is not one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NETWORK_ERRORS):
            return one_line(error)
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
        return one_line(err)
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


def _cached_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The files the local Hub cache holds of ``repo_id`` at ``revision`` (paths in the repo); None if none."""
    repo_cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    sha = getattr(revision, "resolved", None)
    if sha is None:
        ref = repo_cache / "refs" / (str(revision) if revision else "main")
        sha = ref.read_text().strip() if ref.is_file() else str(revision or "")
    snapshots = repo_cache / "snapshots"
    found = [p for p in snapshots.iterdir() if sha and p.name.startswith(sha)] if snapshots.is_dir() else []
    if len(found) != 1:
        return None
    return sorted(p.relative_to(found[0]).as_posix() for p in found[0].rglob("*") if p.is_file())


def _hub_files(name: str, revision: str | None, subfolder: str | None, error: BaseException | None, where: str):
    """The file list of a Hub repo (offline: of its cached snapshot), or the SAEHubError saying why there is none."""
    cache = describe_cache(name, revision)
    if constants.HF_HUB_OFFLINE:
        files = _cached_files(name, revision)
        prefix = subfolder.strip("/") + "/" if subfolder else ""
        if files is None or not any(f.startswith(prefix) for f in files):
            return SAEHubError(
                f"{where} cannot be loaded: offline mode is on (HF_HUB_OFFLINE=1), so only the local cache is used, "
                f"and {cache}. Unset HF_HUB_OFFLINE to download it from {constants.ENDPOINT}, or copy the folder "
                "locally and pass its path."
            )
        return files
    unreachable = network_failure(error) or _probe(constants.ENDPOINT)
    if unreachable:
        return SAEHubError(
            f"{where} cannot be loaded: the Hub at {constants.ENDPOINT} did not answer ({unreachable}); {cache}. "
            "Check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a cached copy."
        )
    try:
        return HfApi().list_repo_files(name, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        refs = _refs(name) if revision or isinstance(err, RevisionNotFoundError) else None
        if refs is not None:  # some servers answer a missing revision with RepoNotFound
            return SAEHubError(
                f"{where}: the repo exists on {constants.ENDPOINT} but revision {revision_text(revision)} does not "
                f"(branches and tags: {', '.join(refs) or 'none'}); {cache}."
            )
        return SAEHubError(
            f"{where}: no such repo on {constants.ENDPOINT} (or it is private and the token cannot see it); "
            f"{cache}. Check the repo id (namespace/name) and HF_TOKEN."
        )
    except Exception as err:  # the endpoint went away, TLS, proxy...
        return SAEHubError(
            f"{where} cannot be loaded: the Hub at {constants.ENDPOINT} did not answer ({one_line(err)}); "
            f"{cache}. Check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a cached copy."
        )


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_repo_id(name: str, any_model: bool) -> bool:
    """``namespace/name``; for any model also a bare name (the Hub's legacy canonical repos: ``gpt2``)."""
    return bool(_REPO_ID.match(name) or (any_model and re.fullmatch(r"[A-Za-z0-9][\w.-]*", name)))


def explain_load_failure(
    name_or_path: str | os.PathLike,
    error: BaseException | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    any_model: bool = False,
) -> SAEHubError | None:
    """An :class:`SAEHubError` explaining why ``name_or_path`` did not load, or None when there is nothing to add.

    Looks at the folder (or asks the Hub for the repo's file list; offline, the cached snapshot's) and names: a repo,
    revision or subfolder that does not exist; offline mode or an unreachable endpoint with the state of the local
    cache; a SAELens / sparsify / Gemma Scope layout and the converter to run; a collection root and its subfolders;
    a location without config.json; pickled weights (never loaded).

    A config error (``error`` an :class:`SAEConfigError`) where config.json exists is the config's own fault: None.
    ``any_model=True`` (``AutoModel.from_pretrained``, which loads any model) keeps quiet about what only matters for
    an SAE (pickled weights, a config.json without model.safetensors) and explains only locations and SAE layouts.
    """
    name = str(name_or_path)
    where = describe_location(name, subfolder, revision)
    local = Path(name)
    if local.is_dir():
        files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and ".git" not in p.parts]
        if subfolder and not (local / subfolder).is_dir():
            kind, found = detect_layout(files)
            extra = f"; SAEs found in: {', '.join(found[:10])}" if kind == "hf-sae-collection" else ""
            return SAEHubError(f"{local}: has no subfolder {subfolder!r}{extra}.")
    elif local.exists() or name.startswith((".", "/", "~")) or not _is_repo_id(name, any_model):
        if local.exists():
            return SAEHubError(
                f"{name} is a file, not a folder: pass the folder holding config.json and model.safetensors."
            )
        return SAEHubError(f"{name}: no such local folder, and not a Hub repo id ('namespace/name').")
    else:
        files = _hub_files(name, revision, subfolder, error, where)
        if isinstance(files, SAEHubError):
            return files
    prefix = subfolder.strip("/") + "/" if subfolder else ""
    here = {f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]}
    if "config.json" in here and (any_model or isinstance(error, SAEConfigError)):
        return None  # a config that exists: its own error (or transformers') says what is wrong with it
    kind, found = detect_layout(files, subfolder)
    shown = ", ".join(sorted(f[len(prefix) :] for f in files if f.startswith(prefix))[:10]) or "no files"
    if subfolder and not any(f.startswith(prefix) for f in files):
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
    if kind == "unknown" and "config.json" not in here:
        return SAEHubError(
            f"{where} has no config.json (found {shown}): it is neither a saved transformers model nor an hf-sae "
            "SAE (config.json + model.safetensors). Check the path or subfolder; if it is a SAELens, sparsify or "
            "Gemma Scope SAE, use hf_sae.convert."
        )
    if any_model:
        return None
    if kind == "pickle":
        return SAEHubError(
            f"{where} holds pickled PyTorch weights ({', '.join(found)}), which hf-sae never loads (pickles can run "
            "code). Re-save the SAE as safetensors."
        )
    if kind == "unknown":
        return SAEHubError(
            f"{where} is not an hf-sae SAE: expected config.json and model.safetensors, found {shown}. Save the SAE "
            "again with save_pretrained (it always writes model.safetensors)."
        )
    return None


# ------------------------------------------------------------------------------------------------- AutoModel
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "subfolder", "revision")
_auto_model_from_pretrained = getattr(
    AutoModel.from_pretrained, "_hf_sae_original", AutoModel.from_pretrained.__func__
)  # transformers' own, even if the wrapper below is installed already


def _explained_auto_model_from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
    try:
        return _auto_model_from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    except HfSaeError:
        raise
    except (OSError, ValueError) as err:
        better = explain_load_failure(
            pretrained_model_name_or_path,
            err,
            subfolder=kwargs.get("subfolder") or None,
            revision=kwargs.get("revision"),
            any_model=True,
        )
        if better is None:
            raise
        raise better from err


def explain_auto_model_failures() -> None:
    """Make ``transformers.AutoModel.from_pretrained`` raise :func:`explain_load_failure`'s ``any_model`` errors.

    Called once by :mod:`hf_sae.push` (the Hub layer, imported by ``import hf_sae``); not at this module's import,
    because the remote-code bundle copies this module and must not patch transformers. Idempotent.
    """
    if getattr(AutoModel.from_pretrained, "_hf_sae_original", None) is not None:
        return
    wrapper = functools.wraps(_auto_model_from_pretrained)(_explained_auto_model_from_pretrained)
    wrapper._hf_sae_original = _auto_model_from_pretrained
    AutoModel.from_pretrained = classmethod(wrapper)


def sae_model_types() -> list[str]:
    """The ``model_type`` of every SAE architecture registered with ``AutoConfig`` (``register_architecture`` does
    that), read from transformers so that this module needs no registry (which imports the models)."""
    found, pending = set(), [SAEConfig]
    while pending:
        config_class = pending.pop()
        pending += config_class.__subclasses__()
        name = config_class.model_type
        if name != SAEConfig.model_type and name in CONFIG_MAPPING and CONFIG_MAPPING[name] is config_class:
            found.add(name)
    return sorted(found)


def load_sae(name_or_path: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None, **kwargs):
    """``AutoModel.from_pretrained`` for hf-sae SAEs (a local folder or a Hub repo), with explained failures.

    Raises :class:`SAEHubError` (an ``OSError`` and an ``SAELoadError``) for a missing repo / revision / subfolder,
    no network or offline mode without a cached copy, or a peer-library layout (naming the converter);
    :class:`SAELoadError` for a model that is not an SAE (a config.json whose ``model_type`` is no registered
    architecture, e.g. ``gpt2``), read before any weight; config and weight errors (``SAEConfigError``,
    ``SAELoadError``) pass through unchanged.
    """
    if subfolder:
        kwargs["subfolder"] = subfolder
    if revision:
        kwargs["revision"] = revision
    kwargs.setdefault("use_safetensors", True)  # never unpickle: a folder with only pytorch_model.bin is refused
    where = describe_location(str(name_or_path), subfolder, revision)
    try:
        config, _ = PreTrainedConfig.get_config_dict(
            str(name_or_path), **{key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        )
    except (OSError, ValueError):
        config = {}  # no readable config.json: from_pretrained below fails, and its failure is explained
    model_type = config.get("model_type")
    if model_type is not None and model_type not in (known := sae_model_types()):
        raise SAELoadError(
            f"{where} is not an SAE: its config.json says model_type={model_type!r}, and the registered hf-sae "
            f"architectures are {known}. load_sae loads SAEs only; load other models with transformers' Auto "
            "classes. An SAE of an architecture of your own must be registered first, with "
            "hf_sae.register_architecture in a module you import."
        )
    try:
        model = _auto_model_from_pretrained(AutoModel, str(name_or_path), **kwargs)
    except (SAEConfigError, SAELoadError):
        raise
    except (OSError, ValueError, KeyError) as err:
        better = explain_load_failure(name_or_path, err, subfolder=subfolder, revision=revision)
        if better is None:
            raise
        raise better from err
    if not isinstance(getattr(model, "config", None), SAEConfig):
        raise SAELoadError(
            f"{where} loaded as {type(model).__name__}, which is not an hf-sae SAE (registered architectures: "
            f"{sae_model_types()}). load_sae loads SAEs only."
        )
    return model

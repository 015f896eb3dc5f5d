"""The one atomic writer: every file hf-sae writes goes through here.

A file is written to a temporary name in its own folder, flushed and ``fsync``-ed, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows), and the folder entry is ``fsync``-ed. A crash or a SIGKILL at any moment
leaves either the old file or the new one, never a half-written one, and the temporary never crosses a file system
(it lives beside the target, so a mount point as the target's folder is fine).

    write_text_atomic(path, text); write_bytes_atomic(path, data); write_json_atomic(path, obj)
    with atomic_path(path) as tmp: figure.savefig(tmp)      # for writers that want a path
    with atomic_dir(path) as tmp: ...fill tmp...            # a whole folder, renamed into place at the end
    with staged_files(folder) as tmp: ...fill tmp...        # files moved into an existing folder, one by one
    remove_tree(path)                                       # a folder deleted so that no part of it keeps its name

A write that fails because the disk is full raises :class:`hf_sae.errors.DiskFullError` naming the file (torch.save
and safetensors report it as RuntimeError / SafetensorError without an errno; the free space tells).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DiskFullError

LOW_SPACE_BYTES = 16 * 2**20  # a failed write with less than this left on its file system is a full disk


def current_umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux: /proc/self/status), else by the
    set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 less the umask (mkstemp would give 0o600)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a plain ``os.mkdir`` would give: 0o777 less the umask (mkdtemp would give 0o700)."""
    return 0o777 & ~current_umask()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (a rename is durable once its folder is synced). Not possible on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int | None:
    """Bytes free on the file system of ``path`` (its nearest existing folder), None if unknown."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _disk_is_full(error: BaseException, path: Path) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    writer_error = isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"
    free = _free_bytes(path)
    return writer_error and free is not None and free < LOW_SPACE_BYTES


def _newest_file(folder: Path) -> Path | None:
    """The file written last in ``folder`` (the one a failed write was writing)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


@contextmanager
def naming_full_disk(path: str | os.PathLike, staging: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an exception of a write to ``path`` that failed for lack of space into a :class:`DiskFullError` naming
    the file; with ``staging`` (the temporary folder being filled for ``path``), the file written last in it."""
    path = Path(path)
    where = Path(staging) if staging is not None else path.parent  # the file system the bytes went to
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not _disk_is_full(error, where):
            raise
        target = path
        if staging is not None and (newest := _newest_file(where)) is not None:
            target = path / newest.relative_to(where)
        free = _free_bytes(where) or 0
        raise DiskFullError(
            f"cannot write {target}: the disk is full ({free / 2**20:.1f} MiB free there); the half-written file "
            "was removed and what it would replace is untouched. Free some space there, or write to another disk."
        ) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync-ed and renamed over ``path``.

    The suffix of ``path`` is kept (``.png``, ``.safetensors``), so writers that infer the format from it work.
    On an exception the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        with naming_full_disk(path):
            yield tmp
            os.chmod(tmp, file_mode())
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON (values JSON cannot hold are written with ``str``) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")


def _fsync_tree(root: Path) -> None:
    for item in root.rglob("*"):
        if item.is_file():
            _fsync_file(item)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is fsync-ed and renamed to ``path``.

    ``path`` must not exist yet (a folder is never half replaced); on an exception the temporary folder is deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        with naming_full_disk(path, staging=tmp):
            yield tmp
            _fsync_tree(tmp)
        os.chmod(tmp, dir_mode())
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def staged_files(folder: str | os.PathLike, last: Sequence[str] = ("config.json",)) -> Iterator[Path]:
    """Yield a temporary folder *inside* ``folder``; on success each file in it replaces its namesake in ``folder``.

    Other contents of ``folder`` (checkpoints, metrics, plots) are kept. Each rename is atomic, and the names in
    ``last`` move last, so a reader never sees a new ``config.json`` beside old weights. The temporary folder is
    removed in every case.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-save-"))
    try:
        with naming_full_disk(folder, staging=tmp):
            yield tmp
            items = sorted(tmp.iterdir(), key=lambda p: (p.name in last, p.name))
            mode = file_mode()
            for item in items:
                if item.is_file():
                    os.chmod(item, mode)
                    _fsync_file(item)
        for item in items:
            target = folder / item.name
            if item.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` so that a kill midway never leaves part of it under its own name: it is renamed to
    a temporary name beside it first (which :func:`remove_stale_temporaries` clears), then deleted."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.tmp-removed-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what writes killed midway left in ``folder`` (``.NAME.tmp-*`` folders and files, ``.tmp-save-*``)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        if item.name.startswith(".") and (".tmp" in item.name or item.name.startswith(".tmp-save-")):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 16 MiB blocks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()

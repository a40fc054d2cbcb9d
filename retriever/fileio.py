"""Writing files so that a crash never leaves half of one: atomic directories and text files,
and content hashes to check what was written. A leaf module: training (checkpoints, models),
the token cache and mining all use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class WriteFailed(OSError):
    """Writing a file or directory failed (a full disk, a quota, an I/O error); the message
    names what and why, and what was half-written is gone."""


def is_write_error(exc: BaseException) -> bool:
    """Whether ``exc``, raised while writing, is the file system's doing: an OSError, or the
    same error as safetensors' or torch's serialisers word it."""
    text = str(exc)
    return isinstance(exc, OSError) or any(
        mark in text for mark in ("os error", "No space left", "file write failed", "I/O error")
    )


def write_failure_reason(exc: BaseException, path: Path | None = None) -> str:
    """Why a write (into ``path``, if given) failed, in words. torch's serialiser reports a
    full disk as a position mismatch, so the space left there is looked at too."""
    code, text = getattr(exc, "errno", None), str(exc)
    if code == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "no space left on device"
    if path is not None and _free_bytes(path) < 1 << 20:
        return f"no space left on device ({type(exc).__name__}: {text})"
    if code == errno.EDQUOT or "os error 122" in text:
        return "disk quota exceeded"
    return f"{type(exc).__name__}: {text}"


def _free_bytes(path: Path) -> int:
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return 1 << 62  # unknown: not the reason


def directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot be, or become, a directory this process writes in (it is a file; a
    parent is a file; no write permission), or None. Checked before any work starts."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a directory"
        return None if os.access(path, os.W_OK) else f"{path}: no permission to write there"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{path}: {parent} is a file, not a directory"
    if parent is not None and not os.access(parent, os.W_OK):
        return f"{path}: cannot create it under {parent} (no permission to write there)"
    return None


def fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def partial_path(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def publish(partial: Path, path: Path) -> None:
    """Rename the complete directory ``partial`` to ``path``, replacing an older ``path``."""
    old = path.parent / f".{path.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(partial, path)
    fsync_directory(path.parent)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory("run/final") as tmp:`` write into ``tmp``; on success it replaces
    ``run/final`` in one rename, on failure it is removed and ``run/final`` is untouched (a
    failure of the file system is raised as `WriteFailed`, naming ``path``)."""
    path = Path(path)
    partial = partial_path(path)
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        yield partial
        publish(partial, path)
    except BaseException as exc:
        reason = write_failure_reason(exc, path)  # before the space is freed again
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, WriteFailed) or not is_write_error(exc):
            raise
        raise WriteFailed(f"{path}: could not be written ({reason})") from exc


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes (about 6 GB/s: cheap next to writing the file)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()

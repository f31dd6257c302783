"""Atomic file writes: a crash or kill mid-write leaves the previous file whole.

Everything cores writes goes through here: write a temporary file in the same directory,
flush and fsync it, then ``os.replace`` it over the destination (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs should get the usual permissions the umask allows.
_FILE_MODE = 0o666 & ~_current_umask()


TEMPORARY_PATTERN = r"\.{name}\.[a-z0-9_]{{8}}\.tmp"
"""How the temporaries of a destination ``name`` are named (``.NAME.k3j_9x2a.tmp``): format with
``name=re.escape(...)`` (or a pattern) to recognise the leftovers of a killed writer. A tagged
temporary (``staged_file(path, tag=TAG)``) is ``.NAME.TAG.k3j_9x2a.tmp``: pass
``name=re.escape(NAME + "." + TAG)``."""


@contextlib.contextmanager
def staged_file(path: str | Path, tag: str | None = None) -> Iterator[tuple[BinaryIO, Path]]:
    """A temporary file beside ``path``, open for binary writing, flushed and fsynced at the end
    of the block; yields ``(file, temporary path)``. On an exception the temporary is removed.
    The caller moves it into place (``os.replace``) when it chooses: several files can be
    staged first and committed together.

    ``tag`` goes into the temporary's name (``.NAME.TAG.XXXXXXXX.tmp``), so that a writer that
    cleans up after itself can tell its own leftovers from any other program's."""
    dest = Path(path)
    prefix = f".{dest.name}.{tag}." if tag else f".{dest.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest.parent)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh, Path(tmp)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; it replaces ``path`` only on success."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(dest) as (fh, tmp):
        yield fh
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_image_atomic(image, path: str | Path, format: str | None = None, **params: Any) -> None:
    """Save a PIL image atomically; the format follows the suffix unless given."""
    fmt = format or Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    with atomic_open(path) as fh:
        image.save(fh, format=fmt, **params)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into place.

    If ``path`` exists it is renamed aside first (to a new hidden ``.NAME.XXXX.old`` made by this
    call, never a name a user may already use) and removed only after the new directory is in
    place, so at every instant one complete directory exists under ``path`` or that sibling.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if dest.exists():
            # rename(2) may replace an empty directory: the aside name is unique and ours
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def probe_writable(folder: str | Path) -> None:
    """Prove that a file can be made in ``folder`` (raises the OSError if not). The probe is an
    unnamed temporary file (``O_TMPFILE`` on Linux), so it leaves nothing behind, even if the
    process is killed; unlike a permission check it also holds for root and read-only mounts."""
    with tempfile.TemporaryFile(dir=folder):
        pass


class OutputLocked(Exception):
    """Another process holds the lock of an output; ``holder`` says who, when it could tell."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.holder = holder


def lock_path_for(output: str | Path) -> Path:
    """The lock file of an output file or folder: ``.NAME.lock`` beside it, named after the real
    path, so that every spelling of one output (a symbolic link to it, ``..``) takes one lock."""
    p = Path(os.path.realpath(output))
    return p.with_name(f".{p.name}.lock")


@contextlib.contextmanager
def exclusive_lock(output: str | Path, lock_file: str | Path | None = None) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``output`` for the duration of the block.

    Two writers of one output (a library file, a run folder) would interleave their appends; the
    second must be refused, not queued. The lock is an ``flock`` on ``.NAME.lock`` beside the
    output (or ``lock_file``, e.g. inside an output folder), so the kernel drops it when the
    holder dies (a SIGKILL leaves no stale lock to clear by hand). The file records the holder's
    pid for the message; it is left in place afterwards because removing it would race with a
    third process opening it.
    """
    lock = Path(lock_file) if lock_file is not None else lock_path_for(output)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        if not _try_flock(fd):
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            raise OutputLocked(Path(output), f"process {holder}" if holder.isdigit() else "another process")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def exclusive_directory_lock(folder: str | Path) -> Iterator[None]:
    """Like :func:`exclusive_lock`, but an ``flock`` on the folder itself: it leaves no file in a
    folder that belongs to the user (the price: the holder's pid cannot be told)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if not _try_flock(fd):
            raise OutputLocked(Path(folder), "another process")
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True

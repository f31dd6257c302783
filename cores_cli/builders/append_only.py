"""Output files that only ever grow by whole lines.

Each line is written with a single ``os.write`` on an ``O_APPEND`` descriptor and fsynced, so a
file only ever grows by whole lines, except that a crash or power loss in the middle of that write
could leave a torn last line. A builder that resumes cuts such a line first
(:func:`repair_torn_tail`), then reads the file back.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CoresError


def repair_torn_tail(path: Path) -> bool:
    """Cut a last line that lacks its newline (a torn write); return whether one was cut."""
    if not path.is_file():
        return False
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return False
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def append_line(path: Path, line: str) -> None:
    """Append one whole line with a single write, then fsync (see the module docstring)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CoresError(f"could not open {path} to append: {exc.strerror or exc}") from None
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write on a regular file means the disk is full
            raise CoresError(f"could not write to {path} (disk full?)")
        os.fsync(fd)
    except OSError as exc:
        raise CoresError(f"could not write to {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)

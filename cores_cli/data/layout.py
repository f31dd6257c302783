"""Small helpers shared by the dataset readers: layout checks with clear errors, image
look-ups through one directory listing, header-only image sizes, JSON reading, and splitting a
record's rounds into samples of at most ``k`` rounds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from ..errors import CoresError

T = TypeVar("T")


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a :class:`CoresError` naming it and what it holds."""
    if not path.is_dir():
        raise CoresError(f"{what}: folder not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CoresError(f"{what}: file not found: {path}")
    return path


def first_existing(candidates: Sequence[Path], what: str) -> Path:
    """The first candidate file that exists; the error names all of them."""
    for c in candidates:
        if c.is_file():
            return c
    listed = " or ".join(str(c) for c in candidates)
    raise CoresError(f"{what}: file not found: {listed}")


def load_json(path: Path, what: str) -> Any:
    """JSON from ``path``: UTF-8 first, then cp1252 (LISA's fallback for ReasonSeg files)."""
    require_file(path, what)
    raw = path.read_bytes()
    for enc in ("utf-8", "cp1252"):
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise CoresError(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    raise CoresError(f"{what}: {path} is neither UTF-8 nor cp1252 text")


class DirIndex:
    """File names per directory, listed once (a ``stat`` per image is slow on network disks)."""

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def names(self, directory: Path) -> frozenset[str]:
        if directory not in self._names:
            try:
                self._names[directory] = frozenset(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                self._names[directory] = frozenset()
        return self._names[directory]

    def exists(self, path: Path) -> bool:
        return path.name in self.names(path.parent)


SKIP_MISSING_HINT = (
    "to leave those samples out: --opt skip_missing=true on cores eval, "
    "skip_missing: true in a training recipe's dataset options, skip_missing=True in Python"
)
"""How to go on without missing images, in the words of every caller of the readers."""


def missing_images_error(missing: Sequence[Path], total: int, what: str, hint: str = SKIP_MISSING_HINT) -> CoresError:
    """``hint`` says how to go on without them, in the words of the caller (an option, a flag);
    the default names the option of each front end, since readers do not know which called them."""
    return CoresError(f"{what}: {len(missing)} of {total} images are missing, the first is {missing[0]} ({hint})")


def check_missing_images(missing: Sequence[Path], total: int, what: str, skip_missing: bool, hint: str | None = None) -> bool:
    """Refuse a dataset with missing images (:func:`missing_images_error`); with ``skip_missing``
    True when some were left out (the reader says how many, in its own words)."""
    if missing and not skip_missing:
        raise missing_images_error(missing, total, what, *([hint] if hint else []))
    return bool(missing)


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def upright_size(path: Path) -> tuple[int, int] | None:
    """(height, width) as displayed (EXIF orientation applied, like ``cv2.imread`` and
    ``ImageOps.exif_transpose``), read from the header only; None if unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112)
            except (AttributeError, OSError, ValueError, SyntaxError):
                orientation = None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return (w, h) if orientation in _SWAPPING_ORIENTATIONS else (h, w)


def chunk(items: Sequence[T], k: int | None) -> list[list[T]]:
    """``items`` in consecutive groups of at most ``k`` (all in one group when ``k`` is None)."""
    if k is None or k <= 0 or len(items) <= k:
        return [list(items)]
    return [list(items[i : i + k]) for i in range(0, len(items), k)]

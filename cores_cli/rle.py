"""COCO run-length encoding: how a mask leaves the program inside JSON (``cores predict`` records,
``cores eval --save-masks``), readable by any COCO tool without a PNG.

The form is pycocotools' compressed RLE with its bytes as text: ``{"size": [h, w], "counts":
"<str>"}``, column-major as COCO defines it. ``pycocotools.mask.decode`` takes it back after
``counts.encode("ascii")``, or :func:`decode` here.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import CoresError


def encode(mask: np.ndarray) -> dict:
    """COCO RLE of a 2-D mask (any non-zero pixel is foreground)."""
    from pycocotools import mask as mask_utils

    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D, got shape {mask.shape}")
    # pycocotools reads the buffer column by column: it must be Fortran-ordered uint8
    fortran = np.asfortranarray(mask != 0, dtype=np.uint8)
    with warnings.catch_warnings():
        # pycocotools 2.0.x under numpy 2 warns about __array__(copy=...) on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = mask_utils.encode(fortran)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}


def decode(rle: object) -> np.ndarray:
    """The bool (h, w) mask of a COCO RLE as :func:`encode` writes it. Raises CoresError for
    anything else. The string is read here, not by pycocotools, whose decoder writes past its
    buffer when the runs add up to more than h × w."""
    if not (isinstance(rle, dict) and isinstance(rle.get("counts"), str) and isinstance(rle.get("size"), (list, tuple))):
        raise CoresError('not a COCO RLE: expected {"size": [h, w], "counts": "<str>"}')
    size = rle["size"]
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in size):
        raise CoresError(f"COCO RLE size must be [height, width] in pixels, got {size!r}")
    h, w = size
    runs = _runs(rle["counts"])
    if runs is None or sum(runs) != h * w:
        raise CoresError(f"COCO RLE counts do not describe a {h}×{w} mask")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate background, foreground, starting with background
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()


def _runs(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE string, or None when it is malformed.

    Each run is a little-endian group of 5-bit digits stored as characters 48 + digit, bit 0x20
    saying another digit follows and bit 0x10 of the last digit the sign; from the fourth run
    on the stored value is the difference to the run two places before."""
    runs: list[int] = []
    value = shift = 0
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            if shift > 60:
                return None
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return runs if shift == 0 else None

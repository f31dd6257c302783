"""Writing ReasonSeg-format files (the writer side of :mod:`cores_cli.data.reasonseg`).

Files look like LISA's (SCHEMAS.md §A): ``json.dumps(doc, indent=2)`` in ASCII with no
trailing newline, top-level keys ``text``, ``is_sentence``, ``shapes`` in that order (extra keys
after them; LISA ignores them), and every shape a LabelMe polygon record with ``label``,
``labels``, ``shape_type``, ``image_name``, ``points``, ``group_id``, ``group_ids``, ``flags``.

:func:`mask_to_shapes` turns a binary mask into polygons that LISA's rasteriser (and ours,
:func:`~cores_cli.data.masks.rasterize_shapes`) draws back into the same pixels:

- Points are the pixel centres of each component's boundary (``cv2.findContours``,
  ``CHAIN_APPROX_SIMPLE``: only points inside straight horizontal, vertical or diagonal runs are
  dropped, which changes no pixel). They are integers, so LISA's ``int32`` truncation is exact,
  and LISA draws each polygon as outline + fill, which covers the boundary pixels themselves.
- Holes. LISA's rasteriser has no way to draw 0: every shape is filled with 1, or with 255 when
  its label contains "ignore", largest shape first. So a hole (background enclosed by the part,
  e.g. the gap between a bicycle frame's tubes) is written as a polygon around the hole's own
  pixels with label ``"ignore"`` (``holes="ignore"``, the default). A hole is smaller than the
  part around it, so it is drawn after it; a piece of the part inside a hole is again a
  ``"target"`` polygon, drawn after the hole, and so on. Result: target pixels (value 1) equal
  the mask exactly, and hole pixels are 255, which training reads as background (right) and
  evaluation leaves out of intersection and union (lenient: a prediction that fills a hole is
  not penalised there). ``holes="fill"`` writes outer boundaries only, so holes become target;
  on random shapes with many holes that costs down to 0.72 IoU, on ordinary part masks
  typically nothing (few parts have holes). ``tests/test_reasonpart.py`` measures both.
- Components of one or two pixels (and straight lines) have fewer than 3 distinct contour
  points; their last point is repeated so that readers see a polygon (LISA draws the same
  dot or line either way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np

from .masks import PolygonShape

Holes = Literal["ignore", "fill"]
TARGET = "target"
IGNORE_LABEL = "ignore"


def shape_record(shape: PolygonShape, image_name: str) -> dict[str, Any]:
    """One LabelMe polygon record as ReasonSeg files hold them."""
    return {
        "label": shape.label,
        "labels": [shape.label],
        "shape_type": "polygon",
        "image_name": image_name,
        "points": [[x, y] for x, y in shape.points],
        "group_id": None,
        "group_ids": [None],
        "flags": {},
    }


def reasonseg_document(
    texts: Sequence[str], is_sentence: bool, shapes: Sequence[PolygonShape], image_name: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON object of one ReasonSeg file; ``extra`` keys go after the standard ones."""
    doc: dict[str, Any] = {
        "text": list(texts),
        "is_sentence": bool(is_sentence),
        "shapes": [shape_record(s, image_name) for s in shapes],
    }
    doc.update(extra or {})
    return doc


def dumps_reasonseg(doc: dict[str, Any]) -> str:
    """LISA's serialisation: 2-space indent, ASCII, no trailing newline."""
    return json.dumps(doc, indent=2)


def mask_to_shapes(mask: np.ndarray, holes: Holes = "ignore") -> list[PolygonShape]:
    """Polygons whose ReasonSeg rasterisation gives back ``mask != 0`` (see module docstring)."""
    if holes not in ("ignore", "fill"):
        raise ValueError(f"holes must be 'ignore' or 'fill', got {holes!r}")
    out: list[PolygonShape] = []
    _trace(np.asarray(mask) != 0, TARGET, out, holes)
    return out


def _trace(region: np.ndarray, label: str, out: list[PolygonShape], holes: Holes) -> None:
    """Outer boundaries of ``region`` as ``label`` shapes, then (recursively) what they enclose
    that is not ``region``, with the other label."""
    if not region.any():
        return
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        pts = [(float(x), float(y)) for x, y in c.reshape(-1, 2)]
        while len(pts) < 3:
            pts.append(pts[-1])
        out.append(PolygonShape(label, tuple(pts)))
    if holes == "fill":
        return
    filled = np.zeros(region.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    inside = filled.astype(bool) & ~region
    _trace(inside, IGNORE_LABEL if label == TARGET else TARGET, out, holes)

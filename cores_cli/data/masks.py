"""Mask specifications: how each dataset family's annotation becomes a uint8 mask.

Every class here is a frozen, picklable :class:`~cores_cli.data.records.MaskSpec` holding only
annotation data (no pixels) and drawing on demand with ``rasterize(height, width)``:
values 0 background, 1 target, 255 ignore.

- :class:`LabelmePolygonMask`: ReasonSeg / LabelMe polygons, drawn exactly as LISA's
  ``utils/data_processing.get_mask_from_json``: shapes whose label is ``"flag"`` (lower-cased,
  exact match) are skipped; every other shape's area is measured by drawing it alone
  (outline of thickness 1 + fill); shapes are drawn from the largest area to the smallest
  (``argsort`` of the areas, reversed, so ties keep that order), each as outline + fill, with
  value 255 when ``"ignore"`` occurs in the lower-cased label and 1 otherwise. Points are cast
  to ``int32`` the way ``np.array(points, dtype=np.int32)`` does, which truncates toward zero
  (1.9 → 1). Drawing clips to the image, so points on or beyond the border are fine.
- :class:`CocoMask`: COCO segmentations (polygon lists, compressed or uncompressed RLE, lists
  of RLEs as in refCLEF) decoded with ``pycocotools.mask``, the union of all of them.
- :class:`LabelMapMask`: one class of a semantic label PNG (ADE20K, COCO-Stuff, Mapillary)
  with LISA's remapping of each dataset's unlabeled values to 255.

Degenerate geometry never raises at draw time: :func:`parse_labelme_shapes` and
:func:`parse_coco_segmentation` check annotations when a reader parses them and return
warnings (readers put them in ``sample.meta["warnings"]``), and the draw functions skip
anything they still cannot draw.
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from ..ignore_values import IGNORE
from .records import MaskSpec, ReaderWarning

COORD_LIMIT = 2**30
"""Coordinates beyond ±2^30 px cannot be cast to int32 safely; such shapes are skipped."""


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) mask (the same index rule as ``ArrayMask``)."""
    if mask.shape == (height, width):
        return mask
    rows = (np.arange(height) * mask.shape[0] // height).clip(0, mask.shape[0] - 1)
    cols = (np.arange(width) * mask.shape[1] // width).clip(0, mask.shape[1] - 1)
    return mask[rows][:, cols]


# --------------------------------------------------------------------------- LabelMe / ReasonSeg


@dataclass(frozen=True)
class PolygonShape:
    """One LabelMe shape: its label and its ``(x, y)`` points in pixels of the upright image."""

    label: str
    points: tuple[tuple[float, float], ...]

    @property
    def is_flag(self) -> bool:
        """LISA skips these ("meaningless deprecated annotations"): exact, case-insensitive."""
        return self.label.lower() == "flag"

    @property
    def is_ignore(self) -> bool:
        """LISA fills these with 255: a case-insensitive *substring* test."""
        return "ignore" in self.label.lower()


def _int_points(points: Sequence[tuple[float, float]]) -> np.ndarray | None:
    """(1, N, 2) int32 as LISA's ``np.array([points], dtype=np.int32)``; None if undrawable."""
    if len(points) == 0:
        return None
    a = np.asarray(points, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all() or np.abs(a).max() > COORD_LIMIT:
        return None
    return a.astype(np.int32).reshape(1, -1, 2)


def _draw(canvas: np.ndarray, pts: np.ndarray, value: int) -> None:
    """Outline (thickness 1, closed) then fill, as LISA draws every polygon."""
    cv2.polylines(canvas, pts, True, value, 1)
    cv2.fillPoly(canvas, pts, value)


def rasterize_shapes(shapes: Sequence[PolygonShape], height: int, width: int) -> np.ndarray:
    """LISA's ReasonSeg mask for ``shapes`` at (height, width): uint8 in {0, 1, 255}."""
    drawable: list[tuple[np.ndarray, int]] = []
    areas: list[int] = []
    for s in shapes:
        if s.is_flag:
            continue
        pts = _int_points(s.points)
        if pts is None:
            continue
        tmp = np.zeros((height, width), dtype=np.uint8)
        _draw(tmp, pts, 1)
        areas.append(int(tmp.sum(dtype=np.uint64)))
        drawable.append((pts, IGNORE if s.is_ignore else 1))
    mask = np.zeros((height, width), dtype=np.uint8)
    # The same sort call as LISA (numpy's default kind on uint64 areas, then reversed), so
    # equal-area shapes are drawn in the same order.
    order = np.argsort(np.asarray(areas, dtype=np.uint64))[::-1]
    for i in order:
        pts, value = drawable[int(i)]
        _draw(mask, pts, value)
    return mask


@dataclass(frozen=True)
class LabelmePolygonMask(MaskSpec):
    """ReasonSeg/LabelMe shapes drawn as LISA draws them (see the module docstring).

    Coordinates are in pixels of the image as ``cv2.imread`` shows it (EXIF orientation
    applied), the frame in which ``rasterize`` is asked for.
    """

    shapes: tuple[PolygonShape, ...]

    def rasterize(self, height: int, width: int) -> np.ndarray:
        return rasterize_shapes(self.shapes, height, width)


def parse_labelme_shapes(raw: Any, where: str = "") -> tuple[tuple[PolygonShape, ...], list[str]]:
    """Validate a LabelMe ``shapes`` list into :class:`PolygonShape` records, with warnings.

    Kept (drawn as LISA would): polygons of 1–2 points (cv2 draws a dot or a line; a warning
    says so, except for ``flag`` shapes, which are never drawn), points outside any image.
    Dropped with a warning: non-list points, an empty point list (cv2 would raise), NaN or
    infinite or absurdly large coordinates (``int32`` casting would raise or wrap), non-dict
    shapes and shapes without ``points``. A non-string label is turned into a string.
    """
    pre = f"{where}: " if where else ""
    warnings: list[str] = []
    out: list[PolygonShape] = []
    if not isinstance(raw, list):
        return (), [ReaderWarning("shapes_not_list", f"{pre}'shapes' is a {type(raw).__name__}, not a list; no mask")]
    for k, shape in enumerate(raw):
        if not isinstance(shape, dict) or "points" not in shape:
            warnings.append(ReaderWarning("shape_without_points", f"{pre}shape {k} has no 'points'; skipped"))
            continue
        label = shape.get("label", "")
        if not isinstance(label, str):
            warnings.append(ReaderWarning("label_not_string", f"{pre}shape {k} label {label!r} is not a string; used as {str(label)!r}"))
            label = str(label)
        pts = shape["points"]
        try:
            points = tuple((float(p[0]), float(p[1])) for p in pts if len(p) == 2)
            if len(points) != len(pts):
                raise ValueError
        except (TypeError, ValueError, IndexError, KeyError):
            warnings.append(ReaderWarning("bad_points", f"{pre}shape {k} ({label!r}) points are not [x, y] pairs; skipped"))
            continue
        if label.lower() == "flag":
            out.append(PolygonShape(label, points))
            continue
        if not points:
            warnings.append(ReaderWarning("no_points", f"{pre}shape {k} ({label!r}) has no points; skipped"))
            continue
        if not all(math.isfinite(v) and abs(v) <= COORD_LIMIT for p in points for v in p):
            warnings.append(ReaderWarning("bad_coordinate", f"{pre}shape {k} ({label!r}) has a NaN, infinite or out-of-range coordinate; skipped"))
            continue
        if len(points) < 3:
            shape_of = "line" if len(points) == 2 else "dot"
            warnings.append(ReaderWarning("few_points", f"{pre}shape {k} ({label!r}) has {len(points)} point(s); drawn as a {shape_of}, as LISA does"))
        out.append(PolygonShape(label, points))
    return tuple(out), warnings


def shapes_outside(shapes: Sequence[PolygonShape], height: int, width: int) -> list[int]:
    """Indices of drawable non-flag shapes that lie wholly outside a (height, width) image."""
    bad = []
    for k, s in enumerate(shapes):
        pts = None if s.is_flag else _int_points(s.points)
        if pts is None:
            continue
        x, y = pts[0, :, 0], pts[0, :, 1]
        if x.max() < 0 or y.max() < 0 or x.min() >= width or y.min() >= height:
            bad.append(k)
    return bad


def beyond_margin(side: int) -> float:
    """How far past an image side a point may lie before its shape is reported: LabelMe keeps
    points inside the image, and a few pixels of slack allow for rounding and border clicks."""
    return max(2.0, 0.01 * side)


def shapes_beyond(shapes: Sequence[PolygonShape], height: int, width: int) -> list[int]:
    """Indices of drawable non-flag shapes that overlap a (height, width) image but reach past
    it by more than :func:`beyond_margin`: the mark of an annotation drawn on a larger copy of
    the image (drawing clips them, so the mask silently loses that part)."""
    outside = set(shapes_outside(shapes, height, width))
    mx, my = beyond_margin(width), beyond_margin(height)
    bad = []
    for k, s in enumerate(shapes):
        if k in outside or s.is_flag or _int_points(s.points) is None:
            continue
        a = np.asarray(s.points, dtype=np.float64)
        x, y = a[:, 0], a[:, 1]
        if x.min() < -mx or y.min() < -my or x.max() > width + mx or y.max() > height + my:
            bad.append(k)
    return bad


# --------------------------------------------------------------------------------------- COCO


@dataclass(frozen=True)
class Rle:
    """A COCO run-length encoding: ``counts`` is the compressed string or the uncompressed
    (column-major, background first) run list; ``size`` is (height, width)."""

    counts: str | tuple[int, ...]
    size: tuple[int, int]

    def to_coco(self) -> dict:
        """A compressed RLE dict for ``pycocotools.mask``."""
        from pycocotools import mask as mask_utils

        h, w = self.size
        if isinstance(self.counts, str):
            return {"counts": self.counts.encode("ascii"), "size": [h, w]}
        return mask_utils.frPyObjects({"counts": list(self.counts), "size": [h, w]}, h, w)


def compressed_rle_total(counts: str) -> int | None:
    """Total run length encoded in a COCO compressed-RLE string, or None if malformed.

    The string format (pycocotools' ``rleToString``): each run length is written in 5-bit
    groups as characters ``48 + group``, bit 0x20 meaning "more groups follow" and bit 0x10 of
    the last group the sign; from the 4th run on, a run is stored as the difference to the run
    two places before. pycocotools decodes malformed strings (even an empty one) into garbage
    memory instead of failing, so strings are checked here before they are ever decoded.
    """
    if not counts:
        return None
    try:
        b = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        return None
    if (b < 0).any() or (b > 63).any() or b[-1] & 0x20:
        return None
    ends = np.flatnonzero((b & 0x20) == 0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 12:
        return None
    k = np.arange(len(b)) - np.repeat(starts, lengths)
    values = np.add.reduceat((b & 0x1F) << (5 * k), starts)
    values = np.where(b[ends] & 0x10, values - (np.int64(1) << (5 * lengths)), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        return None
    return int(runs.sum())


Polygon = tuple[float, ...]
"""A flat COCO polygon ``(x1, y1, x2, y2, ...)``."""


@dataclass(frozen=True)
class CocoMask(MaskSpec):
    """The union of COCO segmentations of one image (several annotations may be joined, e.g. all
    instances of a part class). ``height``/``width``: the image size in the annotation file.

    Polygons go through ``pycocotools.mask.frPyObjects`` (as in LISA and REFER), RLEs through
    ``pycocotools.mask.decode``. Overlapping polygons give 1 (LISA sums the per-polygon maps
    into values of 2 that its metric then half-counts; a union is what the annotation means).
    If ``rasterize`` is asked for another size (an image whose file differs from its
    annotation record), the mask is resized by nearest neighbour.
    """

    polygons: tuple[Polygon, ...]
    rles: tuple[Rle, ...]
    height: int
    width: int

    def rasterize(self, height: int, width: int) -> np.ndarray:
        with _warnings.catch_warnings():
            # pycocotools 2.0.x under numpy 2 warns about __array__(copy=...) on every decode.
            _warnings.simplefilter("ignore", DeprecationWarning)
            return self._rasterize(height, width)

    def _rasterize(self, height: int, width: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        h, w = self.height, self.width
        out = np.zeros((h, w), dtype=np.uint8)
        # One polygon per frPyObjects call: a *list* whose first entry has 4 numbers would be
        # read as bounding boxes by pycocotools.
        encoded = [mask_utils.frPyObjects([list(p)], h, w)[0] for p in self.polygons if len(p) >= 6]
        if encoded:
            out |= mask_utils.decode(mask_utils.merge(encoded)).astype(np.uint8)
        for rle in self.rles:
            try:
                m = mask_utils.decode(rle.to_coco())
            except ValueError:  # not reachable for RLEs checked by parse_coco_segmentation
                continue
            out |= resize_nearest((m != 0).astype(np.uint8), h, w)
        return resize_nearest(out, height, width)

    @property
    def is_empty(self) -> bool:
        return not self.polygons and not self.rles


def parse_coco_segmentation(seg: Any, where: str = "") -> tuple[tuple[Polygon, ...], tuple[Rle, ...], list[str]]:
    """Split a COCO ``segmentation`` value into valid polygons and RLEs, with warnings.

    Accepts a list of flat polygons, an RLE dict (``counts`` string or list), or a list of RLE
    dicts. Dropped with a warning: polygons with fewer than 3 points or an odd number of
    coordinates, NaN/infinite coordinates, RLEs whose size is missing or whose uncompressed
    counts (compressed or not) do not add up to height × width. An empty list is an empty mask (as in LISA).
    """
    pre = f"{where}: " if where else ""
    polys: list[Polygon] = []
    rles: list[Rle] = []
    warnings: list[str] = []

    def add_rle(d: dict, k: int | None) -> None:
        tag = "RLE" if k is None else f"RLE {k}"
        size, counts = d.get("size"), d.get("counts")
        try:
            h, w = int(size[0]), int(size[1])
        except (TypeError, ValueError, IndexError):
            warnings.append(ReaderWarning("bad_rle", f"{pre}{tag} has no valid 'size'; skipped"))
            return
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if isinstance(counts, str):
            total = compressed_rle_total(counts)
            if total != h * w:
                warnings.append(ReaderWarning("bad_rle", f"{pre}{tag} compressed counts are malformed or do not cover {h}×{w}; skipped"))
                return
            rles.append(Rle(counts, (h, w)))
            return
        if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
            if sum(counts) != h * w:
                warnings.append(ReaderWarning("bad_rle", f"{pre}{tag} counts add up to {sum(counts)}, not {h}×{w}; skipped"))
                return
            rles.append(Rle(tuple(counts), (h, w)))
            return
        warnings.append(ReaderWarning("bad_rle", f"{pre}{tag} 'counts' is neither a string nor a list of run lengths; skipped"))

    if isinstance(seg, dict):
        add_rle(seg, None)
    elif isinstance(seg, list):
        for k, item in enumerate(seg):
            if isinstance(item, dict):
                add_rle(item, k)
                continue
            try:
                poly = tuple(float(v) for v in item)
            except (TypeError, ValueError):
                warnings.append(ReaderWarning("bad_polygon", f"{pre}polygon {k} is not a list of numbers; skipped"))
                continue
            if not all(math.isfinite(v) for v in poly):
                warnings.append(ReaderWarning("bad_polygon", f"{pre}polygon {k} has a NaN or infinite coordinate; skipped"))
            elif len(poly) % 2:
                warnings.append(ReaderWarning("bad_polygon", f"{pre}polygon {k} has an odd number of coordinates ({len(poly)}); skipped"))
            elif len(poly) < 6:
                warnings.append(ReaderWarning("bad_polygon", f"{pre}polygon {k} has {len(poly) // 2} point(s), fewer than 3; skipped"))
            else:
                polys.append(poly)
    else:
        warnings.append(ReaderWarning("unsupported_segmentation", f"{pre}segmentation of type {type(seg).__name__} is not supported; empty mask"))
    return tuple(polys), tuple(rles), warnings


# ------------------------------------------------------------------------------ label-map PNGs

LabelConvention = Literal["ade20k", "plain"]


def read_label_png(path: str) -> np.ndarray:
    """The raw values of a single-channel label PNG (palette indices for mode ``P``)."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map {path} has mode {img.mode}, expected a single channel")
        return np.array(img)


@lru_cache(maxsize=8)
def _cached_label_png(path: str) -> np.ndarray:
    """Read-only and cached: a sample asks about up to 3 classes of the same file."""
    a = read_label_png(path)
    a.setflags(write=False)
    return a


def decode_label_map(raw: np.ndarray, convention: LabelConvention, num_classes: int, ignore_ids: Sequence[int] = ()) -> np.ndarray:
    """Raw label values → class ids (int32), 255 for pixels that belong to no class.

    - ``ade20k`` (ADEChallengeData2016, as LISA): 0 is "other" → 255; every other value v → v−1
      (so the 150 classes are 0..149); the value 255 stays 255.
    - ``plain`` (COCO-Stuff stuffthingmaps, Mapillary v2.0 labels): values are class ids.
    Then ids listed in ``ignore_ids`` (COCO-Stuff's hyphenated merged classes, as in LISA) and
    ids ≥ ``num_classes`` (values without a class name; LISA would fail on them) become 255.
    """
    ids = raw.astype(np.int32)
    if convention == "ade20k":
        ids = np.where((raw == 0) | (raw == 255), IGNORE, ids - 1)
    ids[(ids >= num_classes) | (ids < 0)] = IGNORE
    if len(ignore_ids):
        ids[np.isin(ids, np.asarray(ignore_ids))] = IGNORE
    return ids


@dataclass(frozen=True)
class LabelMapMask(MaskSpec):
    """Class ``class_id`` of a label PNG: 1 on that class, 255 where the pixel has no class
    (unlabeled/ignored values, see :func:`decode_label_map`), 0 elsewhere. Training treats 255
    as background, which gives LISA's binary ``label == class_id`` masks exactly."""

    label_path: str
    class_id: int
    convention: LabelConvention
    num_classes: int
    ignore_ids: tuple[int, ...] = ()

    def rasterize(self, height: int, width: int) -> np.ndarray:
        ids = decode_label_map(_cached_label_png(self.label_path), self.convention, self.num_classes, self.ignore_ids)
        mask = np.where(ids == IGNORE, IGNORE, (ids == self.class_id).astype(np.uint8)).astype(np.uint8)
        return resize_nearest(mask, height, width)

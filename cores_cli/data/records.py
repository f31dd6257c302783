"""Plain sample records: what every dataset reader produces, before any tensor exists.

A reader parses its files into :class:`SegSample` records (cheap, picklable, no pixels).
One shared transform (``cores_cli.processing.transform``) later opens the image, rasterises each
round's :class:`MaskSpec` at the image's size, and builds the model's tensors.

Mask values: 0 background, 1 target, 255 ignore (LISA's convention). Training treats 255 as
background; evaluation leaves 255 pixels out of intersection and union.

Readers list what they found wrong with a sample in ``meta["warnings"]``: messages that are
:class:`ReaderWarning` strings, each with a stable short ``kind`` (:data:`WARNING_KINDS`) that
``cores eval`` counts and stores by.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

WARNING_KINDS: dict[str, str] = {
    "shapes_not_list": "the annotation's 'shapes' is not a list (a dict, a string, ...): no mask",
    "shape_without_points": "a shape is not an object with 'points': skipped",
    "label_not_string": "a shape's label is not a string: used as its text",
    "bad_points": "a shape's points are not [x, y] pairs: skipped",
    "no_points": "a shape has no points: skipped",
    "bad_coordinate": "a NaN, infinite or out-of-range coordinate: shape skipped",
    "few_points": "a polygon of 1 or 2 points: drawn as a dot or line, as LISA does",
    "shape_outside_image": "a shape lies wholly outside the image: draws nothing",
    "shape_beyond_image": "a shape reaches well beyond the image (drawn for a larger image?): clipped",
    "no_target": "no target polygon: the target mask is empty",
    "blank_query": "a query (sentence) is blank",
    "text_not_list": "the annotation's 'text' is one string, not a list: used as the one query (LISA would read its first character)",
    "special_token_in_query": "a query holds a chain or image token ([SEG], <image>, ...): removed from the text, which is scored",
    "bad_polygon": "a COCO polygon is malformed: skipped",
    "bad_rle": "a COCO RLE is malformed: skipped",
    "unsupported_segmentation": "a COCO segmentation of an unsupported type: empty mask",
    "unknown_annotation": "a ref names an annotation that is not in instances.json: ref skipped",
    "no_valid_segmentation": "a class of the image has no usable segmentation: its round is left out",
    "size_mismatch": "the annotation was made for another image size: masks resized",
    "unreadable_image": "the image could not be decoded while evaluating (corrupt, truncated, gone): the sample is left out of the metrics",
    "other": "a warning a reader gave without a kind",
}
"""Every kind of reader warning, with what it means for the sample."""


class ReaderWarning(str):
    """One warning about a sample: the message itself (a ``str``, so code that prints, joins or
    stores warnings keeps working) with a stable short ``kind`` from :data:`WARNING_KINDS`."""

    kind: str

    def __new__(cls, kind: str, message: str) -> ReaderWarning:
        if kind not in WARNING_KINDS:
            raise ValueError(f"unknown reader warning kind {kind!r}")
        obj = super().__new__(cls, message)
        obj.kind = kind
        return obj

    def __reduce__(self):
        # samples travel between processes (DataLoader workers, torch.distributed gathers)
        return (type(self), (self.kind, str(self)))


def warning_kind(message: str) -> str:
    """The kind of a warning in ``meta["warnings"]``; ``"other"`` for a plain string."""
    return getattr(message, "kind", "other")


QueryStyle = Literal["sentence", "phrase"]
"""``sentence``: a full question/instruction (ReasonSeg long, ReasonPart); ``phrase``: a noun
phrase or class name that the prompt wraps as "What is {phrase} in this image?"."""


class MaskSpec(abc.ABC):
    """How to draw one target mask; subclasses are frozen dataclasses (picklable)."""

    @abc.abstractmethod
    def rasterize(self, height: int, width: int) -> np.ndarray:
        """The mask as uint8 (height, width) with values in {0, 1, 255}."""


@dataclass(frozen=True)
class ArrayMask(MaskSpec):
    """A mask already in memory (synthetic data, tests). Resized by nearest neighbour if the
    requested size differs."""

    array: np.ndarray = field(repr=False)

    def rasterize(self, height: int, width: int) -> np.ndarray:
        a = np.asarray(self.array, dtype=np.uint8)
        if a.shape != (height, width):
            rows = (np.arange(height) * a.shape[0] // height).clip(0, a.shape[0] - 1)
            cols = (np.arange(width) * a.shape[1] // width).clip(0, a.shape[1] - 1)
            a = a[rows][:, cols]
        return a


@dataclass(frozen=True)
class QARound:
    """One question about the image and the mask that answers it."""

    query: str
    target: MaskSpec
    style: QueryStyle = "sentence"
    class_name: str | None = None
    """Object/part name when known (semantic/part sets); used for analysis, never shown to the model."""


@dataclass(frozen=True)
class SegSample:
    """An image and its QA rounds (several rounds = several masks from one image encoder pass)."""

    sample_id: str
    image_path: str
    rounds: tuple[QARound, ...]
    dataset: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    image_array: np.ndarray | None = field(default=None, repr=False, hash=False, compare=False)
    """Pixels already in memory (uint8 H×W×3, upright); when set, ``image_path`` is only a name."""


def records_of_image(base_id: str, image_path: str, groups: list[list[QARound]], dataset: str, meta: dict[str, Any]) -> list[SegSample]:
    """One record per group of an image's rounds; ``#g`` tells them apart when there are several."""
    suffix = len(groups) > 1
    return [SegSample(base_id + (f"#{g}" if suffix else ""), image_path, tuple(group), dataset, dict(meta)) for g, group in enumerate(groups)]

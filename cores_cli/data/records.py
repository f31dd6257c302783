"""Plain sample records: what every dataset reader produces, before any tensor exists.

A reader parses its files into :class:`SegSample` records (cheap, picklable, no pixels).
One shared transform (``cores_cli.data.transform``) later opens the image, rasterises each
round's :class:`MaskSpec` at the image's size, and builds the model's tensors.

Mask values: 0 background, 1 target, 255 ignore (LISA's convention). Training treats 255 as
background; evaluation leaves 255 pixels out of intersection and union.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

IGNORE = 255

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

"""Segmentation metrics with LISA's ``validate()`` protocol (docs/EVAL.md).

Pure functions on masks plus a mergeable accumulator (:class:`IoUAccumulator`) whose state is
plain numbers, so multi-process evaluation can all-reduce or gather it.

Protocol (what LISA's ``train_ds.validate`` + ``utils.intersectionAndUnionGPU`` compute, for
the foreground class of each target mask):

- Inputs per target: a prediction (boolean ``H×W``; LISA thresholds logits at ``> 0``) and a
  target (uint8 ``H×W``, 0 background, 1 target, 255 ignore).
- Pixels whose target is 255 are left out of both intersection and union.
  ``I = #(pred ∧ target == 1)``, ``U = #(pred ∧ target ≠ 255) + #(target == 1) − I``.
  (Exactly LISA's class-1 histogram counts; a target value other than 0/1/255 counts as
  background for the target and as usable for the prediction, as in LISA.)
- gIoU: the mean over targets of ``I / (U + 1e-5)``, where a target whose union is empty
  (empty target, empty prediction, or everything ignored) scores **1.0** (LISA adds 1.0 when
  ``U == 0``; ``I`` is then 0).
- cIoU: ``ΣI / (ΣU + 1e-10)`` over all targets.
- cIoU_s / cIoU_m / cIoU_l (CoReS code): cIoU restricted to targets whose area fraction
  ``#(target == 1) / (H·W)`` is ``< 0.028`` (small), ``> 0.115`` (large), or in between
  (medium). The fraction's denominator is the whole image, ignore pixels included, and its
  numerator counts target pixels only: a target's size does not change with how much of the
  image around it is marked ignore.
- mIoU (part sets): per class ``ΣI / ΣU`` over that class's targets, then the mean over classes.
  A class whose ΣU is 0 (never in a target, never predicted) has no IoU and is left out.

One difference from LISA, on purpose: after its all-reduce LISA divides the gIoU sum by
``count + 1e-5``; we divide by ``count``. The relative difference is ``1e-5 / count``
(5e-8 for ReasonSeg val's 200 targets), far below the 4 printed decimals.

Multi-process evaluation: ``DistributedSampler`` pads the dataset by repeating samples; the
eval loop must not call :meth:`IoUAccumulator.update` for those padded indices (index ≥ the
dataset length), otherwise they are counted twice. Merge per-rank states with
:meth:`IoUAccumulator.merge` (or all-reduce :meth:`IoUAccumulator.as_vector` in float64: pixel
sums overflow float32's exact range after a few hundred large images, which LISA's float32
all-reduce silently rounds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .ignore_values import IGNORE

GIOU_EPS = 1e-5
"""LISA: ``acc_iou = I / (U + 1e-5)``."""
CIOU_EPS = 1e-10
"""LISA: ``iou_class = ΣI / (ΣU + 1e-10)``."""
SMALL_MAX_FRACTION = 0.028
"""A target covering less than 2.8 % of the image is *small* (CoReS)."""
LARGE_MIN_FRACTION = 0.115
"""A target covering more than 11.5 % of the image is *large* (CoReS)."""
BUCKETS = ("s", "m", "l")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def intersection_union(pred: Any, target: Any, ignore_index: int = IGNORE) -> tuple[int, int]:
    """Foreground intersection and union of one prediction against one target.

    Args:
        pred: ``(H, W)`` boolean mask (numpy or torch); any nonzero value is foreground.
            Threshold logits first (LISA: ``logits > 0``).
        target: ``(H, W)`` integer mask: 1 target, ``ignore_index`` ignored, anything else
            background.
    Returns:
        ``(I, U)`` as Python ints, ignore pixels excluded from both.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if _is_torch(pred) or _is_torch(target):
        import torch

        p = torch.as_tensor(pred) != 0
        t = torch.as_tensor(target, device=p.device)
        fg = t == 1
        p = p & (t != ignore_index)
        inter = int((p & fg).sum().item())
        return inter, int(p.sum().item()) + int(fg.sum().item()) - inter
    p = np.asarray(pred) != 0
    t = np.asarray(target)
    fg = t == 1
    p &= t != ignore_index
    inter = int(np.count_nonzero(p & fg))
    return inter, int(np.count_nonzero(p)) + int(np.count_nonzero(fg)) - inter


def target_iou(inter: int, union: int) -> float:
    """One target's gIoU term, as LISA computes it: ``I / (U + 1e-5)``, and 1.0 if ``U == 0``."""
    return 1.0 if union == 0 else inter / (union + GIOU_EPS)


def area_fraction(target: Any) -> float:
    """Fraction of the image covered by target pixels (value 1); ignore pixels count in the
    denominator only. ``target``: ``(H, W)`` numpy or torch."""
    n = int(np.prod(tuple(target.shape)))
    if n == 0:
        return 0.0
    if _is_torch(target):
        return float((target == 1).sum().item()) / n
    return float(np.count_nonzero(np.asarray(target) == 1)) / n


def size_bucket(fraction: float) -> str:
    """``"s"`` (< 2.8 %), ``"l"`` (> 11.5 %) or ``"m"``."""
    if fraction < SMALL_MAX_FRACTION:
        return "s"
    if fraction > LARGE_MIN_FRACTION:
        return "l"
    return "m"


def giou(pairs: Iterable[tuple[int, int]]) -> float:
    """Mean of :func:`target_iou` over ``(I, U)`` pairs; NaN when there are none."""
    scores = [target_iou(i, u) for i, u in pairs]
    return sum(scores) / len(scores) if scores else math.nan


def ciou(pairs: Iterable[tuple[int, int]]) -> float:
    """``ΣI / (ΣU + 1e-10)`` over ``(I, U)`` pairs (0.0 when there are none, as in LISA)."""
    si = su = 0
    for i, u in pairs:
        si += i
        su += u
    return si / (su + CIOU_EPS)


def miou(per_class: Mapping[str, tuple[int, int]]) -> float:
    """Mean over classes of ``ΣI / ΣU``; ``per_class`` maps a class to its ``(ΣI, ΣU)``.
    Classes with ``ΣU == 0`` are left out; NaN when no class remains."""
    ious = [i / u for i, u in per_class.values() if u > 0]
    return sum(ious) / len(ious) if ious else math.nan


@dataclass
class _Sums:
    n: int = 0
    inter: int = 0
    union: int = 0

    def add(self, inter: int, union: int) -> None:
        self.n += 1
        self.inter += inter
        self.union += union

    def as_list(self) -> list[int]:
        return [self.n, self.inter, self.union]


@dataclass
class IoUAccumulator:
    """Running sums for gIoU, cIoU, cIoU_s/m/l and per-class mIoU.

    ``update`` once per target mask (not per image); ``merge`` combines the states of
    different processes or shards; ``compute`` gives the numbers. All state is plain ints and
    floats (:meth:`state_dict`), in an order-independent sum, so merging in any order gives
    the same result.
    """

    n: int = 0
    iou_sum: float = 0.0
    inter: int = 0
    union: int = 0
    buckets: dict[str, _Sums] = field(default_factory=lambda: {b: _Sums() for b in BUCKETS})
    classes: dict[str, _Sums] = field(default_factory=dict)

    def update(self, pred: Any, target: Any, class_name: str | None = None) -> float:
        """Score one target. ``pred``: ``(H, W)`` bool; ``target``: ``(H, W)`` uint8 with 255
        ignore. Returns this target's gIoU term."""
        inter, union = intersection_union(pred, target)
        return self.add(inter, union, area_fraction(target), class_name)

    def add(self, inter: int, union: int, fraction: float, class_name: str | None = None) -> float:
        """Score one target from counts already computed (``fraction``: :func:`area_fraction`)."""
        if inter < 0 or union < inter:
            raise ValueError(f"bad counts: I={inter}, U={union}")
        score = target_iou(inter, union)
        self.n += 1
        self.iou_sum += score
        self.inter += int(inter)
        self.union += int(union)
        self.buckets[size_bucket(fraction)].add(int(inter), int(union))
        if class_name is not None:
            self.classes.setdefault(class_name, _Sums()).add(int(inter), int(union))
        return score

    def merge(self, other: IoUAccumulator) -> IoUAccumulator:
        """A new accumulator holding both states; neither input changes."""
        out = IoUAccumulator.from_state(self.state_dict())
        out.n += other.n
        out.iou_sum += other.iou_sum
        out.inter += other.inter
        out.union += other.union
        for b in BUCKETS:
            s, o = out.buckets[b], other.buckets[b]
            s.n, s.inter, s.union = s.n + o.n, s.inter + o.inter, s.union + o.union
        for name, o in other.classes.items():
            s = out.classes.setdefault(name, _Sums())
            s.n, s.inter, s.union = s.n + o.n, s.inter + o.inter, s.union + o.union
        return out

    @classmethod
    def merge_all(cls, parts: Iterable[IoUAccumulator]) -> IoUAccumulator:
        out = cls()
        for p in parts:
            out = out.merge(p)
        return out

    def compute(self) -> dict[str, Any]:
        """``giou``, ``ciou``, ``ciou_s|m|l`` (None for an empty bucket), ``n``, ``n_s|m|l``,
        ``miou`` (None without classes) and ``per_class`` IoU."""
        out: dict[str, Any] = {
            "giou": self.iou_sum / self.n if self.n else None,
            "ciou": self.inter / (self.union + CIOU_EPS) if self.n else None,
            "n": self.n,
        }
        for b in BUCKETS:
            s = self.buckets[b]
            out[f"ciou_{b}"] = s.inter / (s.union + CIOU_EPS) if s.n else None
            out[f"n_{b}"] = s.n
        per_class = {k: v.inter / v.union for k, v in sorted(self.classes.items()) if v.union > 0}
        out["miou"] = sum(per_class.values()) / len(per_class) if per_class else None
        out["per_class"] = per_class
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only: JSON-serialisable, picklable, gatherable."""
        return {
            "n": self.n,
            "iou_sum": self.iou_sum,
            "inter": self.inter,
            "union": self.union,
            "buckets": {b: self.buckets[b].as_list() for b in BUCKETS},
            "classes": {k: v.as_list() for k, v in sorted(self.classes.items())},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> IoUAccumulator:
        try:
            out = cls(
                n=int(state["n"]),
                iou_sum=float(state["iou_sum"]),
                inter=int(state["inter"]),
                union=int(state["union"]),
            )
            for b in BUCKETS:
                out.buckets[b] = _Sums(*(int(x) for x in state["buckets"][b]))
            for k, v in state.get("classes", {}).items():
                out.classes[str(k)] = _Sums(*(int(x) for x in v))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an IoUAccumulator state: {e}") from None
        return out

    # Fixed-length view for an all-reduce (the per-class part needs a gather instead).
    VECTOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "n", "iou_sum", "inter", "union",
        "s_n", "s_inter", "s_union", "m_n", "m_inter", "m_union", "l_n", "l_inter", "l_union",
    )

    def as_vector(self) -> list[float]:
        """The class-independent state as 13 numbers (see ``VECTOR_FIELDS``); sum these
        across processes in float64, then rebuild with :meth:`from_vector`."""
        vec: list[float] = [self.n, self.iou_sum, self.inter, self.union]
        for b in BUCKETS:
            vec.extend(self.buckets[b].as_list())
        return [float(x) for x in vec]

    @classmethod
    def from_vector(cls, vec: Sequence[float]) -> IoUAccumulator:
        if len(vec) != len(cls.VECTOR_FIELDS):
            raise ValueError(f"expected {len(cls.VECTOR_FIELDS)} numbers, got {len(vec)}")
        out = cls(n=round(vec[0]), iou_sum=float(vec[1]), inter=round(vec[2]), union=round(vec[3]))
        for k, b in enumerate(BUCKETS):
            out.buckets[b] = _Sums(*(round(x) for x in vec[4 + 3 * k : 7 + 3 * k]))
        return out

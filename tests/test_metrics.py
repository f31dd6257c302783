"""Metrics: hand-computed values, LISA's ignore/empty-union rules, accumulator merging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cores_cli.metrics import (
    IoUAccumulator,
    area_fraction,
    ciou,
    giou,
    intersection_union,
    miou,
    size_bucket,
    target_iou,
)

# Case A (3×4). 255 marks an ignored pixel.
#   target          pred
#   1   1 0 0       1 0 0 0
#   1 255 0 0       1 1 1 0
#   0   0 0 0       0 0 0 0
# The ignored pixel (1,1) leaves both counts. Target pixels: (0,0) (0,1) (1,0) = 3.
# Prediction outside ignore: (0,0) (1,0) (1,2) = 3. I = (0,0) (1,0) = 2. U = 3 + 3 - 2 = 4.
TARGET_A = np.array([[1, 1, 0, 0], [1, 255, 0, 0], [0, 0, 0, 0]], np.uint8)
PRED_A = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
# Case B: empty target, empty prediction -> U = 0 -> gIoU term 1.0 (LISA's "no-object target").
TARGET_B = np.zeros((3, 4), np.uint8)
PRED_B = np.zeros((3, 4), bool)
# Case C: empty target, one predicted pixel -> I = 0, U = 1 -> 0.0.
TARGET_C = np.zeros((3, 4), np.uint8)
PRED_C = np.zeros((3, 4), bool)
PRED_C[2, 3] = True


def test_intersection_union_by_hand():
    assert intersection_union(PRED_A, TARGET_A) == (2, 4)
    assert intersection_union(PRED_B, TARGET_B) == (0, 0)
    assert intersection_union(PRED_C, TARGET_C) == (0, 1)


def test_everything_ignored_counts_as_empty_union():
    target = np.full((2, 2), 255, np.uint8)
    pred = np.ones((2, 2), bool)
    assert intersection_union(pred, target) == (0, 0)
    assert target_iou(0, 0) == 1.0


def test_torch_inputs_give_the_same_counts():
    assert intersection_union(torch.from_numpy(PRED_A), torch.from_numpy(TARGET_A)) == (2, 4)
    assert intersection_union(torch.from_numpy(PRED_A).int(), TARGET_A) == (2, 4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((2, 2), bool), np.zeros((2, 3), np.uint8))


def test_giou_ciou_by_hand():
    pairs = [(2, 4), (0, 0), (0, 1)]
    # gIoU = (2 / (4 + 1e-5) + 1.0 + 0.0) / 3
    assert giou(pairs) == pytest.approx((2 / (4 + 1e-5) + 1.0) / 3, abs=1e-12)
    # cIoU = (2 + 0 + 0) / (4 + 0 + 1 + 1e-10) = 0.4
    assert ciou(pairs) == 2 / (5 + 1e-10)
    assert math.isnan(giou([]))


def test_size_bucket_boundaries():
    # 1000-pixel image: 27 px = 2.7 % small, 28 px = 2.8 % medium, 115 px = 11.5 % medium,
    # 116 px = 11.6 % large.
    def frac(k: int) -> float:
        t = np.zeros((10, 100), np.uint8)
        t.flat[:k] = 1
        return area_fraction(t)

    assert [size_bucket(frac(k)) for k in (27, 28, 115, 116)] == ["s", "m", "m", "l"]


def test_area_fraction_counts_ignore_only_in_the_denominator():
    # 3×4 = 12 pixels, 3 target pixels, 1 ignored: 3 / 12.
    assert area_fraction(TARGET_A) == pytest.approx(0.25)
    assert area_fraction(torch.from_numpy(TARGET_A)) == pytest.approx(0.25)


def test_miou_by_hand():
    # class a: (2 + 1) / (4 + 1) = 0.6; class b: 0 / 2 = 0; class c: U = 0, left out.
    assert miou({"a": (3, 5), "b": (0, 2), "c": (0, 0)}) == pytest.approx(0.3)
    assert math.isnan(miou({"c": (0, 0)}))


def _accumulate(cases) -> IoUAccumulator:
    acc = IoUAccumulator()
    for pred, target, cls in cases:
        acc.update(pred, target, cls)
    return acc


CASES = [(PRED_A, TARGET_A, "a"), (PRED_B, TARGET_B, "b"), (PRED_C, TARGET_C, "a")]


def test_accumulator_values_by_hand():
    r = _accumulate(CASES).compute()
    assert r["n"] == 3
    assert r["giou"] == pytest.approx((2 / (4 + 1e-5) + 1.0) / 3, abs=1e-12)
    assert r["ciou"] == 2 / (5 + 1e-10)
    # A covers 25 % -> large; B and C are empty -> small.
    assert (r["n_s"], r["n_m"], r["n_l"]) == (2, 0, 1)
    assert r["ciou_s"] == pytest.approx(0.0)  # I 0, U 0 + 1
    assert r["ciou_m"] is None
    assert r["ciou_l"] == pytest.approx(0.5)  # 2 / 4
    # class a: (2 + 0) / (4 + 1) = 0.4; class b: U = 0 -> no IoU.
    assert r["per_class"] == {"a": pytest.approx(0.4)}
    assert r["miou"] == pytest.approx(0.4)


def test_empty_accumulator():
    r = IoUAccumulator().compute()
    assert r["n"] == 0 and r["giou"] is None and r["ciou"] is None and r["miou"] is None


def test_merge_equals_single_pass_and_does_not_mutate():
    whole = _accumulate(CASES)
    a, b = _accumulate(CASES[:1]), _accumulate(CASES[1:])
    before = a.state_dict()
    merged = a.merge(b)
    assert a.state_dict() == before
    assert merged.state_dict() == whole.state_dict()
    assert IoUAccumulator.merge_all([b, a]).compute() == whole.compute()


def test_state_is_plain_numbers_and_round_trips():
    acc = _accumulate(CASES)
    state = json.loads(json.dumps(acc.state_dict()))
    assert IoUAccumulator.from_state(state).compute() == acc.compute()
    with pytest.raises(ValueError, match="state"):
        IoUAccumulator.from_state({"n": 1})


def test_vector_all_reduce_round_trip():
    a, b = _accumulate(CASES[:2]), _accumulate(CASES[2:])
    summed = [x + y for x, y in zip(a.as_vector(), b.as_vector())]
    rebuilt = IoUAccumulator.from_vector(summed).compute()
    whole = _accumulate(CASES).compute()
    for k in ("giou", "ciou", "ciou_s", "ciou_l", "n", "n_s", "n_m", "n_l"):
        assert rebuilt[k] == whole[k]


def _lisa_oracle(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """LISA's histogram formulation (2 classes, ignore 255), written here independently as a
    cross-check: class-1 intersection and union."""
    out = pred.clone().view(-1).float()
    tgt = target.view(-1).float()
    out[tgt == 255] = 255
    inter = out[out == tgt]
    ai = torch.histc(inter, bins=2, min=0, max=1)
    ao = torch.histc(out, bins=2, min=0, max=1)
    at = torch.histc(tgt, bins=2, min=0, max=1)
    return float(ai[1]), float((ao + at - ai)[1])


def test_matches_lisa_histogram_formulation_on_random_masks():
    g = torch.Generator().manual_seed(0)
    acc = IoUAccumulator()
    lisa_i = lisa_u = lisa_g = 0.0
    for k in range(30):
        h, w = 7 + k % 5, 9 + k % 3
        target = torch.randint(0, 2, (h, w), generator=g).to(torch.uint8)
        target[torch.rand(h, w, generator=g) < 0.2] = 255
        if k % 7 == 0:
            target[target == 1] = 0  # some empty targets
        pred = (torch.rand(h, w, generator=g) < (0.0 if k % 7 == 0 and k % 2 == 0 else 0.5)).int()
        i, u = _lisa_oracle(pred, target)
        assert intersection_union(pred, target) == (int(i), int(u))
        lisa_i, lisa_u = lisa_i + i, lisa_u + u
        lisa_g += i / (u + 1e-5) + (1.0 if u == 0 else 0.0)
        acc.update(pred, target)
    r = acc.compute()
    assert r["ciou"] == pytest.approx(lisa_i / (lisa_u + 1e-10), rel=1e-12)
    assert r["giou"] == pytest.approx(lisa_g / 30, rel=1e-12)

"""COCO RLE (cores_cli/rle.py): what pycocotools writes and reads, and malformed input refused
before it reaches pycocotools' decoder (issue 15, item 2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cores_cli import rle
from cores_cli.errors import CoresError


def coco_decode(r: dict) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools 2.0.x under numpy 2
        return mask_utils.decode({"size": r["size"], "counts": r["counts"].encode("ascii")})


@pytest.mark.parametrize("seed", range(6))
def test_encode_is_pycocotools_rle_and_decode_inverts_it(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 70, 2))
    mask = rng.random((h, w)) < [0.0, 1.0, 0.02, 0.5, 0.98, 0.3][seed]
    if seed == 5:
        mask[:] = False
        mask[h // 4 : h // 2, w // 3 :] = True  # one block: long runs, several digits each
    r = rle.encode(mask)
    assert r["size"] == [h, w] and isinstance(r["counts"], str)
    assert (coco_decode(r) == mask).all()  # pycocotools reads it back
    decoded = rle.decode(r)
    assert decoded.dtype == bool and decoded.shape == (h, w) and (decoded == mask).all()


def test_a_large_mask_round_trips():
    mask = np.zeros((1200, 1600), bool)
    mask[100:900, 200:1500] = True
    mask[400:500, :] = False
    assert (rle.decode(rle.encode(mask)) == mask).all()


def test_a_c_ordered_non_bool_mask_is_encoded_by_its_foreground():
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:6] = 255
    r = rle.encode(mask)
    assert (coco_decode(r) == (mask > 0)).all()


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"size": [2, 2], "counts": ""}, "do not describe a 2×2 mask"),
        ({"size": [2, 2], "counts": "9"}, "do not describe"),  # runs adding up to more than 4
        ({"size": [2, 2], "counts": "1"}, "do not describe"),  # fewer
        ({"size": [2, 2], "counts": "4\x7f"}, "do not describe"),  # not a digit of the format
        ({"size": [2], "counts": "4"}, "size must be [height, width]"),
        ({"size": [2, -2], "counts": "4"}, "size must be [height, width]"),
        ({"size": [2, 2], "counts": b"4"}, "not a COCO RLE"),
        ([4], "not a COCO RLE"),
    ],
)
def test_malformed_rles_are_refused(bad, message):
    with pytest.raises(CoresError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rle.decode(bad)

"""Mask specs: LISA's polygon rules, COCO polygons/RLE through pycocotools, label-map PNGs."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cores_cli.data.masks import (
    CocoMask,
    compressed_rle_total,
    LabelMapMask,
    LabelmePolygonMask,
    PolygonShape,
    decode_label_map,
    parse_coco_segmentation,
    parse_labelme_shapes,
    shapes_outside,
)

from fixtures_data import label_png

# pycocotools 2.0.x under numpy 2 warns on every decode; the oracle calls here use it directly.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def square(x0, y0, x1, y1):
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def draw(shapes, h=12, w=12):
    return LabelmePolygonMask(tuple(PolygonShape(lbl, tuple(pts)) for lbl, pts in shapes)).rasterize(h, w)


# ------------------------------------------------------------------------------- LabelMe


def test_points_are_truncated_like_int32_not_rounded():
    # 1.9 -> 1 and 5.9 -> 5 (rounding would give 2 and 6): rows/cols 1..5 = 5 x 5 = 25 pixels.
    m = draw([("target", square(1.9, 1.9, 5.9, 5.9))])
    assert m.sum() == 25
    assert m[1, 1] == 1 and m[5, 5] == 1 and m[6, 6] == 0


def test_flag_is_an_exact_label_match_and_ignore_a_substring():
    m = draw([("FLAG", square(0, 0, 3, 3)), ("flagpole", square(6, 6, 8, 8))])
    assert m[1, 1] == 0  # "FLAG" skipped
    assert m[7, 7] == 1  # "flagpole" is an ordinary target
    m = draw([("__ignore__", square(0, 0, 3, 3)), ("Ignore_region", square(6, 6, 8, 8))])
    assert m[1, 1] == 255 and m[7, 7] == 255


@pytest.mark.parametrize("order", ["big_first", "small_first"])
def test_larger_shapes_are_drawn_first_whatever_the_file_order(order):
    big_target, small_ignore = ("target", square(0, 0, 9, 9)), ("ignore", square(3, 3, 5, 5))
    shapes = [big_target, small_ignore] if order == "big_first" else [small_ignore, big_target]
    m = draw(shapes)
    assert m[4, 4] == 255 and m[0, 0] == 1 and m[9, 9] == 1
    # a big ignore with a small target inside: the target shows.
    big_ignore, small_target = ("ignore", square(0, 0, 9, 9)), ("target", square(3, 3, 5, 5))
    shapes = [small_target, big_ignore] if order == "big_first" else [big_ignore, small_target]
    m = draw(shapes)
    assert m[4, 4] == 1 and m[0, 0] == 255
    # area of 3x3 inner block = 9 target pixels
    assert (m == 1).sum() == 9


def test_degenerate_shapes_are_drawn_as_lisa_or_skipped_with_warnings():
    raw = [
        {"label": "target", "points": [[2, 3], [6, 3]]},  # 2 points: a line of 5 pixels
        {"label": "target", "points": [[9, 9]]},  # 1 point: a dot
        {"label": "target", "points": []},  # cv2 would raise: skipped
        {"label": "target", "points": [[float("nan"), 1], [3, 4], [5, 6]]},  # skipped
        {"label": "target", "points": [[1, 2, 3], [4, 5, 6]]},  # not pairs: skipped
        {"label": "target", "points": [{"x": 1, "y": 2}, {"x": 3, "y": 4}]},  # dicts: skipped
        {"label": "target"},  # no points: skipped
        "not a shape",
        {"label": 7, "points": [[0, 10], [1, 10], [1, 11]]},  # label coerced to "7"
        {"label": "flag", "points": [[0, 0], [1, 1]]},  # flags are kept (never drawn), no warning
    ]
    shapes, warnings = parse_labelme_shapes(raw)
    assert [s.label for s in shapes] == ["target", "target", "7", "flag"]
    text = "\n".join(warnings)
    for needle in ("shape 0", "drawn as a line", "shape 1", "dot", "shape 2", "no points", "shape 3", "NaN", "shape 4", "pairs", "shape 5", "shape 6", "shape 7", "shape 8", "not a string"):
        assert needle in text
    assert "shape 9" not in text
    m = LabelmePolygonMask(shapes).rasterize(12, 12)
    assert m[3, 2:7].tolist() == [1] * 5 and m[9, 9] == 1
    assert m[0, 0] == 0  # the flag is not drawn


def test_shapes_outside_the_image_draw_nothing_and_are_reported():
    shapes = (PolygonShape("target", square(20, 20, 30, 30)), PolygonShape("target", square(-5, -5, 2, 2)))
    m = LabelmePolygonMask(shapes).rasterize(10, 10)
    assert m.sum() == 9  # only the clipped 0..2 x 0..2 block of the second shape
    assert shapes_outside(shapes, 10, 10) == [0]


def test_labelme_mask_is_picklable_and_hashable():
    spec = LabelmePolygonMask((PolygonShape("target", square(1, 1, 4, 4)),))
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and hash(again) == hash(spec)
    assert np.array_equal(again.rasterize(6, 6), spec.rasterize(6, 6))


# ------------------------------------------------------------------------------------ COCO


@pytest.fixture(scope="module")
def coco_val2017(realdata):
    return json.loads((realdata / "coco/mmdet_coco_dummy/instances_val2017.json").read_text())


def _ann_to_mask(ann, h, w):
    """pycocotools' own COCO.annToMask procedure (what LISA's PACO/PASCAL-Part path uses)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle)


def _spec(ann, img):
    polys, rles, warnings = parse_coco_segmentation(ann["segmentation"])
    assert warnings == []
    return CocoMask(polys, rles, img["height"], img["width"])


def test_real_coco_annotations_match_pycocotools(coco_val2017):
    images = {im["id"]: im for im in coco_val2017["images"]}
    for ann in coco_val2017["annotations"]:
        img = images[ann["image_id"]]
        h, w = img["height"], img["width"]
        ours = _spec(ann, img).rasterize(h, w)
        assert np.array_equal(ours, _ann_to_mask(ann, h, w)), ann["id"]
        if isinstance(ann["segmentation"], list):
            # LISA's refer path: decode every polygon, sum the maps, cast to uint8
            lisa = np.sum(mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], h, w)), axis=2).astype(np.uint8)
            assert np.array_equal(ours, np.minimum(lisa, 1)), ann["id"]


def test_real_multi_polygon_and_uncompressed_crowd_rle(coco_val2017):
    anns = {a["id"]: a for a in coco_val2017["annotations"]}
    images = {im["id"]: im for im in coco_val2017["images"]}
    table = anns[2204286]
    assert len(table["segmentation"]) == 3
    img = images[table["image_id"]]
    h, w = img["height"], img["width"]
    spec = _spec(table, img)
    assert len(spec.polygons) == 3
    union = np.zeros((h, w), np.uint8)
    for poly in table["segmentation"]:
        union |= mask_utils.decode(mask_utils.frPyObjects([poly], h, w)[0])
    assert union.sum() > 0 and np.array_equal(spec.rasterize(h, w), union)

    crowd = anns[900300255917]
    assert crowd["iscrowd"] == 1 and isinstance(crowd["segmentation"]["counts"], list)
    m = _spec(crowd, images[crowd["image_id"]]).rasterize(427, 640)
    # SCHEMAS.md: the RLE decodes to 3386 px (the stored area, 4015, is wrong) with the box
    # x 59..311, y 253..337.
    assert int(m.sum()) == 3386
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (59, 253, 253, 85)


def test_real_compressed_rle_results(realdata):
    results = json.loads((realdata / "coco/cocoapi_results/instances_val2014_fakesegm100_results.json").read_text())
    for r in results[:40]:
        h, w = r["segmentation"]["size"]
        polys, rles, warnings = parse_coco_segmentation(r["segmentation"])
        assert warnings == [] and not polys and len(rles) == 1
        expected = mask_utils.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()})
        assert np.array_equal(CocoMask(polys, rles, h, w).rasterize(h, w), expected)


def test_degenerate_coco_polygons_are_dropped_with_warnings():
    seg = [
        [1, 1, 8, 1],  # 2 points; pycocotools would read a 4-number first entry as a *box*
        [1, 1, 8, 1, 8, 8, 1, 8],  # a real square
        [1, 1, 2],  # odd
        [float("nan"), 1, 5, 5, 1, 5],
        "junk",
    ]
    polys, rles, warnings = parse_coco_segmentation(seg, "ann 5")
    assert len(polys) == 1 and not rles
    assert len(warnings) == 4 and all(w.startswith("ann 5: polygon") for w in warnings)
    m = CocoMask(polys, rles, 10, 10).rasterize(10, 10)
    expected = mask_utils.decode(mask_utils.frPyObjects([seg[1]], 10, 10)[0])
    assert np.array_equal(m, expected)
    # Bad RLEs: counts that do not cover the image, no size.
    _, rles, warnings = parse_coco_segmentation([{"counts": [3, 4], "size": [3, 3]}, {"counts": "abc"}])
    assert not rles and len(warnings) == 2
    # An empty segmentation is an empty mask (LISA's len(...) == 0 case).
    polys, rles, warnings = parse_coco_segmentation([])
    assert CocoMask(polys, rles, 4, 5).rasterize(4, 5).sum() == 0 and warnings == []


def test_compressed_rle_strings_are_checked_before_decoding():
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8))
        counts = mask_utils.encode(m)["counts"].decode()
        assert compressed_rle_total(counts) == h * w
        polys, rles, warnings = parse_coco_segmentation({"counts": counts, "size": [h, w]})
        assert warnings == [] and np.array_equal(CocoMask(polys, rles, h, w).rasterize(h, w), m)
    # pycocotools "decodes" an empty or truncated string into uninitialised memory
    for bad in ("", "0", "abc", "PPYo0", "\u00e9"):
        assert compressed_rle_total(bad) != 9
        _, rles, warnings = parse_coco_segmentation({"counts": bad, "size": [3, 3]})
        assert not rles and "malformed" in warnings[0]


def test_coco_mask_touching_the_border_and_resized():
    polys, rles, _ = parse_coco_segmentation([[0, 0, 10, 0, 10, 10, 0, 10]])
    spec = CocoMask(polys, rles, 10, 10)
    m = spec.rasterize(10, 10)
    assert m.all()  # the polygon covers the whole 10 x 10 image, border included
    assert spec.rasterize(20, 5).shape == (20, 5)


# ------------------------------------------------------------------------------- label maps


def test_ade20k_label_shift_and_ignore():
    # raw 0 ("other") and 255 -> ignore; v -> v-1; 151 -> 150, no such class -> ignore.
    raw = np.array([[0, 1, 2], [255, 151, 3]], np.uint8)
    ids = decode_label_map(raw, "ade20k", num_classes=150)
    assert ids.tolist() == [[255, 0, 1], [255, 255, 2]]


def test_plain_label_map_with_ignored_classes(tmp_path):
    raw = np.array([[0, 5, 5], [7, 255, 0]], np.uint8)
    path = label_png(tmp_path / "l.png", raw)
    spec = LabelMapMask(str(path), 5, "plain", num_classes=182, ignore_ids=(7,))
    assert spec.rasterize(2, 3).tolist() == [[0, 1, 1], [255, 255, 0]]
    # nearest-neighbour resize when asked for another size
    assert spec.rasterize(4, 6).shape == (4, 6)
    palette = label_png(tmp_path / "p.png", raw, mode="P")
    assert LabelMapMask(str(palette), 0, "plain", num_classes=124).rasterize(2, 3).tolist() == [[1, 0, 0], [0, 255, 1]]

"""ReasonSeg reader: the real JSONs rasterise as LISA's loader would; layout and error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cores_cli.data.reasonseg import load_reasonseg, parse_reasonseg_file, read_split_dir
from cores_cli.errors import CoresError

from fixtures_data import blank_image, covering_size, lisa_oracle_mask, reasonseg_shape, write_reasonseg

REAL = [
    "train/10619389843_339d3c9434_o",
    "train/36110689_9cbbccb36a_o",
    "val/206674234_4cb520b13d_o",
    "val/2881277421_416273151c_o",
    "val/scene0104_00_0",
]


def _real(realdata: Path, name: str) -> tuple[Path, dict]:
    p = realdata / "reasonseg" / f"{name}.json"
    return p, json.loads(p.read_text())


@pytest.fixture(scope="module")
def real_layout(realdata, tmp_path_factory) -> Path:
    """LISA's layout with the real JSONs (symlinked, read in place) and blank JPEGs big enough
    to hold their points."""
    root = tmp_path_factory.mktemp("lisa_root")
    for name in REAL:
        src, anno = _real(realdata, name)
        dst = root / "reason_seg" / "ReasonSeg" / f"{name}.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
        blank_image(dst.with_suffix(".jpg"), *covering_size(anno["shapes"]))
    return root


@pytest.mark.parametrize("name", REAL)
def test_real_json_rasterises_like_lisa(realdata, real_layout, name):
    json_path, anno = _real(realdata, name)
    h, w = covering_size(anno["shapes"])
    rounds, meta = parse_reasonseg_file(json_path, real_layout / "reason_seg" / "ReasonSeg" / f"{name}.jpg")
    assert meta["image_size"] == (h, w)
    mask = rounds[0].target.rasterize(h, w)
    assert mask.dtype == np.uint8 and mask.shape == (h, w)
    assert np.array_equal(mask, lisa_oracle_mask(anno, h, w))
    assert (mask == 1).any()
    assert rounds[0].query == anno["text"][0].strip()
    assert rounds[0].style == ("sentence" if anno["is_sentence"] else "phrase")


def test_real_flag_and_keyhole_polygon(realdata, real_layout):
    json_path, anno = _real(realdata, "val/scene0104_00_0")
    h, w = covering_size(anno["shapes"])
    rounds, meta = parse_reasonseg_file(json_path, None)
    assert "warnings" not in meta  # the 2-point "flag" is skipped silently, as in LISA
    mask = rounds[0].target.rasterize(h, w)
    flag = next(s for s in anno["shapes"] if s["label"] == "flag")
    (x0, y0), (x1, y1) = flag["points"]
    # the flag's segment is not drawn
    xs = np.linspace(x0, x1, 20).astype(int)
    ys = np.linspace(y0, y1, 20).astype(int)
    assert (mask[ys, xs] == 0).all()
    # the keyhole target traces its hole; the hole is covered by the (smaller) ignore polygon,
    # drawn after the target: its interior is 255, the target ring around it is 1.
    ignore = np.array(next(s for s in anno["shapes"] if s["label"] == "ignore")["points"])
    cx, cy = ignore.mean(0).astype(int)
    assert mask[cy, cx] == 255
    assert (mask == 1).sum() > (mask == 255).sum() > 0


def test_real_border_points_and_several_targets(realdata):
    json_path, anno = _real(realdata, "val/2881277421_416273151c_o")
    h, w = covering_size(anno["shapes"])
    mask = parse_reasonseg_file(json_path, None)[0][0].target.rasterize(h, w)
    assert (mask[0] == 1).any()  # points at y = 0.0 fill the top row

    json_path, anno = _real(realdata, "val/206674234_4cb520b13d_o")
    h, w = covering_size(anno["shapes"])
    mask = parse_reasonseg_file(json_path, None)[0][0].target.rasterize(h, w)
    # every target polygon contributes target pixels (4 separate polygons, one mask)
    import cv2

    for s in anno["shapes"]:
        if s["label"] != "target":
            continue
        own = np.zeros((h, w), np.uint8)
        cv2.fillPoly(own, np.array([s["points"]], np.int32), 1)
        assert ((mask == 1) & (own == 1)).any()
    assert (mask == 255).any()


def test_real_escaped_quote_is_kept(realdata):
    json_path, anno = _real(realdata, "train/36110689_9cbbccb36a_o")
    rounds, _ = parse_reasonseg_file(json_path, None, queries="all")
    assert len(rounds) == len(anno["text"]) == 6
    assert '"s glare' in rounds[0].query
    assert len({id(r.target) for r in rounds}) == 1  # one mask, many phrasings


def test_split_reader_protocols(real_layout):
    val = load_reasonseg(real_layout, "val")
    assert [s.sample_id for s in val] == [
        "reasonseg/val/206674234_4cb520b13d_o",
        "reasonseg/val/2881277421_416273151c_o",
        "reasonseg/val/scene0104_00_0",
    ]
    assert all(len(s.rounds) == 1 for s in val)  # LISA's eval: text[0] only
    assert all(s.image_path.endswith(".jpg") and Path(s.image_path).is_file() for s in val)
    train = load_reasonseg(real_layout, "train")  # train defaults to every query
    assert [len(s.rounds) for s in train] == [6, 6]
    chunks = load_reasonseg(real_layout, "train", rounds_per_sample=3)
    assert [len(s.rounds) for s in chunks] == [3, 3, 3, 3]
    assert chunks[0].sample_id.endswith("#0") and chunks[1].sample_id.endswith("#1")
    short = load_reasonseg(real_layout, "val", subset="short")
    long_ = load_reasonseg(real_layout, "val", subset="long")
    assert {s.sample_id for s in short} | {s.sample_id for s in long_} == {s.sample_id for s in val}
    assert all(s.rounds[0].style == "phrase" for s in short) and len(long_) == 1


def test_layout_errors_name_the_missing_piece(tmp_path, real_layout):
    with pytest.raises(CoresError, match="reason_seg"):
        load_reasonseg(tmp_path, "val")
    with pytest.raises(CoresError, match=r"ReasonSeg/test"):
        load_reasonseg(real_layout, "test")
    d = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    write_reasonseg(d, "a", ["x"], False, [reasonseg_shape("target", [[0, 0], [4, 0], [4, 4]])], size=(8, 8))
    write_reasonseg(d, "b", ["y"], False, [reasonseg_shape("target", [[0, 0], [4, 0], [4, 4]])])
    with pytest.raises(CoresError, match=r"1 of 2 images are missing, the first is .*b\.jpg"):
        load_reasonseg(tmp_path, "val")
    assert [s.sample_id for s in load_reasonseg(tmp_path, "val", skip_missing=True)] == ["reasonseg/val/a"]
    (d / "c.json").write_text(json.dumps({"text": ["q"], "shapes": []}))
    blank_image(d / "c.jpg", 8, 8)
    with pytest.raises(CoresError, match=r"c\.json has no key 'is_sentence'"):
        load_reasonseg(tmp_path, "val", skip_missing=True)
    (d / "c.json").write_text("{not json")
    with pytest.raises(CoresError, match=r"c\.json is not valid JSON"):
        load_reasonseg(tmp_path, "val", skip_missing=True)


def test_cp1252_file_degenerate_shapes_and_png_images(tmp_path):
    d = tmp_path / "split"
    shapes = [
        reasonseg_shape("target", [[1, 1], [9, 1], [9, 9], [1, 9]]),
        reasonseg_shape("target", [[2, 12], [7, 12]]),  # a 2-point "polygon": a line
        reasonseg_shape("target", [[float("nan"), 0], [1, 1], [2, 2]]),
        reasonseg_shape("target", [[100, 100], [120, 100], [120, 120]]),  # outside a 16x16 image
    ]
    write_reasonseg(d, "caf\u00e9", ["the caf\u00e9 sign \u2019s edge"], False, shapes, encoding="cp1252")
    blank_image(d / "caf\u00e9.png", 16, 16, fmt="PNG")
    (s,) = read_split_dir(d)
    assert s.image_path.endswith(".png")
    assert s.rounds[0].query == "the caf\u00e9 sign \u2019s edge"
    warnings = "\n".join(s.meta["warnings"])
    assert "shape 1" in warnings and "line" in warnings
    assert "shape 2" in warnings and "NaN" in warnings
    assert "wholly outside the 16×16 image" in warnings
    m = s.rounds[0].target.rasterize(16, 16)
    assert (m[12, 2:8] == 1).all() and m[5, 5] == 1


def test_empty_target_is_reported_not_fatal(tmp_path):
    d = tmp_path / "split"
    write_reasonseg(d, "x", ["q"], True, [reasonseg_shape("ignore", [[0, 0], [3, 0], [3, 3]])], size=(6, 6))
    (s,) = read_split_dir(d)
    assert any("no target polygon" in w for w in s.meta["warnings"])
    assert set(np.unique(s.rounds[0].target.rasterize(6, 6))) == {0, 255}


def test_image_size_follows_exif_orientation(realdata, tmp_path):
    """A JPEG stored 1200x1800 with EXIF orientation 6 shows as 1800 wide x 1200 high (as
    cv2.imread gives LISA); polygon coordinates are in that upright frame."""
    d = tmp_path / "split"
    write_reasonseg(d, "Landscape_6", ["the landscape"], False, [reasonseg_shape("target", [[1700, 100], [1790, 100], [1790, 200]])])
    (d / "Landscape_6.jpg").symlink_to(realdata / "quirks/exif_orientation/Landscape_6.jpg")
    (s,) = read_split_dir(d)
    assert s.meta["image_size"] == (1200, 1800)
    assert "warnings" not in s.meta  # x = 1700..1790 is inside the upright image

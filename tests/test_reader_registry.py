"""Dataset names: parsing, clear errors, and dispatch to every reader family."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cores_cli.data.registry import NAME_PATTERNS, load_samples, parse_name, protocol
from cores_cli.errors import CoresError

from fixtures_data import blank_image, coco_json, label_png, reasonseg_shape, ref_record, square_poly, write_reasonseg, write_refer


@pytest.mark.parametrize(
    "name, expected",
    [
        ("reasonseg:val", ("reasonseg", "reasonseg", "val", None, None)),
        ("reasonseg:test:long", ("reasonseg", "reasonseg", "test", None, "long")),
        ("refcoco:unc:testA", ("refer", "refcoco", "testA", "unc", None)),
        ("refcoco+:unc:val", ("refer", "refcoco+", "val", "unc", None)),
        ("refcocog:val", ("refer", "refcocog", "val", "umd", None)),
        ("refclef:unc:val", ("refer", "refclef", "val", "unc", None)),
        ("ade20k:train", ("semantic", "ade20k", "train", None, None)),
        ("paco_lvis:val", ("parts", "pacolvis", "val", None, None)),
        ("pascal_part:val", ("parts", "pascalpart", "val", None, None)),
        ("partimagenet:val", ("parts", "partimagenet", "val", None, None)),
        ("synthetic:test:short", ("synthetic", "synthetic", "test", None, "short")),
    ],
)
def test_parse_names(name, expected):
    spec = parse_name(name)
    assert (spec.family, spec.dataset, spec.split, spec.split_by, spec.subset) == expected


@pytest.mark.parametrize("name", ["reasonseg", "reasonseg:dev", "refcoco:umd:val", "refcocog:umd:testZ", "ade20k:test", "coco:val", "synthetic:val:medium", "refcoco:unc:val:x"])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(CoresError) as e:
        parse_name(name)
    msg = str(e.value)
    assert name in msg and "valid names:" in msg and all(p in msg for p in NAME_PATTERNS)


def test_options_and_data_root_are_checked(tmp_path):
    with pytest.raises(CoresError, match=r"unknown option 'colour'; synthetic takes n, seed"):
        load_samples("synthetic:val", None, colour="red")
    with pytest.raises(CoresError, match="needs a data root"):
        load_samples("reasonseg:val", None)
    with pytest.raises(CoresError, match="subset"):
        load_samples("synthetic:val:short", None, n=2, subset="long")
    # None-valued options are dropped (a CLI passes its unset flags through)
    assert len(load_samples("synthetic:val", None, n=3, seed=None, queries=None)) == 3


def test_synthetic_through_the_registry():
    short = load_samples("synthetic:test:short", n=20)
    assert short and all(s.rounds[0].style == "phrase" for s in short)
    assert "first query" in protocol("synthetic:val", n=20)


def test_every_family_dispatches(tmp_path):
    root = tmp_path
    # ReasonSeg
    write_reasonseg(root / "reason_seg/ReasonSeg/val", "img", ["the cup"], False, [reasonseg_shape("target", [[1, 1], [6, 1], [6, 6]])], size=(8, 8))
    (s,) = load_samples("reasonseg:val", root)
    assert s.rounds[0].query == "the cup" and s.rounds[0].target.rasterize(8, 8).sum() > 0
    assert load_samples("reasonseg:val:long", root) == []
    # REFER
    images = [{"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 8, "width": 8}]
    anns = [{"id": 30, "image_id": 3, "category_id": 1, "segmentation": [square_poly(0, 0, 4, 4)]}]
    write_refer(root, "refcocog", "umd", [ref_record(0, 30, 3, "val", ["a box"])], {"images": images, "annotations": anns})
    blank_image(root / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000003.jpg", 8, 8)
    (r,) = load_samples("refcocog:umd:val", root)
    assert r.rounds[0].query == "a box"
    # label maps
    label_png(root / "ade20k/annotations/validation/a.png", np.full((4, 4), 2, np.uint8))
    blank_image(root / "ade20k/images/validation/a.jpg", 4, 4)
    (a,) = load_samples("ade20k:val", root, cache=False)
    assert a.rounds[0].query == "building"
    # parts
    coco_json(root / "vlpart/pascal_part/val.json", [{"id": 1, "file_name": "x.jpg", "height": 4, "width": 4}], [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": [square_poly(0, 0, 2, 2)]}], [{"id": 2, "name": "dog:tail"}])
    blank_image(root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/x.jpg", 4, 4)
    (p,) = load_samples("pascalpart:val", root)
    assert p.rounds[0].query == "the tail of the dog"
    assert "mIoU" in protocol("pascalpart:val") and "ValDataset" in protocol("refcoco:unc:val")
    # records are cheap and picklable (DataLoader workers receive them)
    records = [s, r, a, p, *load_samples("synthetic:val", n=2)]
    again = pickle.loads(pickle.dumps(records))
    for x, y in zip(records, again):
        assert x.sample_id == y.sample_id and x.rounds == y.rounds
        h, w = (8, 8) if x is s or x is r else (4, 4) if x in (a, p) else (128, 128)
        assert np.array_equal(x.rounds[0].target.rasterize(h, w), y.rounds[0].target.rasterize(h, w))


def test_an_unknown_option_is_an_error_even_when_its_value_is_none():
    # YAML reads "{n:8}" as the key "n:8" with the value None: it must not vanish silently
    with pytest.raises(CoresError, match="unknown option 'n:8'"):
        load_samples("synthetic:val", **{"n:8": None})

"""PACO-LVIS, PASCAL-Part and PartImageNet readers on small COCO-format part files built in
their layouts, and the generic COCO part reader on the real labelme2coco file."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cores_cli.data.layout import DirIndex
from cores_cli.data.parts import PartSource, load_parts, pascal_part_name, read_coco_parts
from cores_cli.errors import CoresError

from fixtures_data import blank_image, coco_json, square_poly

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rle(h: int, w: int, rows: slice, cols: slice) -> dict:
    m = np.zeros((h, w), np.uint8, order="F")
    m[rows, cols] = 1
    r = mask_utils.encode(m)
    return {"size": [h, w], "counts": r["counts"].decode()}


@pytest.fixture()
def pascal_root(tmp_path):
    base = tmp_path / "vlpart" / "pascal_part"
    cats = [
        {"id": 1, "name": "car:wheel"},
        {"id": 19, "name": "car:license plate", "abbr": "car:liplate"},
        {"id": 30, "name": "person:head"},
        {"id": 31, "name": "person:hand"},
    ]
    images = [{"id": 2008000002, "file_name": "2008_000002.jpg", "height": 20, "width": 30}]
    anns = [
        # two wheel instances (compressed RLE, as VLPart writes them): one round, their union
        {"id": 0, "image_id": 2008000002, "category_id": 1, "iscrowd": 0, "segmentation": _rle(20, 30, slice(12, 18), slice(2, 8))},
        {"id": 1, "image_id": 2008000002, "category_id": 1, "iscrowd": 0, "segmentation": _rle(20, 30, slice(12, 18), slice(20, 26))},
        # a plate polygon touching the right and bottom border, plus a degenerate 2-point polygon
        {"id": 2, "image_id": 2008000002, "category_id": 19, "iscrowd": 0, "segmentation": [square_poly(24, 16, 30, 20), [1, 1, 5, 1]]},
        # a head, two disjoint polygons
        {"id": 3, "image_id": 2008000002, "category_id": 30, "iscrowd": 0, "segmentation": [square_poly(0, 0, 4, 4), square_poly(10, 0, 14, 4)]},
        # a hand whose only polygon is degenerate: the round is left out
        {"id": 4, "image_id": 2008000002, "category_id": 31, "iscrowd": 0, "segmentation": [[3, 3, 4, 4]]},
        {"id": 5, "image_id": 999, "category_id": 1, "segmentation": []},  # unknown image
    ]
    for split in ("train", "val"):
        coco_json(base / f"{split}.json", images, anns, cats)
    blank_image(base / "VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg", 20, 30)
    return tmp_path


def test_pascal_part_rounds_unions_and_warnings(pascal_root):
    (s,) = load_parts("pascalpart", pascal_root, "val")
    assert s.sample_id == "pascalpart:val/2008000002" and s.meta["image_size"] == (20, 30)
    assert [r.query for r in s.rounds] == ["the wheel of the car", "the license plate of the car", "the head of the person"]
    assert [r.class_name for r in s.rounds] == ["car:wheel", "car:license plate", "person:head"]
    wheel = s.rounds[0].target.rasterize(20, 30)
    assert wheel.sum() == 72 and wheel[14, 4] == 1 and wheel[14, 22] == 1
    plate = s.rounds[1].target.rasterize(20, 30)
    assert plate[19, 29] == 1 and plate.sum() == 6 * 4  # clipped at the border
    head = s.rounds[2].target.rasterize(20, 30)
    assert head[2, 2] == 1 and head[2, 12] == 1
    w = "\n".join(s.meta["warnings"])
    assert "ann 2: polygon 1 has 2 point(s)" in w and "'person:hand': no valid segmentation" in w
    # cores eval counts warnings by kind: none of these may fall under "other"
    from cores_cli.data.records import warning_kind

    assert {warning_kind(x) for x in s.meta["warnings"]} == {"bad_polygon", "no_valid_segmentation"}


def test_instance_masks_option_and_train_phrasing(pascal_root):
    (s,) = load_parts("pascalpart", pascal_root, "val", instance_masks=True)
    assert [r.class_name for r in s.rounds] == ["car:wheel", "car:wheel", "car:license plate", "person:head"]
    assert s.rounds[0].target.rasterize(20, 30).sum() == 36
    train = load_parts("pascalpart", pascal_root, "train")
    assert [len(t.rounds) for t in train] == [3]
    assert {r.query for r in train[0].rounds} <= {
        "the wheel of the car", "car wheel", "the license plate of the car", "car license plate", "the head of the person", "person head",
    }
    assert [r.query for r in load_parts("pascalpart", pascal_root, "train")[0].rounds] == [r.query for r in train[0].rounds]


def test_partimagenet_zero_based_ids_typo_and_wnid_folders(tmp_path):
    base = tmp_path / "vlpart" / "partimagenet"
    cats = [{"id": 0, "name": "Car Tier", "supercategory": "Car"}, {"id": 1, "name": "Car Side Mirror", "supercategory": "Car"}]
    images = [
        {"id": 1, "file_name": "n02814533_1234.JPEG", "height": 10, "width": 10},
        {"id": 2, "file_name": "n02814533_99.JPEG", "height": 10, "width": 10},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 0, "segmentation": [square_poly(0, 5, 4, 10)]},
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [square_poly(1, 1, 3, 3)]},
    ]
    coco_json(base / "val.json", images, anns, cats)
    blank_image(base / "val/n02814533/n02814533_1234.JPEG", 10, 10, fmt="JPEG")
    blank_image(base / "val/n02814533_99.JPEG", 10, 10, fmt="JPEG")  # a flat layout works too
    a, b = load_parts("partimagenet", tmp_path, "val")
    assert a.rounds[0].query == "the tire of the car" and a.rounds[0].class_name == "Car Tier"
    assert a.image_path.endswith("val/n02814533/n02814533_1234.JPEG")
    assert b.rounds[0].query == "the side mirror of the car" and b.image_path.endswith("val/n02814533_99.JPEG")
    # VLPart's rewritten file is preferred when present
    coco_json(base / "val_format.json", images[:1], anns[:1], cats)
    assert len(load_parts("partimagenet", tmp_path, "val")) == 1


def test_paco_names_and_coco_image_root(tmp_path):
    cats = [{"id": 5, "name": "trash_can:lid"}, {"id": 6, "name": "glass_(drink_container):bottom"}, {"id": 7, "name": "mug"}]
    images = [{"id": 1, "file_name": "val2017/000000000001.jpg", "height": 8, "width": 8}]
    anns = [{"id": i, "image_id": 1, "category_id": c, "segmentation": [square_poly(i, i, i + 2, i + 2)]} for i, c in enumerate((5, 6, 7))]
    coco_json(tmp_path / "vlpart/paco/annotations/paco_lvis_v1_val.json", images, anns, cats)
    blank_image(tmp_path / "coco/val2017/000000000001.jpg", 8, 8)
    (s,) = load_parts("pacolvis", tmp_path, "val")
    assert [r.query for r in s.rounds] == ["the lid of the trash_can", "the bottom of the glass", "mug"]


def test_layout_errors(pascal_root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("none")
    with pytest.raises(CoresError, match=r"vlpart/pascal_part"):
        load_parts("pascalpart", empty, "val")
    with pytest.raises(CoresError, match=r"paco_lvis_v1_val\.json"):
        (empty / "vlpart/paco/annotations").mkdir(parents=True)
        (empty / "coco").mkdir()
        load_parts("pacolvis", empty, "val")
    with pytest.raises(CoresError, match=r"val_format\.json or .*val\.json"):
        (empty / "vlpart/partimagenet").mkdir(parents=True)
        load_parts("partimagenet", empty, "val")
    with pytest.raises(CoresError, match="no split 'test'"):
        load_parts("pascalpart", pascal_root, "test")
    (pascal_root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg").unlink()
    with pytest.raises(CoresError, match=r"1 of 1 images are missing, the first is .*2008_000002\.jpg"):
        load_parts("pascalpart", pascal_root, "val")
    (pascal_root / "vlpart/pascal_part/val.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(CoresError, match="has no key 'categories'"):
        load_parts("pascalpart", pascal_root, "val")


def test_real_labelme2coco_file(realdata):
    """The real COCO file (category 0, file names with a folder, a 3-point polygon in a
    4-polygon annotation) read through the generic part reader."""
    base = realdata / "coco/labelme_instance_segmentation/data_dataset_coco"
    source = PartSource("labelme", "val", base / "annotations.json", pascal_part_name, lambda img, _ix: base / img["file_name"])
    samples = read_coco_parts(source)
    assert [s.sample_id for s in samples] == ["labelme:val/0", "labelme:val/1", "labelme:val/2"]
    import json

    data = json.loads((base / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    for s in samples:
        h, w = s.meta["image_size"]
        anns = [a for a in data["annotations"] if a["image_id"] == s.meta["image_id"]]
        assert sorted(r.class_name for r in s.rounds) == sorted({names[a["category_id"]] for a in anns})
        for r in s.rounds:
            expected = np.zeros((h, w), np.uint8)
            for a in anns:
                if names[a["category_id"]] == r.class_name:
                    expected |= mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
            assert np.array_equal(r.target.rasterize(h, w), expected), r.class_name
        assert "warnings" not in s.meta  # the 3-point polygon is valid
    assert DirIndex().exists(base / data["images"][0]["file_name"])

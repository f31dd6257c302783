"""ADE20K / COCO-Stuff / Mapillary readers on tiny label maps built in LISA's layouts."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cores_cli.data.semantic import ADE20K_CLASSES, COCOSTUFF_CLASSES, build_label_index, load_semantic, ade20k_source
from cores_cli.errors import CoresError

from fixtures_data import blank_image, label_png


@pytest.fixture()
def ade_root(tmp_path):
    # raw 0 = "other" (ignore), 1 = wall (class 0), 3 = sky (class 2), 151 = no such class
    a = np.zeros((6, 8), np.uint8)
    a[0:3, :] = 1  # wall along the top border
    a[3:5, 0:4] = 3
    a[5, 7] = 151
    a[5, 0] = 255
    label_png(tmp_path / "ade20k/annotations/training/ADE_train_00000001.png", a)
    blank_image(tmp_path / "ade20k/images/training/ADE_train_00000001.jpg", 6, 8)
    label_png(tmp_path / "ade20k/annotations/training/ADE_train_00000002.png", np.zeros((4, 4), np.uint8))  # nothing
    blank_image(tmp_path / "ade20k/images/training/ADE_train_00000002.jpg", 4, 4)
    many = np.arange(1, 9, dtype=np.uint8).repeat(2).reshape(4, 4)  # 8 classes
    label_png(tmp_path / "ade20k/annotations/validation/ADE_val_00000001.png", many)
    blank_image(tmp_path / "ade20k/images/validation/ADE_val_00000001.jpg", 4, 4)
    return tmp_path


def test_ade20k_shift_ignore_and_rounds(ade_root, tmp_path):
    (s,) = load_semantic("ade20k", ade_root, "train", cache_dir=tmp_path / "cache")
    assert s.sample_id == "ade20k:train/ADE_train_00000001"
    assert sorted(r.query for r in s.rounds) == ["sky", "wall"]
    assert {r.style for r in s.rounds} == {"phrase"}
    wall = next(r for r in s.rounds if r.query == "wall").target.rasterize(6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[0:3] = 1
    expected[3:5, 4:] = 255  # raw 0
    expected[5] = 255  # raw 0, 151 and 255
    assert wall.tolist() == expected.tolist()
    sky = next(r for r in s.rounds if r.query == "sky").target.rasterize(6, 8)
    assert (sky == 1).sum() == 8 and sky[0, 0] == 0


def test_ade20k_val_keeps_all_classes_train_chunks(ade_root, tmp_path):
    (val,) = load_semantic("ade20k", ade_root, "val", cache=False)
    assert sorted(r.class_name for r in val.rounds) == sorted(ADE20K_CLASSES[:8])
    chunks = load_semantic("ade20k", ade_root, "val", rounds_per_sample=3, cache=False)
    assert [len(c.rounds) for c in chunks] == [3, 3, 2]
    assert sorted(r.query for c in chunks for r in c.rounds) == sorted(r.query for r in val.rounds)
    again = load_semantic("ade20k", ade_root, "val", rounds_per_sample=3, cache=False)
    assert [[r.query for r in c.rounds] for c in chunks] == [[r.query for r in c.rounds] for c in again]


def test_label_index_is_cached_and_invalidated(ade_root, tmp_path):
    cache = tmp_path / "cache"
    source = ade20k_source(ade_root, "train")
    calls = []
    first = build_label_index(source, cache_dir=cache, progress=lambda k, n: calls.append((k, n)))
    assert calls[-1] == (2, 2) and len(list(cache.glob("ade20k-train-*.json"))) == 1
    calls.clear()
    assert build_label_index(source, cache_dir=cache, progress=lambda k, n: calls.append((k, n))) == first
    assert calls == []  # served from the cache
    p = ade_root / "ade20k/annotations/training/ADE_train_00000002.png"
    label_png(p, np.full((4, 4), 5, np.uint8))
    os.utime(p, ns=(1, 1))
    rebuilt = build_label_index(source, cache_dir=cache)
    assert rebuilt["ADE_train_00000002.png"] == [4]


def test_cocostuff_merged_classes_are_ignored(tmp_path):
    a = np.full((5, 5), 255, np.uint8)
    a[0, :] = 0  # person
    a[1, :] = COCOSTUFF_CLASSES.index("building-other")
    a[2:4, :] = COCOSTUFF_CLASSES.index("sky")
    label_png(tmp_path / "cocostuff/val2017/000000000139.png", a)
    blank_image(tmp_path / "coco/val2017/000000000139.jpg", 5, 5)
    (s,) = load_semantic("cocostuff", tmp_path, "val", cache=False)
    assert sorted(r.query for r in s.rounds) == ["person", "sky"]  # never "building-other"
    sky = next(r for r in s.rounds if r.query == "sky").target.rasterize(5, 5)
    assert sky[:, 0].tolist() == [0, 255, 1, 1, 255]


def test_mapillary_config_names_and_palette_labels(tmp_path):
    base = tmp_path / "mapillary"
    base.mkdir()
    labels = [{"readable": "Bird", "name": "animal--bird"}, {"readable": "Road", "name": "construction--flat--road"}, {"readable": "Unlabeled", "name": "void--unlabeled"}]
    (base / "config_v2.0.json").write_text(json.dumps({"labels": labels}))
    a = np.array([[0, 1, 1], [2, 2, 1]], np.uint8)
    label_png(base / "training/v2.0/labels/abc.png", a, mode="P")
    blank_image(base / "training/images/abc.jpg", 2, 3)
    (s,) = load_semantic("mapillary", tmp_path, "train", cache=False)
    assert sorted(r.query for r in s.rounds) == ["bird", "road"]  # lower-cased; unlabeled left out
    road = next(r for r in s.rounds if r.query == "road").target.rasterize(2, 3)
    assert road.tolist() == [[0, 1, 1], [255, 255, 1]]


def test_layout_errors_and_bad_files(ade_root, tmp_path, caplog):
    with pytest.raises(CoresError, match=r"mapillary"):
        load_semantic("mapillary", ade_root, "train", cache=False)
    (ade_root / "mapillary").mkdir()
    with pytest.raises(CoresError, match=r"config_v2\.0\.json"):
        load_semantic("mapillary", ade_root, "train", cache=False)
    with pytest.raises(CoresError, match=r"cocostuff/\{train2017,val2017\}"):
        load_semantic("cocostuff", ade_root, "train", cache=False)
    with pytest.raises(CoresError, match="no split 'test'"):
        load_semantic("ade20k", ade_root, "test", cache=False)
    with pytest.raises(CoresError, match="unknown label-map dataset"):
        load_semantic("cityscapes", ade_root, "train", cache=False)
    (ade_root / "ade20k/images/training/ADE_train_00000001.jpg").unlink()
    with pytest.raises(CoresError, match=r"images are missing, the first is .*ADE_train_00000001\.jpg"):
        load_semantic("ade20k", ade_root, "train", cache=False)
    assert load_semantic("ade20k", ade_root, "train", cache=False, skip_missing=True) == []
    # an RGB "label map" is reported and left out, not a crash
    Image.new("RGB", (4, 4)).save(ade_root / "ade20k/annotations/validation/ADE_val_00000002.png")
    blank_image(ade_root / "ade20k/images/validation/ADE_val_00000002.jpg", 4, 4)
    with caplog.at_level(logging.WARNING, logger="cores.data"):
        val = load_semantic("ade20k", ade_root, "val", cache=False)
    assert [s.sample_id for s in val] == ["ade20k:val/ADE_val_00000001"]
    assert "ADE_val_00000002.png" in caplog.text and "mode RGB" in caplog.text


def test_custom_class_file(ade_root, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("0: unlabeled\n1: alpha\n2: beta\n3: gamma\n")
    (s,) = load_semantic("ade20k", ade_root, "train", cache=False, classes_file=names)
    # ade20k shift: raw 1 -> class 0 = alpha, raw 3 -> class 2 = gamma
    assert sorted(r.query for r in s.rounds) == ["alpha", "gamma"]

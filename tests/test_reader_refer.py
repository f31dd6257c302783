"""REFER reader on a tiny refs(unc).p + instances.json + images built in the real layout."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cores_cli.data.refer import load_refer, load_refs_pickle
from cores_cli.errors import CoresError

from fixtures_data import blank_image, ref_record, square_poly, write_refer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COCO_IMAGES = "refer_seg/images/mscoco/images/train2014"


@pytest.fixture()
def refcoco_root(tmp_path, realdata):
    """refcoco (unc) with the documented real ref record (ref 0, image 581857, ann 1719310)
    joined to the documented real annotation polygon, plus hand-made refs."""
    real_ref = json.loads((realdata / "refcoco/refs_unc_ref0_from_docs.json").read_text())[0]
    real_ann = json.loads((realdata / "refcoco/instances_records_from_docs.json").read_text())["annotations"][0]
    real_ann = dict(real_ann, id=real_ref["ann_id"], image_id=real_ref["image_id"])
    crowd = np.zeros((40, 50), np.uint8, order="F")
    crowd[5:15, 30:45] = 1
    counts = mask_utils.encode(crowd)  # compressed; make it uncompressed by hand below
    flat = crowd.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert mask_utils.decode(counts).sum() == crowd.sum()
    images = [
        {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "height": 424, "width": 640},
        {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 40, "width": 50},
        {"id": 8, "file_name": "COCO_train2014_000000000008.jpg", "height": 40, "width": 50},
    ]
    annotations = [
        real_ann,
        # two polygons, one touching the border, plus a degenerate one (2 points)
        {"id": 70, "image_id": 7, "category_id": 3, "iscrowd": 0,
         "segmentation": [square_poly(0, 0, 10, 10), [20, 20, 30, 20], square_poly(20, 25, 30, 35)]},
        {"id": 71, "image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": {"counts": runs, "size": [40, 50]}},
        {"id": 80, "image_id": 8, "category_id": 1, "iscrowd": 0, "segmentation": []},
    ]
    refs = [
        real_ref,
        ref_record(1, 70, 7, "val", ["  The Left Car ", "car on the left"], 3),
        ref_record(2, 71, 7, "val", ["crowd of people"]),
        ref_record(3, 80, 8, "testA", ["nothing here"]),
        ref_record(4, 999, 8, "testB", ["ghost"]),  # annotation missing from instances.json
        ref_record(5, 70, 7, "train", ["a", "b", "c", "d"], 3),
    ]
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    write_refer(tmp_path, "refcoco", "unc", refs, instances)
    for im in images:
        blank_image(tmp_path / COCO_IMAGES / im["file_name"], im["height"], im["width"])
    return tmp_path


def test_val_protocol_one_sample_per_image_all_sentences(refcoco_root):
    (s,) = load_refer(refcoco_root, "refcoco", "val")
    assert s.sample_id == "refcoco:unc:val/7" and s.image_path.endswith("COCO_train2014_000000000007.jpg")
    assert [r.query for r in s.rounds] == ["the left car", "car on the left", "crowd of people"]
    assert {r.style for r in s.rounds} == {"phrase"} and s.rounds[0].class_name == "car"
    m = s.rounds[0].target.rasterize(40, 50)
    expected = np.zeros((40, 50), np.uint8)
    for poly in (square_poly(0, 0, 10, 10), square_poly(20, 25, 30, 35)):
        expected |= mask_utils.decode(mask_utils.frPyObjects([poly], 40, 50)[0])
    assert np.array_equal(m, expected) and m[0, 0] == 1  # the border-touching square
    assert any("polygon 1 has 2 point(s)" in w for w in s.meta["warnings"])
    crowd = s.rounds[2].target.rasterize(40, 50)
    assert crowd.sum() == 150 and crowd[5:15, 30:45].all()
    assert s.meta["image_size"] == (40, 50) and s.meta["ref_ids"] == [1, 2]


def test_real_ref_record_on_train(refcoco_root, realdata):
    train = load_refer(refcoco_root, "refcoco", "train")
    real = [s for s in train if s.sample_id.startswith("refcoco:unc:train/581857")]
    queries = sorted(r.query for s in real for r in s.rounds)
    assert queries == ["blue shirt", "lady with back to us", "the lady with the blue shirt"]
    m = real[0].rounds[0].target.rasterize(424, 640)
    assert 150 < m.sum() < 260  # the documented polygon: area 197.3
    # train: sentences shuffled with a fixed seed and chunked into <= 3 rounds
    other = [s for s in train if s.sample_id.startswith("refcoco:unc:train/7")]
    assert sorted(len(s.rounds) for s in other) == [1, 3]
    again = load_refer(refcoco_root, "refcoco", "train")
    assert [[r.query for r in s.rounds] for s in train] == [[r.query for r in s.rounds] for s in again]


def test_empty_segmentation_and_missing_annotation(refcoco_root):
    (s,) = load_refer(refcoco_root, "refcoco", "testA")
    assert s.rounds[0].target.rasterize(40, 50).sum() == 0  # LISA: empty segmentation -> empty mask
    assert load_refer(refcoco_root, "refcoco", "testB") == []  # its only ref points at no annotation
    # "test" takes every split containing "test"
    assert [s.sample_id for s in load_refer(refcoco_root, "refcoco", "test")] == ["refcoco:unc:test/8"]


def test_layout_errors_name_the_missing_piece(refcoco_root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CoresError, match="refer_seg"):
        load_refer(empty, "refcoco", "val")
    with pytest.raises(CoresError, match=r"refer_seg/refcoco\+"):
        load_refer(refcoco_root, "refcoco+", "val")
    with pytest.raises(CoresError, match=r"refs\(google\)\.p"):
        load_refer(refcoco_root, "refcoco", "val", "google")
    with pytest.raises(CoresError, match="no split_by 'umd'"):
        load_refer(refcoco_root, "refcoco", "val", "umd")
    with pytest.raises(CoresError, match="no refs with split 'testC'.*splits present: testA, testB, train, val"):
        load_refer(refcoco_root, "refcoco", "testC")
    (refcoco_root / COCO_IMAGES / "COCO_train2014_000000000007.jpg").unlink()
    with pytest.raises(CoresError, match=r"1 of 1 images are missing, the first is .*000000000007\.jpg"):
        load_refer(refcoco_root, "refcoco", "val")
    assert load_refer(refcoco_root, "refcoco", "val", skip_missing=True) == []
    inst = refcoco_root / "refer_seg/refcoco/instances.json"
    inst.write_text(json.dumps({"images": []}))
    with pytest.raises(CoresError, match="has no key 'annotations'"):
        load_refer(refcoco_root, "refcoco", "val")
    inst.unlink()
    with pytest.raises(CoresError, match=r"instances\.json"):
        load_refer(refcoco_root, "refcoco", "val")


def test_refclef_rle_list_layout(tmp_path):
    m = np.zeros((30, 40), np.uint8, order="F")
    m[3:9, 4:20] = 1
    rle = mask_utils.encode(m)
    seg = [{"counts": rle["counts"].decode(), "size": [30, 40]}]
    images = [{"id": 25, "file_name": "25/images/25234.jpg", "height": 30, "width": 40}]
    anns = [{"id": 1, "image_id": 25, "category_id": 2, "segmentation": seg}]
    write_refer(tmp_path, "refclef", "unc", [ref_record(0, 1, 25, "testB", ["left man"])], {"images": images, "annotations": anns})
    blank_image(tmp_path / "refer_seg/images/saiapr_tc-12/25/images/25234.jpg", 30, 40)
    (s,) = load_refer(tmp_path, "refclef", "testB")
    assert np.array_equal(s.rounds[0].target.rasterize(30, 40), m)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    d = tmp_path / "refer_seg" / "refcoco"
    d.mkdir(parents=True)
    with open(d / "refs(unc).p", "wb") as fh:
        pickle.dump([{"ref_id": 0, "payload": _Payload(str(marker))}], fh)
    # the payload is live: plain pickle.load would run it
    with pytest.raises(CoresError, match=r"builtins\.exec.*refusing"):
        load_refs_pickle(d / "refs(unc).p")
    assert not marker.exists()
    (d / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    (tmp_path / COCO_IMAGES).mkdir(parents=True)
    with pytest.raises(CoresError, match="refusing"):
        load_refer(tmp_path, "refcoco", "val")
    assert not marker.exists()


def test_plain_python2_style_pickle_loads(tmp_path):
    p = tmp_path / "refs.p"
    refs = [{"ref_id": 1, "sentences": [{"sent": "caf\u00e9"}], "ids": {1, 2}, "t": (1, 2.5)}]
    p.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_refs_pickle(p) == refs
    p.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CoresError, match="not a readable pickle"):
        load_refs_pickle(p)

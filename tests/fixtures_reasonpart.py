"""Small PartImageNet-like and PASCAL-Part-like COCO-format fixtures for make-reasonpart tests.

Both follow the real files' quirks (SCHEMAS.md §E, §F): PartImageNet has 0-based category ids,
"Supercategory Part" names with the "Tier" typo, upper-case ``.JPEG`` names without the wnid
folder that the images live in, and polygon lists (several per annotation, several instances
per class); PASCAL-Part has "object:part" names (one with an ``abbr``), ``2008_000002.jpg``
names, ids like 2008000002 and compressed RLE (plus one uncompressed RLE here), including a part
with a hole (a ring) and a part with an island inside its hole. Images are random-noise JPEGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from fixtures_data import coco_json

PIN_CATEGORIES = [
    {"id": 0, "name": "Fish Head", "supercategory": "Fish"},
    {"id": 1, "name": "Fish Body", "supercategory": "Fish"},
    {"id": 2, "name": "Fish Fin", "supercategory": "Fish"},
    {"id": 3, "name": "Fish Tail", "supercategory": "Fish"},
    {"id": 4, "name": "Car Body", "supercategory": "Car"},
    {"id": 5, "name": "Car Tier", "supercategory": "Car"},
    {"id": 6, "name": "Car Side Mirror", "supercategory": "Car"},
]

PP_CATEGORIES = [
    {"id": 1, "name": "bicycle:wheel"},
    {"id": 2, "name": "bicycle:saddle"},
    {"id": 3, "name": "car:license plate", "abbr": "car:liplate"},
    {"id": 4, "name": "person:head"},
    {"id": 5, "name": "person:torso"},
]


@dataclass
class PartFixture:
    ann: Path
    images: Path
    n_images: int


def noise_jpeg(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG", quality=80)


def poly(*xy: float) -> list[float]:
    return [float(v) for v in xy]


def rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": r["counts"].decode()}
    flat = mask.astype(np.int8).flatten(order="F")  # column-major, the first run is background
    edges = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
    runs = np.diff(edges).tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": ([0] if flat[0] else []) + runs}


def partimagenet_fixture(root: Path, n_images: int = 6, h: int = 60, w: int = 80) -> PartFixture:
    """``n_images`` images alternating fish and cars; every one has a tiny part (< 0.5 %)."""
    images, anns = [], []
    aid = 100
    for i in range(n_images):
        fish = i % 2 == 0
        wnid = "n01440764" if fish else "n02814533"
        name = f"{wnid}_{1000 + i}.JPEG"
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        noise_jpeg(root / "val" / wnid / name, h, w, seed=i)
        dx = i % 3
        if fish:
            parts = [
                (1, [poly(20 + dx, 20, 55 + dx, 18, 58 + dx, 35, 22 + dx, 40)]),  # body
                (0, [poly(55 + dx, 18, 70 + dx, 24, 58 + dx, 35)]),  # head (triangle)
                (2, [poly(30, 10, 40, 19, 28, 19), poly(30, 40, 40, 39, 33, 50)]),  # two fins, one annotation
                (3, [poly(5, 15, 20, 28, 6, 42)]),  # tail
                (2, [poly(44, 42, 46, 42, 45, 44)]),  # a second fin annotation: tiny
            ]
        else:
            parts = [
                (4, [poly(10, 15, 70, 15, 72, 40, 8, 40)]),
                (5, [poly(12 + dx, 40, 24 + dx, 40, 24 + dx, 52, 12 + dx, 52)]),
                (5, [poly(54, 40, 66, 40, 66, 52, 54, 52)]),  # second tire instance
                (6, [poly(66, 20, 68, 20, 68, 22)]),  # mirror: tiny
            ]
        for cat, segs in parts:
            anns.append({"id": aid, "image_id": i + 1, "category_id": cat, "iscrowd": 0, "segmentation": segs, "area": 1.0, "bbox": [0, 0, 1, 1]})
            aid += 1
    ann = coco_json(root / "val.json", images, anns, PIN_CATEGORIES)
    return PartFixture(ann, root / "val", n_images)


def ring(h: int, w: int, cy: int, cx: int, r_out: int, r_in: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (cx, cy), r_out, 1, -1)
    cv2.circle(m, (cx, cy), r_in, 0, -1)
    return m


def pascalpart_fixture(root: Path, n_images: int = 6, h: int = 64, w: int = 96) -> PartFixture:
    """Bicycles (wheels are rings: holes; one wheel has a hub inside its hole) and people."""
    images, anns = [], []
    aid = 0
    jpegs = root / "VOCdevkit" / "VOC2010" / "JPEGImages"
    for i in range(n_images):
        stem = f"2008_{i + 2:06d}"
        image_id = int(f"2008{i + 2:06d}")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w})
        noise_jpeg(jpegs / f"{stem}.jpg", h, w, seed=100 + i)
        if i % 2 == 0:
            front = ring(h, w, 40, 22, 14, 9)
            back = ring(h, w, 40, 70, 14, 9)
            back[38:43, 68:73] = 1  # a hub inside the hole: an island
            saddle = np.zeros((h, w), np.uint8)
            saddle[10:14, 40:52] = 1
            parts = [(1, rle(front)), (1, rle(back, compressed=False)), (2, rle(saddle))]
        else:
            head = np.zeros((h, w), np.uint8)
            cv2.circle(head, (48, 14), 9, 1, -1)
            torso = np.zeros((h, w), np.uint8)
            torso[24:60, 36:60] = 1
            parts = [(4, rle(head)), (5, rle(torso))]
        for cat, seg in parts:
            anns.append({"id": aid, "image_id": image_id, "category_id": cat, "iscrowd": 0, "segmentation": seg, "area": 1.0, "bbox": [0.0, 0.0, 1.0, 1.0]})
            aid += 1
    ann = coco_json(root / "val.json", images, anns, PP_CATEGORIES)
    return PartFixture(ann, jpegs, n_images)

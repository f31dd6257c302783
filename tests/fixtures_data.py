"""Builders for small dataset fixtures in the real layouts, shared by the reader tests.

Everything is written under a pytest ``tmp_path``; the real files in ../shared/realdata are
only ever read in place (or symlinked, never copied into the repository).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image


def blank_image(path: Path, height: int, width: int, fmt: str | None = None, color: tuple[int, int, int] = (90, 90, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path, format=fmt)
    return path


def covering_size(shapes: list[dict], margin: int = 7) -> tuple[int, int]:
    """(height, width) of an image that holds every point of ``shapes`` (ReasonSeg images are
    not public in small form, so tests pair the real JSONs with blank images this large)."""
    xs = [p[0] for s in shapes for p in s["points"]]
    ys = [p[1] for s in shapes for p in s["points"]]
    return int(math.ceil(max(ys))) + margin, int(math.ceil(max(xs))) + margin


def lisa_oracle_mask(anno: dict, height: int, width: int) -> np.ndarray:
    """The ReasonSeg mask computed independently in the test, following LISA's documented
    procedure step by step: skip label == "flag" (case-insensitive), measure each polygon by
    drawing it alone, draw from the largest to the smallest, 255 for labels containing
    "ignore", 1 otherwise; points cast with np.int32."""
    kept, sizes = [], []
    for shape in anno["shapes"]:
        if shape["label"].lower() == "flag":
            continue
        pts = np.array([shape["points"]], dtype=np.int32)
        canvas = np.zeros((height, width), np.uint8)
        cv2.polylines(canvas, pts, True, 1, 1)
        cv2.fillPoly(canvas, pts, 1)
        kept.append(shape)
        sizes.append(canvas.sum())
    out = np.zeros((height, width), np.uint8)
    for idx in list(np.argsort(sizes)[::-1].astype(np.int32)):
        shape = kept[idx]
        value = 255 if "ignore" in shape["label"].lower() else 1
        pts = np.array([shape["points"]], dtype=np.int32)
        cv2.polylines(out, pts, True, value, 1)
        cv2.fillPoly(out, pts, value)
    return out


def reasonseg_shape(label: str, points: list[list[float]]) -> dict:
    return {"label": label, "labels": [label], "shape_type": "polygon", "points": points, "group_id": None, "flags": {}}


def write_reasonseg(split_dir: Path, stem: str, texts: list[str], is_sentence: bool, shapes: list[dict], size: tuple[int, int] | None = None, encoding: str = "utf-8") -> Path:
    """A ReasonSeg JSON (and a blank JPEG of ``size`` = (h, w), when given)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    p = split_dir / f"{stem}.json"
    p.write_bytes(json.dumps({"text": texts, "is_sentence": is_sentence, "shapes": shapes}, indent=2, ensure_ascii=False).encode(encoding))
    if size is not None:
        blank_image(split_dir / f"{stem}.jpg", *size)
    return p


# ------------------------------------------------------------------------------------ COCO


def coco_json(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def square_poly(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ----------------------------------------------------------------------------------- REFER


def write_refer(root: Path, dataset: str, split_by: str, refs: list[dict], instances: dict[str, Any]) -> Path:
    """``{root}/refer_seg/{dataset}/refs({split_by}).p`` + ``instances.json``."""
    d = root / "refer_seg" / dataset
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"refs({split_by}).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    (d / "instances.json").write_text(json.dumps(instances))
    return d


def ref_record(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[str], category_id: int = 1) -> dict:
    return {
        "sent_ids": list(range(ref_id * 10, ref_id * 10 + len(sents))),
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": [
            {"tokens": s.split(), "raw": s.upper(), "sent_id": ref_id * 10 + k, "sent": s} for k, s in enumerate(sents)
        ],
        "category_id": category_id,
    }


# ------------------------------------------------------------------------------- label maps


def label_png(path: Path, array: np.ndarray, mode: str = "L") -> Path:
    """A single-channel label PNG: grey (``L``, ADE20K / COCO-Stuff) or palette (``P``, whose
    pixel values are the palette indices, as Mapillary's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.ascontiguousarray(array.astype(np.uint8))
    img = Image.frombytes(mode, (a.shape[1], a.shape[0]), a.tobytes())
    if mode == "P":
        img.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    img.save(path)
    return path

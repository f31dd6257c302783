"""PACO-LVIS, PASCAL-Part and PartImageNet readers (COCO-format part annotations).

Layouts (LISA's for PACO-LVIS and PASCAL-Part; VLPart's under ``vlpart/`` for PartImageNet,
which LISA lists but never implemented)::

    PACO-LVIS:     {data_root}/vlpart/paco/annotations/paco_lvis_v1_{train,val,test}.json
                   {data_root}/coco/{file_name}              # file_name is e.g. train2017/000000xxxx.jpg
    PASCAL-Part:   {data_root}/vlpart/pascal_part/{train,val}.json
                   {data_root}/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/{file_name}
    PartImageNet:  {data_root}/vlpart/partimagenet/{split}_format.json  (VLPart's rewrite) or {split}.json
                   {data_root}/vlpart/partimagenet/{split}/{wnid}/{file_name}   (wnid = the part of the
                   file name before "_" when file_name has no folder; a flat {split}/{file_name} also works)

Category names (LISA's parsing):

- PACO-LVIS: ``"obj:part"`` → (obj, part), each cut at ``"_("`` (``"glass_(drink_container)"``
  → ``"glass"``); a name without ``":"`` is a whole object. Underscores are kept, as in LISA.
- PASCAL-Part: ``"obj:part"`` (``"car:license plate"``) → (obj, part).
- PartImageNet: ``"Quadruped Head"`` with supercategory ``"Quadruped"`` → (quadruped, head);
  the dataset's typo "Tier" reads "tire" in queries (``class_name`` keeps the original name).

Queries (``"phrase"`` style, lower-cased like LISA's template): ``"the {part} of the {obj}"``,
or on ``train`` a seeded 50/50 choice between that and ``"{obj} {part}"`` (LISA draws it at
random per visit); a whole object is its name. ``class_name`` is the category's name, the unit
of mIoU.

Records: one sample per image (per chunk of ``rounds_per_sample`` rounds: 3 by default on
``train``, all on eval splits; train rounds are shuffled with a fixed seed first), one round per
part category present, whose mask is the **union of all that category's instances** in the
image (a query naming a class means all of it; this is also what per-class mIoU needs).
Deviation from LISA, which samples up to 3 *annotations* and asks about each one's class with
only that instance as the mask; ``instance_masks=True`` gives one round per annotation as LISA.
Degenerate polygons are dropped with warnings in ``meta["warnings"]``; a category left with
no valid polygon is dropped too (LISA catches ``annToMask`` errors and resamples).
``meta["classes"]`` maps each asked class name to its ``category_id``, parsed ``object`` and
``part`` (None for a whole object) and the ``annotation_ids`` joined into its mask (provenance, e.g. for ReasonPart's manifest); ``meta["file_name"]`` is the
image's name in the annotation file. A record missing a key the reader needs is an error naming
the list, the record's index and the key.

Checked up front (:func:`check_coco_parts`), because each would make results silently wrong: an
image or category id (or an annotation's ``image_id``, ``category_id``) that is not a number or a
string, an image or category id given twice (one image's masks would be drawn on another's picture), a height or width that is not a
positive whole number, and a ``file_name`` that is empty, absolute or climbs out of the image
folder with ``..``; each is an error naming the file, the record and the key. Annotations naming
an unknown image or category, and annotation ids given twice, are left out or kept with a counted
warning (:func:`coco_part_warnings`).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..errors import CoresError
from .layout import DirIndex, check_missing_images, chunk, first_existing, load_json, require_dir
from .masks import CocoMask, Polygon, Rle, parse_coco_segmentation
from .records import QARound, ReaderWarning, SegSample, records_of_image

log = logging.getLogger("cores.data")

PART_SPLITS = {
    "pacolvis": ("train", "val", "test"),
    "pascalpart": ("train", "val"),
    "partimagenet": ("train", "val", "test"),
}

ObjPart = tuple[str, str | None]
"""(object, part) of a category; part None for a whole object."""


def paco_name(cat: dict) -> ObjPart:
    pieces = str(cat["name"]).strip().split(":")
    if len(pieces) == 2:
        return pieces[0].split("_(")[0], pieces[1].split("_(")[0]
    return str(cat["name"]).strip().split("_(")[0], None


def pascal_part_name(cat: dict) -> ObjPart:
    pieces = str(cat["name"]).strip().split(":")
    if len(pieces) == 2:
        return pieces[0], pieces[1]
    return str(cat["name"]).strip(), None


def partimagenet_name(cat: dict) -> ObjPart:
    name = str(cat["name"]).strip()
    sup = str(cat.get("supercategory") or "").strip()
    if sup and name.lower().startswith(sup.lower() + " "):
        obj, part = sup, name[len(sup) + 1 :]
    elif " " in name:
        obj, part = name.split(" ", 1)
    else:
        return name.lower(), None
    part = part.lower()
    if part == "tier":  # the dataset's spelling of "tire" (Car Tier, Bicycle Tier)
        part = "tire"
    return obj.lower(), part


def phrase(obj_part: ObjPart, rng: random.Random | None) -> str:
    obj, part = obj_part
    if part is None:
        return obj.lower()
    if rng is not None and rng.random() < 0.5:
        return f"{obj} {part}".lower()
    return f"the {part} of the {obj}".lower()


@dataclass(frozen=True)
class PartSource:
    dataset: str
    split: str
    annotation_file: Path
    name_of: Callable[[dict], ObjPart]
    image_path: Callable[[dict, DirIndex], Path]


def _split_check(dataset: str, split: str) -> None:
    if split not in PART_SPLITS[dataset]:
        raise CoresError(f"{dataset} has no split {split!r}; choose from {', '.join(PART_SPLITS[dataset])}")


def paco_source(data_root: Path, split: str) -> PartSource:
    _split_check("pacolvis", split)
    root = Path(data_root)
    ann_dir = require_dir(root / "vlpart" / "paco" / "annotations", "PACO-LVIS layout ({root}/vlpart/paco/annotations/)")
    coco = require_dir(root / "coco", "PACO-LVIS images ({root}/coco/{file_name})")
    ann = first_existing([ann_dir / f"paco_lvis_v1_{split}.json"], "PACO-LVIS annotations")
    return PartSource("pacolvis", split, ann, paco_name, lambda img, _ix: coco / img["file_name"])


def pascal_part_source(data_root: Path, split: str) -> PartSource:
    _split_check("pascalpart", split)
    base = require_dir(Path(data_root) / "vlpart" / "pascal_part", "PASCAL-Part layout ({root}/vlpart/pascal_part/)")
    ann = first_existing([base / f"{split}.json"], "PASCAL-Part annotations")
    images = require_dir(base / "VOCdevkit" / "VOC2010" / "JPEGImages", "PASCAL-Part images")
    return PartSource("pascalpart", split, ann, pascal_part_name, lambda img, _ix: images / img["file_name"])


def partimagenet_source(data_root: Path, split: str) -> PartSource:
    _split_check("partimagenet", split)
    base = require_dir(Path(data_root) / "vlpart" / "partimagenet", "PartImageNet layout ({root}/vlpart/partimagenet/)")
    ann = first_existing([base / f"{split}_format.json", base / f"{split}.json"], "PartImageNet annotations")
    images = require_dir(base / split, f"PartImageNet images ({{root}}/vlpart/partimagenet/{split}/)")
    return PartSource("partimagenet", split, ann, partimagenet_name, partimagenet_image_path(images))


def partimagenet_image_path(images: Path) -> Callable[[dict, DirIndex], Path]:
    """Where a PartImageNet image lives under ``images``: ``{wnid}/{file_name}`` when the file
    name has no folder (the official files), else ``{file_name}`` (VLPart's rewrite); a flat
    ``{file_name}`` is used when only that exists."""

    def image_path(img: dict, index: DirIndex) -> Path:
        name = str(img["file_name"])
        if "/" in name:
            return images / name
        nested = images / name.split("_")[0] / name
        return nested if index.exists(nested) or not index.exists(images / name) else images / name

    return image_path


REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("image_id", "category_id"),
    "categories": ("id", "name"),
}


def check_coco_parts(data: Any, path: Path, what: str) -> None:
    """A clear error, naming the file, list, record and key, for a file that is not a COCO-format
    part file (rather than a KeyError deep inside a reader), or whose ids, sizes or image names
    would make results wrong (see the module docstring)."""
    if not isinstance(data, dict):
        raise CoresError(f"{what}: {path} is not a JSON object")
    for key, needed in REQUIRED_KEYS.items():
        if key not in data:
            raise CoresError(f"{what}: {path} has no key {key!r}")
        if not isinstance(data[key], list):
            raise CoresError(f"{what}: {path} key {key!r} is not a list")
        for i, rec in enumerate(data[key]):
            if not isinstance(rec, dict):
                raise CoresError(f"{what}: {path} {key}[{i}] is not an object")
            for k in needed:
                if k not in rec:
                    raise CoresError(f"{what}: {path} {key}[{i}] has no key {k!r}")
    _check_unique_ids(data, "images", path, what)
    _check_unique_ids(data, "categories", path, what)
    for i, ann in enumerate(data["annotations"]):
        for k in ("image_id", "category_id"):
            if not _is_id(ann[k]):
                raise CoresError(f"{what}: {path} annotations[{i}] key {k!r} is {_shown(ann[k])}, not a number or a string")
    for i, img in enumerate(data["images"]):
        where = f"{what}: {path} images[{i}] (id {img['id']!r})"
        for k in ("height", "width"):
            if not _is_positive_whole(img[k]):
                raise CoresError(f"{where} key {k!r} is {_shown(img[k])}, not a positive whole number")
        if img["height"] * img["width"] > MAX_ANNOTATED_PIXELS:
            raise CoresError(
                f"{where} says {img['width']}×{img['height']} pixels, above the {MAX_ANNOTATED_PIXELS // 1_000_000} MP "
                "any reader of cores draws masks for; is the size right?"
            )
        problem = _file_name_problem(img["file_name"])
        if problem:
            raise CoresError(f"{where} key 'file_name' is {_shown(img['file_name'])}: {problem}")


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


MAX_ANNOTATED_PIXELS = 1_000_000_000
"""Largest image size an annotation may claim: masks are drawn at that size (1 GB at 1000 MP), so
a typo like ``height: 10**12`` must stop here rather than in an allocation of terabytes."""


def _is_positive_whole(value: Any) -> bool:
    """480 or 480.0 (some writers emit floats); not "480", "tall", 0, -3 or 480.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value > 0 and float(value).is_integer()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_unique_ids(data: dict, key: str, path: Path, what: str) -> None:
    """Ids must be numbers or strings and appear once: readers look records up by id, so a second
    record with the same id would silently take the first one's place."""
    first: dict[Any, int] = {}
    for i, rec in enumerate(data[key]):
        rid = rec["id"]
        if not _is_id(rid):
            raise CoresError(f"{what}: {path} {key}[{i}] key 'id' is {_shown(rid)}, not a number or a string")
        if rid in first:
            raise CoresError(f"{what}: {path} {key}[{first[rid]}] and {key}[{i}] have the same id {rid!r}; ids must be unique")
        first[rid] = i


def _file_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a path inside the image folder, or None. Read both ways, so that a
    Windows-style ``C:\\x.jpg`` or ``..\\x.jpg`` is caught too."""
    if not isinstance(name, str) or not name.strip():
        return "not a file name"
    if "\0" in name:
        return "it holds a NUL character, which no file name can"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return "an absolute path; file names must be relative to the image folder"
    if ".." in posix.parts or ".." in windows.parts:
        return "it climbs out of the image folder ('..'); file names must be relative to it"
    return None


def coco_part_warnings(data: dict) -> Counter[str]:
    """Counts of what the readers leave out or keep with a warning (a checked file): annotations
    naming an unknown image or category (left out), annotation ids given twice (kept: an id is only
    provenance)."""
    images = {im["id"] for im in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    counts: Counter[str] = Counter()
    seen: set[Any] = set()
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            counts["annotations naming an unknown image id (left out)"] += 1
        elif ann["category_id"] not in cats:
            counts["annotations naming an unknown category id (left out)"] += 1
        aid = ann.get("id")
        if _is_id(aid):
            counts["annotation ids given twice (kept)"] += aid in seen
            seen.add(aid)
    return +counts


PART_SOURCES: dict[str, Callable[[Path, str], PartSource]] = {
    "pacolvis": paco_source,
    "pascalpart": pascal_part_source,
    "partimagenet": partimagenet_source,
}


def load_parts(
    dataset: str,
    data_root: Path,
    split: str,
    *,
    rounds_per_sample: int | None = None,
    instance_masks: bool = False,
    shuffle_seed: int = 0,
    skip_missing: bool = False,
) -> list[SegSample]:
    """``pacolvis|pascalpart|partimagenet:{split}`` → records (see the module docstring)."""
    if dataset not in PART_SOURCES:
        raise CoresError(f"unknown part dataset {dataset!r}; choose from {', '.join(PART_SOURCES)}")
    require_dir(Path(data_root), "data root")
    source = PART_SOURCES[dataset](Path(data_root), split)
    if rounds_per_sample is None and split == "train":
        rounds_per_sample = 3
    return read_coco_parts(source, rounds_per_sample=rounds_per_sample, instance_masks=instance_masks, shuffle_seed=shuffle_seed, skip_missing=skip_missing)


def read_coco_parts(
    source: PartSource,
    *,
    rounds_per_sample: int | None = None,
    instance_masks: bool = False,
    shuffle_seed: int = 0,
    skip_missing: bool = False,
    missing_hint: str | None = None,
    data: dict | None = None,
) -> list[SegSample]:
    """A COCO-format part file → records, per the module docstring. ``missing_hint`` replaces
    the error's advice on missing images (a command names its own flag); ``data`` is the file's
    content when the caller has already read it (large files are parsed once)."""
    what = f"{source.dataset} annotations"
    if data is None:
        data = load_json(source.annotation_file, what)
    check_coco_parts(data, source.annotation_file, what)
    cats = {c["id"]: c for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        if ann["image_id"] in images and ann["category_id"] in cats:
            by_image.setdefault(ann["image_id"], []).append(ann)
    for reason, count in sorted(coco_part_warnings(data).items()):
        log.warning("%s: %d %s", source.annotation_file, count, reason)

    name = f"{source.dataset}:{source.split}"
    train = source.split == "train"
    index = DirIndex()
    samples: list[SegSample] = []
    missing: list[Path] = []
    for image_id in sorted(by_image, key=lambda i: (str(type(i)), i)):
        img = images[image_id]
        path = source.image_path(img, index)
        if not index.exists(path):
            missing.append(path)
            continue
        h, w = int(img["height"]), int(img["width"])
        rng = random.Random(f"{shuffle_seed}:{image_id}") if train else None
        warnings: list[str] = []
        groups_of_anns: list[tuple[int, list[dict]]] = []
        if instance_masks:
            groups_of_anns = [(a["category_id"], [a]) for a in by_image[image_id]]
        else:
            per_cat: dict[int, list[dict]] = {}
            for a in by_image[image_id]:
                per_cat.setdefault(a["category_id"], []).append(a)
            groups_of_anns = sorted(per_cat.items(), key=lambda kv: str(kv[0]))
        rounds: list[QARound] = []
        classes: dict[str, dict[str, Any]] = {}
        for cat_id, anns in groups_of_anns:
            polys: list[Polygon] = []
            rles: list[Rle] = []
            for a in anns:
                p, r, warn = parse_coco_segmentation(a.get("segmentation", []), f"ann {a.get('id')}")
                polys.extend(p)
                rles.extend(r)
                warnings.extend(warn)
            cat = cats[cat_id]
            if not polys and not rles:
                warnings.append(ReaderWarning("no_valid_segmentation", f"category {cat['name']!r}: no valid segmentation; round left out"))
                continue
            rounds.append(QARound(phrase(source.name_of(cat), rng), CocoMask(tuple(polys), tuple(rles), h, w), "phrase", str(cat["name"])))
            obj, part = source.name_of(cat)
            entry = classes.setdefault(str(cat["name"]), {"category_id": cat_id, "object": obj, "part": part, "annotation_ids": []})
            entry["annotation_ids"].extend(a.get("id") for a in anns)
        if not rounds:
            log.warning("%s: image %s has no usable part annotation; left out", name, image_id)
            continue
        if rng is not None and rounds_per_sample:
            rng.shuffle(rounds)
        groups = chunk(rounds, rounds_per_sample)
        meta: dict[str, Any] = {"image_id": image_id, "image_size": (h, w), "file_name": img["file_name"], "classes": classes}
        if warnings:
            meta["warnings"] = warnings
        samples.extend(records_of_image(f"{name}/{image_id}", str(path), groups, source.dataset, meta))
    if check_missing_images(missing, len(by_image), name, skip_missing, missing_hint):
        log.warning("%s: left out %d image(s) that are missing", name, len(missing))
    return samples

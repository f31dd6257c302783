"""refCOCO / refCOCO+ / refCOCOg / refCLEF reader (REFER layout, LISA's conventions).

Layout (LISA, ``utils/refer.py`` + ``refer_seg_dataset.py``)::

    {data_root}/refer_seg/{dataset}/refs({split_by}).p      # pickled list of refs
    {data_root}/refer_seg/{dataset}/instances.json          # COCO-format images/annotations
    {data_root}/refer_seg/images/mscoco/images/train2014/   # refcoco, refcoco+, refcocog
    {data_root}/refer_seg/images/saiapr_tc-12/              # refclef

``split_by``: ``unc`` (refcoco, refcoco+, refclef), ``umd`` (refcocog), also ``google``
(refcoco, refcocog) and ``berkeley`` (refclef). Split selection follows REFER's ``getRefIds``:
``train``/``val`` match exactly, ``testA``/``testB``/``testC`` match refs whose split contains
that letter, ``test`` matches every split containing "test".

Records (LISA's ``ValDataset`` for refer sets): one sample per image with one round per
sentence of every ref of that image in the split, query ``sent["sent"].strip().lower()``,
style ``"phrase"`` ("What is {sent} in this image?"), ``class_name`` the COCO category.
The mask is the ref's annotation (``ann_id``; a list of ids is joined, ``-1`` is an empty
target, as gRefCOCO), decoded by :class:`~cores_cli.data.masks.CocoMask` at the size given in
``instances.json`` (an empty ``segmentation`` is an empty mask, as in LISA). Images are taken
in ``image_id`` order (LISA iterates a ``set``). For training (``rounds_per_sample`` = 3 by
default on ``train``), an image's sentences are shuffled with a fixed seed and split into
samples of at most 3 rounds: LISA draws 3 at random on every visit; fixed chunks cover every
sentence once per epoch.

Why a pickle, and how it is made safe: ``refs(*.p)`` is only distributed as a Python pickle,
so it has to be unpickled. It is read only from the data root the user names, through an
unpickler that resolves no global except the harmless builtins ``set``/``frozenset``/
``bytearray``/``complex``: plain containers and scalars load, and a pickle that asks for any
callable (the way a malicious pickle runs code) is refused with a :class:`CoresError`.

Where we differ from LISA, on purpose: a ref whose annotation is missing from
``instances.json`` is dropped with a warning (LISA raises ``KeyError`` mid-run); degenerate
polygons are dropped per :func:`~cores_cli.data.masks.parse_coco_segmentation` with a warning
in ``meta["warnings"]`` (pycocotools reads a polygon list whose first polygon has 4 numbers as
a box, and fails on shorter ones); uncompressed RLE is supported (LISA calls ``.encode()`` on
its counts and fails); overlapping polygons of one annotation give 1, not 2.
"""

from __future__ import annotations

import io
import logging
import pickle
import random
from pathlib import Path
from typing import Any

from ..errors import CoresError
from .layout import DirIndex, check_missing_images, chunk, load_json, require_dir, require_file
from .masks import CocoMask, Polygon, Rle, parse_coco_segmentation
from .records import QARound, ReaderWarning, SegSample, records_of_image

log = logging.getLogger("cores.data")

REFER_DATASETS: dict[str, dict[str, Any]] = {
    "refcoco": {"split_bys": ("unc", "google"), "images": ("images", "mscoco", "images", "train2014")},
    "refcoco+": {"split_bys": ("unc",), "images": ("images", "mscoco", "images", "train2014")},
    "refcocog": {"split_bys": ("umd", "google"), "images": ("images", "mscoco", "images", "train2014")},
    "refclef": {"split_bys": ("unc", "berkeley"), "images": ("images", "saiapr_tc-12")},
}
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
REFER_SPLITS = ("train", "val", "test", "testA", "testB", "testC")


class _ContainersOnlyUnpickler(pickle.Unpickler):
    """Resolves no global beyond a few inert builtin types (see the module docstring)."""

    _ALLOWED = {"set", "frozenset", "bytearray", "complex"}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_refs_pickle(path: Path) -> Any:
    """Unpickle a REFER ``refs(*.p)`` file without running code from it."""
    require_file(path, "REFER refs")
    data = path.read_bytes()
    last: Exception | None = None
    for encoding in ("utf-8", "latin1"):  # Python 2 str: UTF-8 text, else bytes as latin-1
        try:
            return _ContainersOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as e:
            last = e
        except pickle.UnpicklingError as e:
            if "refused global" in str(e):
                raise CoresError(f"REFER refs: {path} asks to load {str(e).removeprefix('refused global ')}, which is not plain data; refusing to unpickle it") from None
            raise CoresError(f"REFER refs: {path} is not a readable pickle ({e})") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise CoresError(f"REFER refs: {path} is not a readable pickle ({type(e).__name__}: {e})") from None
    raise CoresError(f"REFER refs: {path} holds text that is neither UTF-8 nor latin-1 ({last})")


def _split_matches(ref_split: str, split: str) -> bool:
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _check_refs(refs: Any, path: Path) -> list[dict]:
    if not isinstance(refs, list):
        raise CoresError(f"REFER refs: {path} holds a {type(refs).__name__}, expected a list of refs")
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise CoresError(f"REFER refs: {path} entry {k} is a {type(ref).__name__}, expected a dict")
        for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
            if key not in ref:
                raise CoresError(f"REFER refs: {path} ref {ref.get('ref_id', k)} has no key {key!r}")
    return refs


def load_refer(
    data_root: Path,
    dataset: str,
    split: str,
    split_by: str | None = None,
    *,
    rounds_per_sample: int | None = None,
    shuffle_seed: int = 0,
    skip_missing: bool = False,
) -> list[SegSample]:
    """``{dataset}:{split_by}:{split}`` from the REFER layout under ``data_root/refer_seg``.

    ``rounds_per_sample`` defaults to 3 for ``train`` and to all sentences of an image
    otherwise (LISA's eval)."""
    if dataset not in REFER_DATASETS:
        raise CoresError(f"unknown REFER dataset {dataset!r}; choose from {', '.join(REFER_DATASETS)}")
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if split_by not in REFER_DATASETS[dataset]["split_bys"]:
        raise CoresError(f"{dataset} has no split_by {split_by!r}; choose from {', '.join(REFER_DATASETS[dataset]['split_bys'])}")
    if split not in REFER_SPLITS:
        raise CoresError(f"unknown REFER split {split!r}; choose from {', '.join(REFER_SPLITS)}")
    root = require_dir(Path(data_root), "data root")
    base = require_dir(root / "refer_seg", "REFER layout ({root}/refer_seg/{dataset}/refs(SPLIT_BY).p)")
    ds_dir = require_dir(base / dataset, f"REFER layout ({{root}}/refer_seg/{dataset}/)")
    refs_path = ds_dir / f"refs({split_by}).p"
    require_file(refs_path, f"{dataset} refs")
    inst_path = require_file(ds_dir / "instances.json", f"{dataset} annotations")
    image_dir = require_dir(base.joinpath(*REFER_DATASETS[dataset]["images"]), f"{dataset} images")

    refs = _check_refs(load_refs_pickle(refs_path), refs_path)
    instances = load_json(inst_path, f"{dataset} annotations")
    if not isinstance(instances, dict):
        raise CoresError(f"{dataset} annotations: {inst_path} is not a JSON object")
    for key in ("images", "annotations"):
        if key not in instances:
            raise CoresError(f"{dataset} annotations: {inst_path} has no key {key!r}")
    anns = {a["id"]: a for a in instances["annotations"]}
    imgs = {im["id"]: im for im in instances["images"]}
    cats = {c["id"]: c.get("name") for c in instances.get("categories", [])}

    chosen = [r for r in refs if _split_matches(str(r["split"]), split)]
    if not chosen:
        present = sorted({str(r["split"]) for r in refs})
        raise CoresError(f"{dataset}: no refs with split {split!r} in {refs_path}; splits present: {', '.join(present)}")
    by_image: dict[Any, list[dict]] = {}
    for r in chosen:
        by_image.setdefault(r["image_id"], []).append(r)

    if rounds_per_sample is None and split == "train":
        rounds_per_sample = 3
    name = f"{dataset}:{split_by}:{split}"
    index = DirIndex()
    samples: list[SegSample] = []
    missing: list[Path] = []
    dropped = 0
    for image_id in sorted(by_image, key=lambda i: (str(type(i)), i)):
        img = imgs.get(image_id)
        if img is None:
            dropped += 1
            log.warning("%s: image %s of %d ref(s) is not in %s; left out", name, image_id, len(by_image[image_id]), inst_path)
            continue
        image_path = image_dir / img["file_name"]
        if not index.exists(image_path):
            missing.append(image_path)
            continue
        h, w = int(img["height"]), int(img["width"])
        warnings: list[str] = []
        rounds: list[QARound] = []
        for ref in by_image[image_id]:
            spec = _ref_mask(ref, anns, h, w, warnings)
            if spec is None:
                continue
            for sent in ref["sentences"]:
                text = str(sent.get("sent", "") if isinstance(sent, dict) else sent).strip().lower()
                if not text:
                    warnings.append(ReaderWarning("blank_query", f"ref {ref['ref_id']}: an empty sentence; skipped"))
                    continue
                rounds.append(QARound(text, spec, "phrase", cats.get(ref.get("category_id"))))
        if not rounds:
            dropped += 1
            log.warning("%s: image %s has no usable ref; left out (%s)", name, image_id, "; ".join(warnings))
            continue
        if split == "train" and rounds_per_sample:
            random.Random(f"{shuffle_seed}:{image_id}").shuffle(rounds)
        groups = chunk(rounds, rounds_per_sample)
        meta: dict[str, Any] = {"image_id": image_id, "ref_ids": [r["ref_id"] for r in by_image[image_id]], "image_size": (h, w)}
        if warnings:
            meta["warnings"] = warnings
        samples.extend(records_of_image(f"{name}/{image_id}", str(image_path), groups, dataset, meta))
    if check_missing_images(missing, len(by_image), f"{name} ({image_dir})", skip_missing):
        log.warning("%s: left out %d image(s) missing from %s", name, len(missing), image_dir)
    if dropped:
        log.warning("%s: %d image(s) left out, see the warnings above", name, dropped)
    return samples


def _ref_mask(ref: dict, anns: dict, h: int, w: int, warnings: list[str]) -> CocoMask | None:
    """The ref's target as a CocoMask (None, with a warning, if its annotation is missing)."""
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    polys: list[Polygon] = []
    rles: list[Rle] = []
    for ann_id in ids:
        if ann_id == -1:  # gRefCOCO's no-target ref
            continue
        ann = anns.get(ann_id)
        if ann is None:
            warnings.append(ReaderWarning("unknown_annotation", f"ref {ref['ref_id']}: annotation {ann_id} is not in instances.json; ref skipped"))
            return None
        p, r, warn = parse_coco_segmentation(ann.get("segmentation", []), f"ref {ref['ref_id']} ann {ann_id}")
        polys.extend(p)
        rles.extend(r)
        warnings.extend(warn)
    return CocoMask(tuple(polys), tuple(rles), h, w)

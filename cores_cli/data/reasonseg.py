"""ReasonSeg reader (LISA's ``utils/reason_seg_dataset.py`` + ``ValDataset`` conventions).

Layout (LISA)::

    {data_root}/reason_seg/ReasonSeg/{train,val,test}/NAME.jpg
    {data_root}/reason_seg/ReasonSeg/{train,val,test}/NAME.json

Other folders in ReasonSeg format (ReasonPart, our synthetic set) sit beside ``ReasonSeg``
and are read with ``folder=...``, or read any split folder with :func:`read_split_dir`.

Per-image JSON (SCHEMAS.md §A): ``text`` (list of queries, all meaning the same mask),
``is_sentence`` (true = long query), ``shapes`` (LabelMe polygons with ``label`` and
``points``). Opened as UTF-8, then cp1252 (LISA's fallback). The mask is drawn by
:class:`~cores_cli.data.masks.LabelmePolygonMask`, exactly as LISA's ``get_mask_from_json``.

Records: one :class:`SegSample` per image (per chunk of rounds, see ``rounds_per_sample``).
Each query is a round with the same mask; style ``"sentence"`` when ``is_sentence`` else
``"phrase"`` (LISA wraps phrases as "What is {text} in this image?"). The query text is kept
as written, stripped of surrounding spaces (LISA lower-cases phrases only in training).

- ``queries="first"``: only ``text[0]`` — LISA's evaluation protocol (``ValDataset``).
- ``queries="all"``: every query (training; LISA samples up to 3 per visit).
- ``subset="short"|"long"``: only images whose ``is_sentence`` is false / true (the test
  split's short- and long-query parts).

Where LISA differs: it enumerates ``*.jpg`` and opens the JSON beside each (a JSON without an
image is silently unused, an image without JSON crashes); we enumerate the JSONs, look for
``NAME.jpg`` (then ``.jpeg``, ``.png``), and report missing images as one clear error
(``skip_missing=True`` in Python, ``--opt skip_missing=true`` on ``cores eval``, leaves them
out). A JSON missing ``text``, ``is_sentence`` or ``shapes`` is an error naming the file and
key. Degenerate shapes are handled per :func:`~cores_cli.data.masks.parse_labelme_shapes` and
listed in ``meta["warnings"]`` (:class:`~cores_cli.data.records.ReaderWarning`, with a kind);
so are, with the image present, shapes lying wholly outside it or reaching well beyond it
(drawn for a larger copy of the image), a sample without a target polygon, and a blank query.

An optional top-level ``"cores_synthetic"`` key (written by our synthetic generator, ignored
by LISA) carries the part's container: ``meta["container"]`` and ``meta["container_mask"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from ..errors import CoresError
from .layout import DirIndex, check_missing_images, chunk, load_json, require_dir, upright_size
from .masks import LabelmePolygonMask, PolygonShape, parse_labelme_shapes, shapes_beyond, shapes_outside
from .records import QARound, ReaderWarning, SegSample, records_of_image

log = logging.getLogger("cores.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
SYNTHETIC_KEY = "cores_synthetic"
Queries = Literal["first", "all"]
Subset = Literal["short", "long"]


def split_dir(data_root: Path, split: str, folder: str = "ReasonSeg") -> Path:
    return Path(data_root) / "reason_seg" / folder / split


def parse_reasonseg_file(
    json_path: Path,
    image_path: Path | None,
    *,
    queries: Queries = "first",
    dataset: str = "reasonseg",
    sample_id: str | None = None,
) -> tuple[list[QARound], dict[str, Any]]:
    """One ReasonSeg JSON → its rounds and meta. ``image_path``, when given and readable, is
    used for its upright size (bounds warnings, ``meta["image_size"]``)."""
    what = f"{dataset} annotation"
    anno = load_json(json_path, what)
    if not isinstance(anno, dict):
        raise CoresError(f"{what}: {json_path} holds a {type(anno).__name__}, expected an object with text/is_sentence/shapes")
    for key in ("text", "is_sentence", "shapes"):
        if key not in anno:
            raise CoresError(f"{what}: {json_path} has no key {key!r}")
    texts = anno["text"]
    text_warnings: list[str] = []
    if isinstance(texts, str):
        # LISA indexes the text as a list, and would take the string's first character as the query
        text_warnings.append(ReaderWarning("text_not_list", "'text' is a string, not a list of queries: used as the one query"))
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise CoresError(f"{what}: {json_path} key 'text' must be a non-empty list of strings")
    is_sentence = bool(anno["is_sentence"])
    shapes, warnings = parse_labelme_shapes(anno["shapes"])
    warnings = text_warnings + warnings
    meta: dict[str, Any] = {"json": str(json_path), "is_sentence": is_sentence, "num_texts": len(texts)}
    if image_path is not None:
        size = upright_size(image_path)
        if size is not None:
            meta["image_size"] = size
            warnings.extend(_bounds_warnings(shapes, *size))
    if not any(not s.is_flag and not s.is_ignore for s in shapes):
        warnings.append(ReaderWarning("no_target", "no target polygon: the mask is empty"))
    style = "sentence" if is_sentence else "phrase"
    chosen = texts[:1] if queries == "first" else texts
    for i, t in enumerate(chosen):
        if not t.strip():
            warnings.append(ReaderWarning("blank_query", f"query {i} of 'text' is blank"))
    extra = anno.get(SYNTHETIC_KEY)
    if isinstance(extra, dict):
        cshapes, cwarn = parse_labelme_shapes(extra.get("container_shapes", []), "container")
        meta["container"] = extra.get("container")
        meta["part"] = extra.get("part")
        meta["container_mask"] = LabelmePolygonMask(cshapes)
        warnings.extend(cwarn)
    if warnings:
        meta["warnings"] = warnings
    target = LabelmePolygonMask(shapes)
    return [QARound(t.strip(), target, style) for t in chosen], meta


def _bounds_warnings(shapes: tuple[PolygonShape, ...], height: int, width: int) -> list[str]:
    """Shapes that do not fit the (upright) image: wholly outside it, or reaching well past it."""
    out: list[str] = []
    for k in shapes_outside(shapes, height, width):
        out.append(ReaderWarning("shape_outside_image", f"shape {k} ({shapes[k].label!r}) lies wholly outside the {width}×{height} image; draws nothing"))
    for k in shapes_beyond(shapes, height, width):
        xs = [p[0] for p in shapes[k].points]
        ys = [p[1] for p in shapes[k].points]
        span = f"x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}"
        out.append(ReaderWarning("shape_beyond_image", f"shape {k} ({shapes[k].label!r}) spans {span}, beyond the {width}×{height} image (drawn for a larger image?); clipped"))
    return out


def read_split_dir(
    directory: Path,
    *,
    queries: Queries = "first",
    subset: Subset | None = None,
    rounds_per_sample: int | None = None,
    skip_missing: bool = False,
    dataset: str = "reasonseg",
) -> list[SegSample]:
    """All ``*.json`` of one split folder → records, sorted by file name."""
    if queries not in ("first", "all"):
        raise CoresError(f"queries must be 'first' or 'all', got {queries!r}")
    if subset not in (None, "short", "long"):
        raise CoresError(f"subset must be 'short' or 'long', got {subset!r}")
    if rounds_per_sample is not None and (isinstance(rounds_per_sample, bool) or not isinstance(rounds_per_sample, int) or rounds_per_sample < 1):
        raise CoresError(f"rounds_per_sample must be an integer ≥ 1, got {rounds_per_sample!r}")
    if not isinstance(skip_missing, bool):
        # a word like "maybe" is truthy: it must not turn the option on
        raise CoresError(f"skip_missing must be true or false, got {skip_missing!r}")
    directory = require_dir(Path(directory), f"{dataset} split")
    jsons = sorted(p for p in directory.iterdir() if p.suffix == ".json" and p.is_file())
    if not jsons:
        raise CoresError(f"{dataset}: no *.json annotation files in {directory}")
    index = DirIndex()
    names = index.names(directory)
    samples: list[SegSample] = []
    missing: list[Path] = []
    for jp in jsons:
        image = next((directory / (jp.stem + s) for s in IMAGE_SUFFIXES if jp.stem + s in names), None)
        if image is None:
            missing.append(directory / (jp.stem + ".jpg"))
            continue
        rounds, meta = parse_reasonseg_file(jp, image, queries=queries, dataset=dataset)
        if subset is not None and meta["is_sentence"] != (subset == "long"):
            continue
        groups = chunk(rounds, rounds_per_sample)
        samples.extend(records_of_image(f"{dataset}/{directory.name}/{jp.stem}", str(image), groups, dataset, meta))
    if check_missing_images(missing, len(jsons), f"{dataset} ({directory})", skip_missing):
        log.warning("%s: left out %d annotation(s) without an image in %s", dataset, len(missing), directory)
    return samples


def load_reasonseg(
    data_root: Path,
    split: str,
    *,
    folder: str = "ReasonSeg",
    queries: Queries | None = None,
    subset: Subset | None = None,
    rounds_per_sample: int | None = None,
    skip_missing: bool = False,
) -> list[SegSample]:
    """``{data_root}/reason_seg/{folder}/{split}`` → records. ``queries`` defaults to ``"all"``
    for ``train`` and ``"first"`` (LISA's eval protocol) otherwise."""
    root = require_dir(Path(data_root), "data root")
    base = require_dir(root / "reason_seg", "ReasonSeg layout ({root}/reason_seg/" + folder + "/{split}/*.json)")
    require_dir(base / folder, f"ReasonSeg layout ({{root}}/reason_seg/{folder}/{{split}}/*.json)")
    d = require_dir(split_dir(root, split, folder), f"ReasonSeg split {split!r}")
    q: Queries = queries or ("all" if split == "train" else "first")
    return read_split_dir(d, queries=q, subset=subset, rounds_per_sample=rounds_per_sample, skip_missing=skip_missing, dataset="reasonseg" if folder == "ReasonSeg" else folder.lower())

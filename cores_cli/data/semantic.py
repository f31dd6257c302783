"""ADE20K, COCO-Stuff and Mapillary Vistas v2.0 readers (LISA's ``utils/sem_seg_dataset.py``).

Layouts (LISA's)::

    ADE20K (ADEChallengeData2016 renamed ``ade20k``):
        {data_root}/ade20k/images/{training,validation}/NAME.jpg
        {data_root}/ade20k/annotations/{training,validation}/NAME.png
    COCO-Stuff (stuffthingmaps_trainval2017 + COCO 2017 images):
        {data_root}/cocostuff/{train2017,val2017}/NAME.png
        {data_root}/coco/{train2017,val2017}/NAME.jpg
    Mapillary Vistas v2.0:
        {data_root}/mapillary/config_v2.0.json
        {data_root}/mapillary/{training,validation}/v2.0/labels/NAME.png
        {data_root}/mapillary/{training,validation}/images/NAME.jpg

Split names: ``train`` → training/train2017, ``val`` → validation/val2017.

Label conventions (as LISA applies them; see :func:`~cores_cli.data.masks.decode_label_map`):

- ADE20K: value 0 ("other") → ignore, every other value v → class v−1 of the 150 names below.
- COCO-Stuff: value v is class v of the 182 names below (``person`` = 0); 255 is unlabeled;
  the 28 merged classes whose name contains "-" (``wall-other``, ``floor-wood``...) → ignore.
- Mapillary: value v is ``config_v2.0.json``'s ``labels[v]``, named by its ``readable`` field,
  lower-cased. Deviation: the ``unlabeled`` class → ignore (LISA would ask
  "What is unlabeled in this image?").
- Any value with no class name → ignore (LISA would fail on it).

Records: the sample set is the label PNGs (each must have its image; missing images are one
clear error, or ``skip_missing=True``: ``--opt skip_missing=true`` on ``cores eval``). A sample asks about the classes present in its label
map, one ``"phrase"`` round per class (the query and ``class_name`` are the class name; LISA
lower-cases it), mask :class:`~cores_cli.data.masks.LabelMapMask` (1 on the class, 255 on
ignored pixels, which training treats as background: LISA's binary ``label == class``).
LISA draws up to 3 present classes at random per visit; we shuffle each image's classes with
a fixed seed and split them into samples of at most ``rounds_per_sample`` rounds (3 by default
on ``train``, all classes on ``val``), so an epoch covers every class once. Images with no
class left are skipped (LISA resamples).

Knowing which classes are present means reading every label map once. That index is cached as
JSON (``cache_dir``, default ``~/.cache/cores/label_index``; ``cache=False`` turns it off),
keyed by the label folder, its files' names, sizes and modification times, and the
convention, so any change rebuilds it.

Class names: ADE20K's 150 SceneParsing names (first name of each class, as LISA's
``utils/ade20k_classes.json``) and COCO-Stuff's 182 ``labels.txt`` names (LISA's
``utils/cocostuff_classes.txt`` without its ``0: unlabeled`` line) are built in; pass
``classes_file`` (a JSON list, or a ``labels.txt``-style ``id: name`` file) to use others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CoresError
from ..fileio import atomic_write_json
from ..ignore_values import IGNORE
from .layout import DirIndex, check_missing_images, chunk, load_json, require_dir, require_file
from .masks import LabelConvention, LabelMapMask, decode_label_map, read_label_png
from .records import QARound, SegSample, records_of_image

log = logging.getLogger("cores.data")

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

COCOSTUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
    "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush", "banner", "blanket",
    "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light",
    "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
    "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)

SPLIT_FOLDERS: dict[str, dict[str, str]] = {
    "ade20k": {"train": "training", "val": "validation"},
    "cocostuff": {"train": "train2017", "val": "val2017"},
    "mapillary": {"train": "training", "val": "validation"},
}
INDEX_VERSION = 1


@dataclass(frozen=True)
class LabelMapSource:
    """Where one split of a label-map dataset lives and how its values map to classes."""

    dataset: str
    split: str
    label_dir: Path
    image_dir: Path
    classes: tuple[str, ...]
    convention: LabelConvention
    ignore_ids: tuple[int, ...] = ()
    image_suffix: str = ".jpg"

    def image_for(self, label: Path) -> Path:
        return self.image_dir / (label.stem + self.image_suffix)


def read_classes_file(path: Path) -> tuple[str, ...]:
    """A JSON list of names, or LISA's text format (first line skipped, ``id: name`` lines)."""
    require_file(path, "class names")
    if path.suffix == ".json":
        names = load_json(path, "class names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CoresError(f"class names: {path} must hold a JSON list of strings")
        return tuple(names)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()[1:] if ln.strip()]
    return tuple(ln.split(": ")[-1] for ln in lines)


def _split_folder(dataset: str, split: str) -> str:
    try:
        return SPLIT_FOLDERS[dataset][split]
    except KeyError:
        raise CoresError(f"{dataset} has no split {split!r}; choose from {', '.join(SPLIT_FOLDERS[dataset])}") from None


def ade20k_source(data_root: Path, split: str, classes_file: Path | None = None) -> LabelMapSource:
    folder = _split_folder("ade20k", split)
    base = require_dir(Path(data_root) / "ade20k", "ADE20K layout ({root}/ade20k/images|annotations/{training,validation}/)")
    classes = read_classes_file(Path(classes_file)) if classes_file else ADE20K_CLASSES
    return LabelMapSource(
        "ade20k", split,
        require_dir(base / "annotations" / folder, "ADE20K label maps"),
        require_dir(base / "images" / folder, "ADE20K images"),
        classes, "ade20k",
    )


def cocostuff_source(data_root: Path, split: str, classes_file: Path | None = None) -> LabelMapSource:
    folder = _split_folder("cocostuff", split)
    root = Path(data_root)
    labels = require_dir(root / "cocostuff" / folder, "COCO-Stuff label maps ({root}/cocostuff/{train2017,val2017}/*.png)")
    images = require_dir(root / "coco" / folder, "COCO-Stuff images ({root}/coco/{train2017,val2017}/*.jpg)")
    classes = read_classes_file(Path(classes_file)) if classes_file else COCOSTUFF_CLASSES
    ignore = tuple(i for i, c in enumerate(classes) if "-" in c)
    return LabelMapSource("cocostuff", split, labels, images, classes, "plain", ignore)


def mapillary_source(data_root: Path, split: str, classes_file: Path | None = None) -> LabelMapSource:
    folder = _split_folder("mapillary", split)
    base = require_dir(Path(data_root) / "mapillary", "Mapillary layout ({root}/mapillary/config_v2.0.json, training/, validation/)")
    if classes_file:
        classes = read_classes_file(Path(classes_file))
    else:
        config = load_json(base / "config_v2.0.json", "Mapillary config")
        try:
            classes = tuple(str(lbl["readable"]).lower() for lbl in config["labels"])
        except (KeyError, TypeError):
            raise CoresError(f"Mapillary config: {base / 'config_v2.0.json'} has no 'labels' list with 'readable' names") from None
    ignore = tuple(i for i, c in enumerate(classes) if c == "unlabeled")
    return LabelMapSource(
        "mapillary", split,
        require_dir(base / folder / "v2.0" / "labels", "Mapillary v2.0 label maps"),
        require_dir(base / folder / "images", "Mapillary images"),
        classes, "plain", ignore,
    )


SOURCES: dict[str, Callable[[Path, str, Path | None], LabelMapSource]] = {
    "ade20k": ade20k_source,
    "cocostuff": cocostuff_source,
    "mapillary": mapillary_source,
}


def _present(path: Path, source: LabelMapSource) -> list[int] | str:
    """Class ids present in one label map, or an error message."""
    try:
        raw = read_label_png(str(path))
    except (OSError, ValueError, SyntaxError) as e:
        return f"{path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    ids = decode_label_map(raw, source.convention, len(source.classes), source.ignore_ids)
    present = np.unique(ids)
    return [int(v) for v in present if v != IGNORE]


def _index_key(source: LabelMapSource, labels: Sequence[os.DirEntry]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([INDEX_VERSION, str(source.label_dir.resolve()), source.convention, len(source.classes), list(source.ignore_ids)]).encode())
    for e in labels:
        st = e.stat()
        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_label_index(
    source: LabelMapSource,
    *,
    cache: bool = True,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[int] | str]:
    """``{label file name: present class ids}`` (or an error string for an unreadable file),
    read from the cache when it matches the folder, else built and cached."""
    labels = sorted((e for e in os.scandir(source.label_dir) if e.name.endswith(".png") and e.is_file()), key=lambda e: e.name)
    if not labels:
        raise CoresError(f"{source.dataset}: no *.png label maps in {source.label_dir}")
    key = _index_key(source, labels)
    cache_file = None
    if cache:
        base = Path(cache_dir) if cache_dir else Path(os.environ.get("CORES_CACHE", Path.home() / ".cache" / "cores")) / "label_index"
        cache_file = base / f"{source.dataset}-{source.split}-{key[:20]}.json"
        if cache_file.is_file():
            try:
                stored = json.loads(cache_file.read_text())
                if stored.get("key") == key:
                    return stored["entries"]
            except (OSError, ValueError, AttributeError):
                log.warning("label index cache %s is unreadable; rebuilding it", cache_file)
    entries: dict[str, list[int] | str] = {}
    paths = [Path(e.path) for e in labels]
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for k, (p, present) in enumerate(zip(paths, pool.map(lambda q: _present(q, source), paths))):
            entries[p.name] = present
            if progress is not None:
                progress(k + 1, len(paths))
    if cache_file is not None:
        try:
            atomic_write_json(cache_file, {"key": key, "dataset": source.dataset, "split": source.split, "entries": entries})
        except OSError as e:
            log.warning("could not write the label index cache %s: %s", cache_file, e)
    return entries


def load_semantic(
    dataset: str,
    data_root: Path,
    split: str,
    *,
    rounds_per_sample: int | None = None,
    shuffle_seed: int = 0,
    skip_missing: bool = False,
    classes_file: Path | None = None,
    cache: bool = True,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[SegSample]:
    """``ade20k|cocostuff|mapillary:{train,val}`` → records (see the module docstring)."""
    if dataset not in SOURCES:
        raise CoresError(f"unknown label-map dataset {dataset!r}; choose from {', '.join(SOURCES)}")
    require_dir(Path(data_root), "data root")
    source = SOURCES[dataset](Path(data_root), split, classes_file)
    index = build_label_index(source, cache=cache, cache_dir=cache_dir, workers=workers, progress=progress)
    if rounds_per_sample is None and split == "train":
        rounds_per_sample = 3
    images = DirIndex()
    samples: list[SegSample] = []
    missing: list[Path] = []
    unreadable = empty = 0
    for name, present in index.items():
        label = source.label_dir / name
        if isinstance(present, str):
            unreadable += 1
            log.warning("%s:%s: unreadable label map %s; left out", dataset, split, present)
            continue
        if not present:
            empty += 1
            continue
        image = source.image_for(label)
        if not images.exists(image):
            missing.append(image)
            continue
        rounds = [
            QARound(source.classes[c].lower(), LabelMapMask(str(label), c, source.convention, len(source.classes), source.ignore_ids), "phrase", source.classes[c])
            for c in present
        ]
        if rounds_per_sample:
            random.Random(f"{shuffle_seed}:{label.stem}").shuffle(rounds)
        groups = chunk(rounds, rounds_per_sample)
        samples.extend(records_of_image(f"{dataset}:{split}/{label.stem}", str(image), groups, dataset, {"label_map": str(label)}))
    if check_missing_images(missing, len(index), f"{dataset}:{split} ({source.image_dir})", skip_missing):
        log.warning("%s:%s: left out %d label map(s) without an image", dataset, split, len(missing))
    if empty:
        log.info("%s:%s: %d label map(s) with no class left out", dataset, split, empty)
    return samples

"""ReasonPart reader: the output of ``cores make-reasonpart``, read as ReasonSeg (paper App. C).

Layout (what :mod:`cores_cli.builders.reasonpart` writes)::

    DIR/manifest.jsonl                 one line per (image, part) item: provenance
    DIR/{split}/NAME.jpg + NAME.json   ReasonSeg format; {split} is partimagenet, pascalpart, ...
    DIR/.make-reasonpart.lock, .make-reasonpart.journal   the builder's own (not read here)

``reasonpart:DIR`` evaluates every split folder of DIR together (the paper reports one gIoU and
one cIoU for ReasonPart, over its PartImageNet and PASCAL-Part halves); ``reasonpart:DIR/pascalpart``
(a folder that holds the JSONs itself) evaluates that half only. DIR is a path as given
(relative to the working directory); no ``--data-root`` is needed.

Each JSON is one item: one part class of one image (all its instances, one mask) and its
question. Records come from the ReasonSeg reader (:func:`~cores_cli.data.reasonseg.read_split_dir`)
with LISA's evaluation protocol: the first ``text`` of each JSON (``queries="all"`` for every
one; make-reasonpart writes one question per item, so both give the same set). Polygons
labelled ``ignore`` are the holes of a part (255 in the mask: left out of intersection and union).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CoresError
from .reasonseg import Queries, Subset, read_split_dir
from .records import SegSample

MANIFEST = "manifest.jsonl"
DATASET = "reasonpart"


def split_folders(directory: Path) -> list[Path]:
    """The split folders of a make-reasonpart output (or the folder itself if it holds JSONs)."""
    d = Path(directory)
    if not d.is_dir():
        raise CoresError(f"reasonpart: folder not found: {d} (give the --out folder of cores make-reasonpart)")
    if any(p.suffix == ".json" for p in d.iterdir()):
        return [d]
    subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and any(q.suffix == ".json" for q in p.iterdir()))
    if not subs:
        hint = "" if (d / MANIFEST).is_file() else f" and no {MANIFEST}"
        raise CoresError(f"reasonpart: {d} holds no split folder with *.json files{hint}; is it the --out folder of cores make-reasonpart?")
    return subs


def load_reasonpart(
    directory: Path | str,
    *,
    queries: Queries = "first",
    subset: Subset | None = None,
    rounds_per_sample: int | None = None,
    skip_missing: bool = False,
) -> list[SegSample]:
    """Every item of every split folder of ``directory`` (see the module docstring)."""
    samples: list[SegSample] = []
    for folder in split_folders(Path(directory)):
        samples.extend(
            read_split_dir(folder, queries=queries, subset=subset, rounds_per_sample=rounds_per_sample, skip_missing=skip_missing, dataset=DATASET)
        )
    return samples

"""Synthetic hierarchical benchmark (docs/RESULTS.md): parts that only their container tells apart.

What it is for: showing, on a CPU with a tiny SAM (128 px input) and a tiny LLaVA, that the
whole system learns the thing the paper is about — finding a *part* from a query that names
its function, when similar-looking parts sit in other objects. A dark disc is an eye on a face,
a wheel on a car and an eye on a fish; a light-blue rectangle is a car window or a house
window; a triangle is a nose, a roof, a fin or a tail (all triangles of a scene share one
colour); red is a mouth or a fruit; a brown rectangle is a car door, a house door or a tree
trunk. Only the container around a shape (and where the shape sits in it) says which part it
is.

Scenes (default 128×128 RGB): 1–3 containers of different kinds among face, car, house, tree
and fish (probabilities 0.6 / 0.3 / 0.1), each a body with 2–3 kinds of parts, plus loose
look-alike shapes on the free background (often one of the target's colour family, and 0–2
others); colours are jittered and a little pixel noise is added. Parts never overlap each
other, nothing is drawn over a part, and bodies are never targets, so a part's polygons are
exactly its visible pixels. Parts are large for the image (a target covers about 4 % of the
image at the median, 1.5–9 % from the 10th to the 90th percentile) so that SAM's 4×
lower-resolution masks can resolve them.

Each sample = one image and one target: all instances of one part kind of one container (both
eyes of the face). Its queries (``n_texts``, default 3, all of one style) name a function or
property of the part and the container, never the part ("the parts that let the vehicle
roll"): short noun phrases (``is_sentence`` false, style ``"phrase"``) or long questions
(``is_sentence`` true, style ``"sentence"``), half of each. Records follow the ReasonSeg
reader's conventions exactly (rounds = queries sharing one mask; ``queries="first"`` by default
on val/test, ``"all"`` on train), and ``meta`` holds ``container``, ``part``,
``container_mask`` (the container's silhouette, a :class:`LabelmePolygonMask`),
``is_sentence``, ``num_texts`` and ``image_size``.

Determinism: sample ``i`` of split ``s`` with seed ``k`` is drawn from
``numpy.random.SeedSequence([k, SPLIT_IDS[s], i])`` alone, so splits come from disjoint seed
streams, a larger ``n`` extends a smaller one, and the same seed gives byte-identical files.
That is also why :func:`load_synthetic` can be lazy: it returns a sequence that renders a scene
when one of its records is first read (:class:`SyntheticSamples`), so a training run starts
without generating the thousands of scenes it will draw from.

On disk (ReasonSeg format, readable by LISA's loader and ours)::

    python -m cores_cli.data.synthetic --out DIR --split val --n 200 --seed 0

writes ``DIR/val/NAME.jpg`` + ``DIR/val/NAME.json``. All geometry is polygons (discs are
32-gons) stored in ``shapes``, so the ReasonSeg rasteriser reproduces the in-memory mask
exactly; the container's polygons sit under the extra key ``"cores_synthetic"``, which LISA
ignores. Images are JPEG by default (LISA's reader only lists ``*.jpg``; ``--format png`` keeps
pixels lossless).
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from ..errors import CoresError
from ..fileio import atomic_directory
from .layout import chunk
from .masks import LabelmePolygonMask, PolygonShape
from .reasonseg import SYNTHETIC_KEY
from .reasonseg_writer import dumps_reasonseg, reasonseg_document, shape_record
from .records import QARound, SegSample

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 200}
GENERATOR_VERSION = 1

Points = list[tuple[float, float]]

# ------------------------------------------------------------------------------ geometry
# Shapes are built in a container's unit box ([0, 1]², y down) and mapped to pixels.


def _disc(cx: float, cy: float, r: float, n: int = 32) -> Points:
    return [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> Points:
    return [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Points:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Colour families that make parts look alike across containers.
DARK, GLASS, RED, BROWN, ACCENT = "dark", "glass", "red", "brown", "accent"
BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    DARK: (30, 30, 35),
    GLASS: (150, 205, 235),
    RED: (205, 40, 45),
    BROWN: (120, 75, 40),
}


@dataclass(frozen=True)
class PartDef:
    """A part kind: its polygons in the unit box and its colour family."""

    name: str
    polygons: tuple[tuple[tuple[float, float], ...], ...]
    colour: str


@dataclass(frozen=True)
class ContainerDef:
    name: str
    body: tuple[tuple[tuple[float, float], ...], ...]
    body_colours: tuple[tuple[int, int, int], ...]
    """One candidate colour per body polygon list entry is drawn from these (jittered)."""
    parts: tuple[PartDef, ...]


def _polys(*ps: Points) -> tuple[tuple[tuple[float, float], ...], ...]:
    return tuple(tuple(p) for p in ps)


CONTAINERS: dict[str, ContainerDef] = {
    "face": ContainerDef(
        "face",
        _polys(_ellipse(0.5, 0.5, 0.44, 0.49)),
        ((230, 190, 150), (200, 150, 110), (160, 110, 80)),
        (
            PartDef("eyes", _polys(_disc(0.31, 0.36, 0.13), _disc(0.69, 0.36, 0.13)), DARK),
            PartDef("nose", _polys([(0.5, 0.4), (0.34, 0.66), (0.66, 0.66)]), ACCENT),
            PartDef("mouth", _polys(_ellipse(0.5, 0.8, 0.25, 0.09)), RED),
        ),
    ),
    "car": ContainerDef(
        "car",
        _polys([(0.02, 0.38), (0.98, 0.38), (0.98, 0.78), (0.02, 0.78)], [(0.18, 0.39), (0.82, 0.39), (0.7, 0.06), (0.3, 0.06)]),
        ((60, 90, 200), (40, 150, 70), (200, 200, 210), (230, 140, 30)),
        (
            PartDef("wheels", _polys(_disc(0.24, 0.8, 0.15), _disc(0.76, 0.8, 0.15)), DARK),
            PartDef("windows", _polys(_rect(0.32, 0.12, 0.48, 0.36), _rect(0.52, 0.12, 0.68, 0.36)), GLASS),
            PartDef("door", _polys(_rect(0.4, 0.42, 0.6, 0.76)), BROWN),
        ),
    ),
    "house": ContainerDef(
        "house",
        _polys(_rect(0.14, 0.46, 0.86, 0.98)),
        ((225, 215, 180), (200, 200, 200), (235, 180, 160)),
        (
            PartDef("roof", _polys([(0.04, 0.47), (0.96, 0.47), (0.5, 0.04)]), ACCENT),
            PartDef("door", _polys(_rect(0.4, 0.62, 0.6, 0.98)), BROWN),
            PartDef("windows", _polys(_rect(0.18, 0.53, 0.37, 0.74), _rect(0.63, 0.53, 0.82, 0.74)), GLASS),
        ),
    ),
    "tree": ContainerDef(
        "tree",
        _polys(_disc(0.5, 0.38, 0.37)),
        ((50, 140, 60), (80, 160, 50), (40, 110, 70)),
        (
            PartDef("trunk", _polys(_rect(0.38, 0.6, 0.62, 0.99)), BROWN),
            PartDef("fruit", _polys(_disc(0.32, 0.3, 0.1), _disc(0.66, 0.28, 0.1), _disc(0.48, 0.47, 0.1)), RED),
        ),
    ),
    "fish": ContainerDef(
        "fish",
        _polys(_ellipse(0.44, 0.56, 0.4, 0.28)),
        ((240, 150, 40), (90, 170, 220), (170, 120, 200)),
        (
            PartDef("tail", _polys([(0.76, 0.56), (1.0, 0.22), (1.0, 0.9)]), ACCENT),
            PartDef("eye", _polys(_disc(0.2, 0.5, 0.1)), DARK),
            PartDef("fin", _polys([(0.28, 0.3), (0.62, 0.3), (0.42, 0.0)]), ACCENT),
        ),
    ),
}

# Loose look-alike shapes (unit box of a distractor).
DISTRACTORS: tuple[PartDef, ...] = (
    PartDef("dark disc", _polys(_disc(0.5, 0.5, 0.45)), DARK),
    PartDef("glass pane", _polys(_rect(0.1, 0.1, 0.9, 0.9)), GLASS),
    PartDef("red disc", _polys(_disc(0.5, 0.5, 0.4)), RED),
    PartDef("triangle", _polys([(0.05, 0.95), (0.95, 0.95), (0.5, 0.05)]), ACCENT),
    PartDef("brown block", _polys(_rect(0.25, 0.0, 0.75, 1.0)), BROWN),
)

# --------------------------------------------------------------------------------- queries
# Each (container, part): short noun phrases ("What is {phrase} in this image?") and long
# questions. They name a function or property, and the container, never the part.

QUERIES: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("face", "eyes"): {
        "short": ("the parts the face sees with", "something the person uses to look around", "the features that let this person see"),
        "long": (
            "Which parts of the face would close if the person fell asleep?",
            "If this person wanted to read a book, which parts of the face would they rely on?",
            "What on this face lets the person see the world around them?",
        ),
    },
    ("face", "nose"): {
        "short": ("the part of the face used for smelling", "something the person breathes and smells through", "the feature in the middle of the face that detects scents"),
        "long": (
            "Which part of the face would notice the smell of fresh bread?",
            "When this person catches a cold, which part of the face gets blocked?",
            "What part of the face would the person use to sniff a flower?",
        ),
    },
    ("face", "mouth"): {
        "short": ("the part of the face used for eating", "something the person speaks and sings with", "the feature that forms a smile on the face"),
        "long": (
            "Which part of the face would the person use to bite into a sandwich?",
            "If this person started to sing, which part of the face would open?",
            "What part of the face would the person use to drink through a straw?",
        ),
    },
    ("car", "wheels"): {
        "short": ("the parts that let the vehicle roll", "the round things the car moves on", "something the car spins as it drives along the road"),
        "long": (
            "Which parts of the vehicle touch the road and spin while it drives?",
            "If the car got a flat, which parts would need to be replaced?",
            "What does this car roll on when it moves forward?",
        ),
    },
    ("car", "windows"): {
        "short": ("the see-through panes of the vehicle", "something the driver looks out through", "the glass parts of the car"),
        "long": (
            "Through which parts of the car can passengers see outside?",
            "Which parts of the vehicle would you wipe clean to get a clear view out?",
            "When it rains, which see-through parts of the car get wet?",
        ),
    },
    ("car", "door"): {
        "short": ("the panel passengers open to climb into the vehicle", "something you open to get inside the car", "the hinged side panel of the car"),
        "long": (
            "Which part of the car would you open to sit inside?",
            "How does a passenger get into this vehicle?",
            "What part of the car swings open when the driver gets out?",
        ),
    },
    ("house", "roof"): {
        "short": ("the top covering that keeps rain off the house", "something that shelters the building from above", "the sloped top of the home"),
        "long": (
            "Which part of the house keeps the people inside dry during a storm?",
            "If snow piled up on this building, where would it rest?",
            "What covers the top of this home?",
        ),
    },
    ("house", "door"): {
        "short": ("the entrance of the building", "something visitors knock on before entering the house", "the way into the home from outside"),
        "long": (
            "Which part of the house would a visitor knock on?",
            "How would someone get inside this building from the street?",
            "What part of the home opens to let its owner in?",
        ),
    },
    ("house", "windows"): {
        "short": ("the glass openings of the building", "something that lets daylight into the house", "the panes people look out of from inside the home"),
        "long": (
            "Which parts of the house let sunlight into the rooms?",
            "Through which parts of the building could someone peek into the rooms?",
            "What on this house would you clean to let more light into the rooms?",
        ),
    },
    ("tree", "trunk"): {
        "short": ("the woody stem that holds the tree up", "something a woodcutter would chop on the tree", "the thick column the tree stands on"),
        "long": (
            "Which part of the tree would a woodcutter chop to fell it?",
            "What part of the plant carries water up from the ground to the leaves?",
            "Where would you carve your initials on this tree?",
        ),
    },
    ("tree", "fruit"): {
        "short": ("something that can be picked from the tree and eaten", "the ripe food growing on the tree", "the round red treats hanging in the plant"),
        "long": (
            "Which parts of the tree would you harvest in autumn?",
            "If you were hungry, what could you pick from this plant?",
            "What on this tree would birds come to peck at and eat?",
        ),
    },
    ("fish", "tail"): {
        "short": ("the part that pushes the fish through the water", "something the fish sweeps from side to side to swim", "the back end that propels the fish"),
        "long": (
            "Which part of the fish sweeps from side to side to move it forward?",
            "What part of this swimming animal propels it through the water?",
            "If the fish wanted to speed up, which part at its back would it beat harder?",
        ),
    },
    ("fish", "eye"): {
        "short": ("the part the fish sees with", "something the fish uses to spot food", "the dark round feature near the front of the fish"),
        "long": (
            "Which part of the fish would spot food drifting in the water?",
            "What lets this swimming animal see where it is going?",
            "Which part of the fish would notice an approaching shark?",
        ),
    },
    ("fish", "fin"): {
        "short": ("the part on the fish's back that keeps it steady", "something on top of the fish that helps it balance", "the thin pointed flap on the fish's back"),
        "long": (
            "Which part on top of the fish helps it keep its balance?",
            "What sticks up from the fish's back and keeps it upright while swimming?",
            "Which part of the swimming animal cuts through the water above its body?",
        ),
    },
}

MAX_TEXTS = min(len(bank) for styles in QUERIES.values() for bank in styles.values())
"""The most queries a sample can have (``n_texts``): each (container, part) has this many per style."""

PART_WORDS = (
    "eye", "eyes", "eyeball", "pupil", "nose", "nostril", "nostrils", "mouth", "lip", "lips",
    "wheel", "wheels", "tire", "tires", "tyre", "tyres", "window", "windows", "windshield",
    "door", "doors", "roof", "roofs", "trunk", "trunks", "fruit", "fruits", "apple", "apples",
    "tail", "tails", "fin", "fins",
)
"""Words no query may contain: every part's name and its obvious synonyms."""


# ------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class SyntheticItem:
    """One generated sample before it becomes a record or files."""

    name: str
    image: np.ndarray
    """uint8 (H, W, 3)."""
    texts: tuple[str, ...]
    is_sentence: bool
    target: tuple[PolygonShape, ...]
    container: str
    part: str
    container_shapes: tuple[PolygonShape, ...]


def _jitter(rng: np.random.Generator, colour: Sequence[int], amount: int = 18) -> tuple[int, int, int]:
    c = np.asarray(colour, dtype=np.int64) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _to_pixels(poly: Sequence[tuple[float, float]], x: float, y: float, w: float, h: float) -> tuple[tuple[float, float], ...]:
    """Unit-box polygon → pixel coordinates, rounded to 2 decimals (what the JSON stores)."""
    return tuple((round(x + px * w, 2), round(y + py * h, 2)) for px, py in poly)


def _fill(image: np.ndarray, pts: tuple[tuple[float, float], ...], colour: tuple[int, int, int]) -> None:
    """Paint a polygon with exactly the pixels the ReasonSeg rasteriser gives it (same int32
    truncation, outline + fill), so images and masks line up to the pixel."""
    p = np.asarray(pts, dtype=np.float64).astype(np.int32).reshape(1, -1, 2)
    cv2.polylines(image, p, True, colour, 1)
    cv2.fillPoly(image, p, colour)


def _boxes(rng: np.random.Generator, n: int, size: int) -> list[tuple[float, float, float]]:
    """Non-overlapping square boxes (x, y, side) for ``n`` containers in a size×size image."""
    if n == 1:
        s = rng.uniform(0.72, 0.92) * size
        return [(rng.uniform(0, size - s), rng.uniform(0, size - s), s)]
    if n == 2:
        s = rng.uniform(0.44, 0.5) * size
        half = size / 2
        if rng.random() < 0.5:  # side by side
            return [(rng.uniform(0, half - s), rng.uniform(0, size - s), s), (half + rng.uniform(0, half - s), rng.uniform(0, size - s), s)]
        return [(rng.uniform(0, size - s), rng.uniform(0, half - s), s), (rng.uniform(0, size - s), half + rng.uniform(0, half - s), s)]
    s = rng.uniform(0.42, 0.48) * size
    half = size / 2
    cells = [(0.0, 0.0, half, half), (half, 0.0, half, half), (0.0, half, size, half)]
    if rng.random() < 0.5:  # the wide cell on top instead
        cells = [(0.0, half, half, half), (half, half, half, half), (0.0, 0.0, size, half)]
    return [(cx + rng.uniform(0, cw - s), cy + rng.uniform(0, ch - s), s) for cx, cy, cw, ch in cells]


def generate_item(split: str, index: int, seed: int = 0, image_size: int = 128, n_texts: int = 3) -> SyntheticItem:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLIT_IDS:
        raise CoresError(f"unknown synthetic split {split!r}; choose from {', '.join(SPLIT_IDS)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))
    size = image_size
    n_cont = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    kinds = [str(k) for k in rng.choice(sorted(CONTAINERS), size=n_cont, replace=False)]
    boxes = _boxes(rng, n_cont, size)

    # Background: a vertical two-colour gradient.
    top, bottom = rng.integers(150, 256, size=3), rng.integers(90, 220, size=3)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    image = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).astype(np.uint8).copy()

    palette = {k: _jitter(rng, v) for k, v in BASE_COLOURS.items()}
    palette[ACCENT] = _jitter(rng, rng.choice([(230, 120, 60), (150, 80, 160), (90, 90, 200), (200, 60, 110)]), 12)

    drawn: list[tuple[str, dict[str, tuple[tuple[tuple[float, float], ...], ...]], list[tuple[tuple[float, float], ...]]]] = []
    for kind, (bx, by, bs) in zip(kinds, boxes):
        cdef = CONTAINERS[kind]
        body_colour = _jitter(rng, cdef.body_colours[int(rng.integers(len(cdef.body_colours)))])
        silhouette: list[tuple[tuple[float, float], ...]] = []
        for poly in cdef.body:
            pts = _to_pixels(poly, bx, by, bs, bs)
            _fill(image, pts, body_colour)
            silhouette.append(pts)
        parts: dict[str, tuple[tuple[tuple[float, float], ...], ...]] = {}
        for pdef in cdef.parts:
            colour = palette[pdef.colour]
            pix = tuple(_to_pixels(poly, bx, by, bs, bs) for poly in pdef.polygons)
            for pts in pix:
                _fill(image, pts, colour)
            parts[pdef.name] = pix
            silhouette.extend(pix)
        drawn.append((kind, parts, silhouette))

    ci = int(rng.integers(n_cont))
    kind, parts, silhouette = drawn[ci]
    part = sorted(parts)[int(rng.integers(len(parts)))]

    # Loose look-alike shapes where nothing is drawn yet (2 px apart from everything): often
    # one of the target's own colour family, plus 0-2 others.
    occupied = np.zeros((size, size), np.uint8)
    for _, _, sil in drawn:
        for pts in sil:
            _fill(occupied, pts, 1)
    family = next(p.colour for p in CONTAINERS[kind].parts if p.name == part)
    loose = [d for d in DISTRACTORS if d.colour == family][:1] if rng.random() < 0.6 else []
    loose += [DISTRACTORS[int(k)] for k in rng.integers(len(DISTRACTORS), size=int(rng.integers(0, 3)))]
    for ddef in loose:
        ds = rng.uniform(0.1, 0.16) * size
        for _try in range(16):
            x, y = rng.uniform(0, size - ds), rng.uniform(0, size - ds)
            pix = [_to_pixels(poly, x, y, ds, ds) for poly in ddef.polygons]
            shape = np.zeros((size, size), np.uint8)
            for pts in pix:
                _fill(shape, pts, 1)
            if not (cv2.dilate(occupied, np.ones((5, 5), np.uint8)) & shape).any():
                for pts in pix:
                    _fill(image, pts, palette[ddef.colour])
                occupied |= shape
                break

    noise = rng.normal(0.0, 5.0, size=image.shape)
    image = np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)

    is_sentence = bool(rng.random() < 0.5)
    bank = QUERIES[(kind, part)]["long" if is_sentence else "short"]
    order = rng.permutation(len(bank))[: max(1, min(n_texts, len(bank)))]
    texts = tuple(bank[int(k)] for k in order)
    return SyntheticItem(
        name=f"synthetic_{split}_s{seed}_{index:06d}",
        image=image,
        texts=texts,
        is_sentence=is_sentence,
        target=tuple(PolygonShape("target", pts) for pts in parts[part]),
        container=kind,
        part=part,
        container_shapes=tuple(PolygonShape("target", pts) for pts in silhouette),
    )


def item_to_sample(
    item: SyntheticItem,
    split: str,
    *,
    queries: Literal["first", "all"] = "first",
    rounds_per_sample: int | None = None,
) -> list[SegSample]:
    """The records the ReasonSeg reader would make from this item's files (same rounds, masks
    and meta), with the pixels in ``image_array``."""
    target = LabelmePolygonMask(item.target)
    style = "sentence" if item.is_sentence else "phrase"
    texts = item.texts[:1] if queries == "first" else item.texts
    rounds = [QARound(t, target, style) for t in texts]
    meta = {
        "is_sentence": item.is_sentence,
        "num_texts": len(item.texts),
        "image_size": item.image.shape[:2],
        "container": item.container,
        "part": item.part,
        "container_mask": LabelmePolygonMask(item.container_shapes),
    }
    groups = chunk(rounds, rounds_per_sample)
    return [
        SegSample(
            f"synthetic/{split}/{item.name}" + (f"#{g}" if len(groups) > 1 else ""),
            f"synthetic/{split}/{item.name}.png",
            tuple(group),
            "synthetic",
            dict(meta),
            item.image,
        )
        for g, group in enumerate(groups)
    ]


CACHE_BYTES = 128 * 2**20
"""Pixels :class:`SyntheticSamples` keeps of the scenes it rendered last (about 2,700 scenes at
128 px; the eager list of the default 10,000 training scenes held 490 MB). `cores eval` reads
its samples several times (ids, warnings, batches): a split that fits renders each scene once,
a larger one renders it again on each pass. Training draws scenes at random and barely
revisits them: there the cache saves little, and rendering (about 2 ms a scene) is cheap next
to a step."""


class _Scenes:
    """What every view of one ``load_synthetic`` call shares: the options, the item indices a
    ``subset`` keeps (found on first need) and a small cache of rendered items.

    Pickled (to DataLoader workers) without the cache, so a worker starts with the options and
    the subset index only."""

    def __init__(self, split: str, count: int, seed: int, image_size: int, n_texts: int, queries: Literal["first", "all"], subset: str | None, rounds_per_sample: int | None) -> None:
        self.split, self.count, self.seed, self.image_size, self.n_texts = split, count, seed, image_size, n_texts
        self.queries, self.subset, self.rounds_per_sample = queries, subset, rounds_per_sample
        # every item has n_texts queries (each query bank holds at least MAX_TEXTS ≥ n_texts),
        # so how many records an item becomes is known without rendering it
        rounds = 1 if queries == "first" else n_texts
        self.per_item = len(chunk(range(rounds), rounds_per_sample))
        self.kept: list[int] | None = None
        self._setup()

    def _setup(self) -> None:
        self.capacity = max(16, CACHE_BYTES // (self.image_size * self.image_size * 3))
        self.cache: OrderedDict[int, list[SegSample]] = OrderedDict()
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("cache", "lock"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def items(self) -> int:
        """How many items the samples come from (``subset`` applied)."""
        return len(self.kept_indices()) if self.subset is not None else self.count

    def kept_indices(self) -> list[int]:
        """The indices of the items whose query style is ``subset``. The style is drawn last,
        after the scene (whose look-alike shapes take a varying number of draws), so finding it
        renders every item once; this happens on first need and only for a subset."""
        if self.kept is None:
            want = self.subset == "long"
            kept = [i for i in range(self.count) if self.records(i)[0].meta["is_sentence"] == want]
            self.kept = kept
        return self.kept

    def item_index(self, ordinal: int) -> int:
        return self.kept_indices()[ordinal] if self.subset is not None else ordinal

    def records(self, index: int) -> list[SegSample]:
        """The records of item ``index`` (rendered, or from the cache)."""
        with self.lock:
            found = self.cache.get(index)
            if found is not None:
                self.cache.move_to_end(index)
                return found
        item = generate_item(self.split, index, self.seed, self.image_size, self.n_texts)
        made = item_to_sample(item, self.split, queries=self.queries, rounds_per_sample=self.rounds_per_sample)
        if len(made) != self.per_item:  # the positions of every later sample would be off
            raise RuntimeError(f"synthetic item {index} made {len(made)} records, expected {self.per_item}")
        with self.lock:
            self.cache[index] = made
            self.cache.move_to_end(index)
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return made


class SyntheticSamples(Sequence[SegSample]):
    """The records of ``synthetic:{split}``, each scene rendered when it is first read.

    A read-only sequence (``len``, indexing, slicing, iteration) holding the same records in the
    same order as the list it replaces: sample ``i`` is record ``i % k`` of item ``i // k`` (of
    the items a ``subset`` keeps), where ``k`` records per item follow from the options alone.
    Scenes are pure functions of their index (:func:`generate_item`), so a record read twice is
    the same; the last ones read are cached (:data:`CACHE_BYTES`). A slice is a view sharing
    the cache; ``list(samples)`` makes the eager list."""

    reads_no_files = True
    """Every record's image is generated in memory: no record was read from a file."""

    def __init__(self, scenes: _Scenes, positions: range | None = None) -> None:
        self._scenes = scenes
        self._positions = positions

    @property
    def positions(self) -> range:
        if self._positions is None:
            # a subset's length needs its index: found here, on first use, not when loading
            self._positions = range(self._scenes.items() * self._scenes.per_item)
        return self._positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return SyntheticSamples(self._scenes, self.positions[key])
        return self._at(self.positions[operator.index(key)])

    def __iter__(self) -> Iterator[SegSample]:
        for p in self.positions:
            yield self._at(p)

    def _at(self, position: int) -> SegSample:
        ordinal, group = divmod(position, self._scenes.per_item)
        return self._scenes.records(self._scenes.item_index(ordinal))[group]

    def __repr__(self) -> str:
        s = self._scenes
        return f"SyntheticSamples(synthetic:{s.split}{':' + s.subset if s.subset else ''}, n={s.count}, seed={s.seed}, {len(self)} records)"


def load_synthetic(
    split: str,
    *,
    n: int | None = None,
    seed: int = 0,
    image_size: int = 128,
    n_texts: int = 3,
    queries: Literal["first", "all"] | None = None,
    subset: Literal["short", "long"] | None = None,
    rounds_per_sample: int | None = None,
) -> SyntheticSamples:
    """``synthetic:{split}`` generated in memory, lazily (:class:`SyntheticSamples`): nothing is
    rendered until a record is read, so a run that reads 480 of 10,000 scenes renders 480. ``n``
    defaults to 2000/200/200 for train/val/test; ``subset`` keeps short- or long-query samples
    out of those ``n``."""
    if split not in SPLIT_IDS:
        raise CoresError(f"unknown synthetic split {split!r}; choose from {', '.join(SPLIT_IDS)}")
    for key, value, low in (("n", n, 1), ("seed", seed, 0), ("image_size", image_size, 32), ("n_texts", n_texts, 1)):
        # int("abc") or int([1]) would be a traceback, and int(2.9) a silent 2
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
            raise CoresError(f"synthetic {key} must be an integer ≥ {low}, got {value!r}")
    if n_texts > MAX_TEXTS:
        raise CoresError(f"synthetic n_texts must be at most {MAX_TEXTS} (queries per sample), got {n_texts}")
    if queries not in (None, "first", "all"):
        raise CoresError(f"synthetic queries must be 'first' or 'all', got {queries!r}")
    if subset not in (None, "short", "long"):
        # any other word would quietly keep the short-query samples only
        raise CoresError(f"synthetic subset must be 'short' or 'long', got {subset!r}")
    count = DEFAULT_SIZES[split] if n is None else int(n)
    q = queries or ("all" if split == "train" else "first")
    return SyntheticSamples(_Scenes(split, count, int(seed), int(image_size), int(n_texts), q, subset, rounds_per_sample))


# ---------------------------------------------------------------------------------- writing


def item_json(item: SyntheticItem, image_name: str, seed: int) -> dict:
    """The ReasonSeg JSON of an item (LabelMe-style shapes, plus our extra key)."""
    extra = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "container": item.container,
        "part": item.part,
        "container_shapes": [shape_record(s, image_name) for s in item.container_shapes],
    }
    return reasonseg_document(item.texts, item.is_sentence, item.target, image_name, {SYNTHETIC_KEY: extra})


def write_split(
    out: Path,
    split: str,
    n: int | None = None,
    seed: int = 0,
    image_size: int = 128,
    n_texts: int = 3,
    image_format: Literal["jpg", "png"] = "jpg",
) -> Path:
    """Write ``n`` samples to ``out/split`` in ReasonSeg format; the folder is replaced as a
    whole (built aside, then swapped in). Returns the split folder."""
    if image_format not in ("jpg", "png"):
        raise CoresError(f"image format must be jpg or png, got {image_format!r}")
    if split not in SPLIT_IDS:
        raise CoresError(f"unknown synthetic split {split!r}; choose from {', '.join(SPLIT_IDS)}")
    count = DEFAULT_SIZES[split] if n is None else int(n)
    dest = Path(out) / split
    with atomic_directory(dest) as tmp:
        for i in range(count):
            item = generate_item(split, i, seed, image_size, n_texts)
            image_name = f"{item.name}.{image_format}"
            img = Image.fromarray(item.image)
            if image_format == "jpg":
                img.save(tmp / image_name, format="JPEG", quality=95, subsampling=0)
            else:
                img.save(tmp / image_name, format="PNG")
            (tmp / f"{item.name}.json").write_text(dumps_reasonseg(item_json(item, image_name, seed)), encoding="ascii")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cores_cli.data.synthetic",
        description="Write the synthetic hierarchical benchmark in ReasonSeg format "
        "(OUT/SPLIT/NAME.jpg + NAME.json), readable by LISA's loader and `reasonseg` readers.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder; SPLIT/ is created (replaced) inside it")
    parser.add_argument("--split", required=True, choices=sorted(SPLIT_IDS), help="which split's seed stream to draw from")
    parser.add_argument("--n", type=int, default=None, help="number of samples (default: 2000 train, 200 val/test)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (same seed, same files, byte for byte)")
    parser.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default 128)")
    parser.add_argument("--texts", type=int, default=3, help="query phrasings per sample (1-3, default 3)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image format (LISA lists *.jpg only)")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 0:
        parser.error("--n must be >= 0")
    if args.image_size < 32:
        parser.error("--image-size must be at least 32")
    try:
        dest = write_split(args.out, args.split, args.n, args.seed, args.image_size, args.texts, args.format)
    except (CoresError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = DEFAULT_SIZES[args.split] if args.n is None else args.n
    print(f"wrote {count} samples to {dest} (NAME.{args.format} + NAME.json, ReasonSeg format)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

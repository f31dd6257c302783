"""Build ReasonPart (paper appendix C): reasoning questions about object parts, in ReasonSeg format.

The paper asked ChatGPT, with in-context examples, for questions about part categories ("In the
oceanic scene, which functional feature aids fish in steering and maintaining stability in the
currents?") on 2,957 PartImageNet val images and 4,465 PASCAL-Part images. This module does
that for any COCO-format PartImageNet or PASCAL-Part file (read by
:func:`cores_cli.data.parts.read_coco_parts`, so names, the "Tier" typo and polygons/RLE are
handled as in training and evaluation). The file is checked before anything is written
(:func:`cores_cli.data.parts.check_coco_parts`): an image or category id given twice, a size that
is not a positive whole number or a ``file_name`` outside ``--images`` (absolute, or with ``..``)
is an error; annotations naming an unknown image or category are left out and counted in the
summary (``annotation_warnings``), as are annotation ids given twice.

Selection. The images that have at least one part annotation (and whose file exists) are
shuffled with ``seed``; the first ``n`` are used (default: all), and when an image yields no item
(every part empty, or no acceptable question) the next one takes its place, so the output ends
with exactly ``n`` images. Per image, ``parts_per_image`` part classes (default 1) are drawn with
a generator seeded by ``seed`` and the image id: first among classes covering at least
``min_area`` of the image (0.5 %, about a 16×16 patch of a 224×224 crop: smaller parts are hardly
visible and their IoU is noise), then, if too few are that large, the largest of the rest.
The target is the class's mask, the union of all its instances (a question about "the fins" means
all of them), as the part readers build it.

Questions. ``questions="chat"`` asks an OpenAI-compatible chat model (the plumbing of
``build-context``: :mod:`cores_cli.builders.chat_loop`), ``batch_size`` items per request, with
:data:`SYSTEM_PROMPT` and ``few_shot`` worked examples (:data:`PROMPT_EXAMPLES`, in the paper's
style) as an earlier user/assistant turn. Every requested item gets an id used once in the run
(``{run nonce}-{counter}``) that the reply must echo: an entry with an id this request did not
ask for (a reply replayed or mixed up from another request) is rejected as "not requested", and
an item whose id is missing from the reply is asked again. ``questions="template"`` draws one of
the hand-written questions of the shipped part→function table (``cores_cli/assets/part_functions.json``; no key,
no network), deterministically from ``seed``, the image and the class. Either way a question
must pass :func:`validate_question`: one sentence of 6–60 words ending in "?", no special
tokens, and no word that names the part (its head noun in any number, plus the table's names,
e.g. "tyre", "wheel" for "Car Tier"). A rejected item is asked again, up to ``item_attempts``
times.

Files, in ``out``::

    {split}/NAME.jpg     the source image, symlinked (absolute target), hard-linked or copied
    {split}/NAME.json    ReasonSeg: text [question], is_sentence true, shapes (see below)
    manifest.jsonl       one line per item: provenance (source, annotation file name, image id,
                         file name, category id, part class, annotation ids, area, mode, model,
                         prompt or table version, seed, polygon counts, conversion IoU)
    .make-reasonpart.journal   items begun and not yet in the manifest (see Resume)
    .make-reasonpart.lock      held by the running build: a second run on ``out`` is refused

Nothing else in ``out`` is touched: other files, even in ``{split}/`` and even named like an
item, are the user's. Inputs and output must not overlap (checked on real paths, symlinks
resolved): ``--images`` must not lie inside ``out/{split}`` nor hold ``out``, and ``--ann`` and
``--table`` must not lie inside ``out/{split}`` or be one of the files above. A file not written
by make-reasonpart where an item's file would go is an error before any question is asked.

``split`` defaults to the source's name, so one ``out`` holds both halves of ReasonPart.
``NAME`` is ``{image stem}__{part class}``. Shapes come from the class mask through
:func:`cores_cli.data.reasonseg_writer.mask_to_shapes` (holes as ``ignore`` polygons); the
manifest records, per item, the IoU between the mask LISA's rasteriser draws from the written
polygons and the source mask (1.0 in practice).

Resume. An item is written as a journal line naming its two files (before either exists), the
image and the JSON (each an atomic replace), then its manifest line (one ``os.write``, fsynced:
:func:`cores_cli.builders.append_only.append_line`). So every file make-reasonpart may ever remove is
recorded as its own before it is created: on start (under the lock) the torn last lines of the
manifest and journal (a kill mid-write) are cut; manifest lines whose files are gone are dropped
and their remaining file removed; journal items without a manifest line (a kill between the
writes) have their files and temporaries removed. A file is removed only if it still is what was
written: a JSON carrying this item's ``cores_reasonpart`` record, an image that is the source
image's symlink, hard link or copy. Images already in the manifest count towards ``n`` and are
not asked for again; an image with fewer items than ``parts_per_image`` gets its missing ones.
"""

from __future__ import annotations

import contextlib
import filecmp
import itertools
import json
import os
import random
import re
import secrets
import shutil
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .. import __version__
from ..contexts import SPECIAL_TOKENS, ExemplarError, names_object, object_key
from ..data.layout import load_json, require_dir, require_file, upright_size
from ..data.masks import rasterize_shapes
from ..data.parts import PartSource, check_coco_parts, coco_part_warnings, partimagenet_image_path, partimagenet_name, pascal_part_name, read_coco_parts
from ..data.reasonpart import MANIFEST
from ..data.reasonseg_writer import dumps_reasonseg, mask_to_shapes, reasonseg_document
from ..data.records import ReaderWarning, SegSample, warning_kind
from ..errors import CoresError
from ..fileio import OutputLocked, atomic_write_text, exclusive_lock
from .append_only import append_line, repair_torn_tail
from .chat_loop import BuildProgress, ChatJob, ChatLoop, RunSummary, format_counts
from .chat_requests import reply_json
from .chat_settings import ChatSettings, check_chat_settings, make_client

PROMPT_VERSION = "reasonpart-prompt-2"
"""Changes whenever SYSTEM_PROMPT, PROMPT_EXAMPLES or the request format change (2: item ids
unique in the run instead of "1", "2", ... per request)."""
EXTRA_KEY = "cores_reasonpart"
LOCK_FILE = ".make-reasonpart.lock"
JOURNAL = ".make-reasonpart.journal"
MIN_QUESTION_WORDS = 6
MAX_QUESTION_WORDS = 60
MAX_QUESTION_CHARS = 320


# The fixed choices of make-reasonpart's options. The command line hands the library these
# members (Typer checks the value once, there); a library caller may give the values instead.


E = TypeVar("E", bound=Enum)


def choice(kind: type[E], value: object, option: str) -> E:
    """``value`` as a member of ``kind`` (a member stays as it is, its value becomes it), or a
    CoresError naming the option and its choices."""
    try:
        return kind(value)
    except ValueError:
        names = [m.value for m in kind]
        raise CoresError(f"unknown {option} {value!r}; choose {', '.join(names[:-1])} or {names[-1]}") from None


class PartDataset(str, Enum):
    """--source: how the annotation file names its categories and where its images lie."""

    partimagenet = "partimagenet"
    pascalpart = "pascalpart"


class QuestionMode(str, Enum):
    """--questions: asked of the chat model, or drawn from the shipped part→function table."""

    chat = "chat"
    template = "template"


class ImageMode(str, Enum):
    """--image-mode: how the source image is put into the output."""

    symlink = "symlink"
    hardlink = "hardlink"
    copy = "copy"


class HoleMode(str, Enum):
    """--holes: holes inside a part become ``ignore`` polygons or are filled (counted as part)."""

    ignore = "ignore"
    fill = "fill"

SYSTEM_PROMPT = """\
You write questions for a benchmark of reasoning part segmentation: a model sees a photo and a \
question, and must outline the object part that answers it. For every item you get the object, \
one of its parts (the answer) and the other annotated parts in the same photo. Write one question \
whose answer is that part and that takes reasoning to answer: ask about what the part does, how \
it is used or what it is for, optionally set in a short scene ("In the oceanic scene, ..."). \
Rules: never use the part's name or a synonym of it, in singular or plural (a question about a \
fish fin must not say "fin" or "fins"); you may name the object; the other parts may be mentioned \
but must not be the answer; one sentence of 8 to 40 words that ends with a question mark; do not \
mention photos, images, masks or segmentation; use accurate common knowledge. Reply with JSON \
only, in the form {"questions": [{"id": "...", "question": "..."}]}, one entry per item, with the \
ids exactly as given."""

PROMPT_EXAMPLES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("fish", "fin", ("head", "body", "tail"),
     "In the oceanic scene, which functional feature aids fish in steering and maintaining stability in the currents?"),
    ("car", "side mirror", ("body", "tire"),
     "Before changing lanes on a busy highway, which part of the car would the driver glance at to see the traffic coming from behind?"),
    ("bird", "wing", ("head", "body", "tail", "foot"),
     "When the bird takes off from the branch, which parts does it spread and beat to lift itself into the air?"),
    ("bottle", "cap", ("body",),
     "At a picnic, what keeps the lemonade sealed inside the bottle so that it does not spill when the bottle tips over?"),
    ("person", "hand", ("head", "arm", "torso"),
     "On a rainy street, which part of the person would hold the umbrella's handle?"),
    ("dog", "nose", ("head", "eye", "ear", "muzzle"),
     "At the park, which part of the dog helps it track down a hidden treat by its scent?"),
    ("bicycle", "saddle", ("wheel", "handlebar"),
     "On a long countryside ride, which part of the bicycle supports the rider's weight while they pedal?"),
    ("horse", "tail", ("head", "leg", "torso"),
     "On a hot summer pasture, which part of the horse swishes to chase away biting flies?"),
)
"""(object, part, other parts, question): hand-written, shown as a worked example turn."""


# ---- validation -----------------------------------------------------------------------------


class QuestionRejected(ValueError):
    """A question that cannot go into the benchmark; ``reason`` is short, for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_question(text: object, part: str, names: Sequence[str] = ()) -> str:
    """The question, whitespace normalised, or :class:`QuestionRejected` saying why not.

    Naming is judged word by word in any number ("fins" names "fin"; "finish" does not), on the
    part's head noun ("mirror" for "side mirror") and on every entry of ``names``.
    """
    if not isinstance(text, str) or not text.strip():
        raise QuestionRejected("empty question", "the question is empty")
    q = " ".join(text.split())
    if any(tok in q for tok in SPECIAL_TOKENS):
        raise QuestionRejected("special token", "the question holds a special token")
    words = q.split()
    if len(q) > MAX_QUESTION_CHARS or len(words) > MAX_QUESTION_WORDS:
        raise QuestionRejected("too long", f"longer than {MAX_QUESTION_CHARS} characters or {MAX_QUESTION_WORDS} words")
    if len(words) < MIN_QUESTION_WORDS:
        raise QuestionRejected("too short", f"fewer than {MIN_QUESTION_WORDS} words")
    if not q.endswith("?"):
        raise QuestionRejected("not a question", "does not end with a question mark")
    for name in (part, *names):
        if name and names_object(q, name):
            raise QuestionRejected("names the part", f"names the part ({name!r})")
    return q


# ---- the shipped part -> function table ------------------------------------------------------


@dataclass(frozen=True)
class PartEntry:
    """One class of the table: the object phrase, the words that name the part, the questions."""

    object: str
    names: tuple[str, ...]
    questions: tuple[str, ...]


@dataclass(frozen=True)
class PartTable:
    version: int
    path: str
    entries: dict[tuple[str, str], PartEntry]

    def get(self, source: str, class_name: str) -> PartEntry | None:
        """The entry of a class as the dataset spells it (case and spaces ignored)."""
        return self.entries.get((source, " ".join(class_name.lower().split())))


def default_table_path() -> Path:
    return Path(str(resources.files("cores_cli") / "assets" / "part_functions.json"))


def load_part_table(path: Path | None = None) -> PartTable:
    """Read and check the table; errors name the file and the key."""
    p = Path(path) if path is not None else default_table_path()
    require_file(p, "part-function table")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        kinds = data["kinds"]
        entries: dict[tuple[str, str], PartEntry] = {}
        for source, classes in data["classes"].items():
            for name, c in classes.items():
                kind = kinds[c["kind"]]
                obj = c["object"]
                questions = tuple(q.format(object=obj) for q in (*kind["questions"], *c.get("questions", ())))
                names = tuple(dict.fromkeys((*kind["names"], *c.get("names", ()))))
                entries[(source, " ".join(name.lower().split()))] = PartEntry(obj, names, questions)
        version = int(data["version"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CoresError(f"part-function table {p} is not valid JSON ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CoresError(f"part-function table {p} is malformed (missing or bad key {exc})") from None
    return PartTable(version, str(p), entries)


# ---- options and summary --------------------------------------------------------------------


@dataclass(kw_only=True)
class ReasonPartOptions(ChatSettings):
    """What ``cores make-reasonpart`` exposes; the defaults are the command's defaults."""

    source: PartDataset
    ann: Path
    images: Path
    out: Path
    n: int | None = None  # images; None = all
    split: str | None = None  # output folder name; None = the source's name
    parts_per_image: int = 1
    min_area: float = 0.005
    questions: QuestionMode = QuestionMode.chat
    image_mode: ImageMode = ImageMode.symlink
    holes: HoleMode = HoleMode.ignore
    batch_size: int = 4  # items per request
    few_shot: int = 4
    item_attempts: int = 3
    skip_missing: bool = False
    table: Path | None = None

    def __post_init__(self) -> None:
        # members from the command line stay as they are; values ("template") become members
        self.source = choice(PartDataset, self.source, "--source")
        self.questions = choice(QuestionMode, self.questions, "--questions")
        self.image_mode = choice(ImageMode, self.image_mode, "--image-mode")
        self.holes = choice(HoleMode, self.holes, "--holes")


@dataclass
class ReasonPartSummary(RunSummary):
    """A make-reasonpart run; the unit (target, existing, accepted) is an image."""

    split: str = ""
    mode: str = "chat"
    items_existing: int = 0
    items_written: int = 0
    dropped_items: int = 0  # (image, part) items given up after item_attempts rejected questions
    dropped_images: int = 0  # images left with no item: replaced by the next image
    skipped: Counter[str] = field(default_factory=Counter)  # images passed over, by reason
    stale_lines_removed: int = 0
    orphans_removed: int = 0  # items begun by a killed run and never listed: their files removed
    relinked: int = 0  # written items whose image link dangled, pointed at the image's new place
    dangling: int = 0  # written items whose image link dangles and whose image was not found
    annotation_warnings: Counter[str] = field(default_factory=Counter)  # --ann records left out or odd, by kind
    min_conversion_iou: float | None = None

    @property
    def items(self) -> int:
        return self.items_existing + self.items_written

    def message(self) -> str:
        if self.complete:
            return (
                f"{self.out}/{self.split} holds {self.total} images ({self.items} items), "
                f"{self.target} asked ({self.accepted} new, questions by {self.mode})"
            )
        return super().message()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["items"] = self.items
        return d


# ---- images and their parts -------------------------------------------------------------------


@dataclass(eq=False)
class PartItem:
    """One (image, part class) of the benchmark, with its mask at the image's size."""

    image: ImageTask
    class_name: str
    category_id: Any
    obj: str
    part: str
    display: str  # the object as questions name it
    names: tuple[str, ...]
    annotation_ids: list[Any]
    area_fraction: float
    mask: np.ndarray = field(repr=False)
    other_parts: list[str] = field(default_factory=list)


@dataclass(eq=False)
class ImageTask:
    sample: SegSample
    key: str  # json.dumps(image_id): ids may be ints (PASCAL-Part, PartImageNet) or strings
    stem: str
    size: tuple[int, int]
    warnings: list[str]
    items: list[PartItem] = field(default_factory=list)
    pending: int = 0
    written: int = 0


def image_key(sample: SegSample) -> str:
    return json.dumps(sample.meta["image_id"])


def choose_parts(candidates: list[PartItem], k: int, min_area: float, rng: random.Random) -> list[PartItem]:
    """Up to ``k`` non-empty parts: a seeded draw among those covering ≥ ``min_area`` of the
    image, then the largest others (see the module docstring)."""
    live = [c for c in candidates if c.area_fraction > 0]
    large = [c for c in live if c.area_fraction >= min_area]
    rng.shuffle(large)
    rest = sorted((c for c in live if c.area_fraction < min_area), key=lambda c: -c.area_fraction)
    return (large + rest)[:k]


_SLUG = re.compile(r"[^A-Za-z0-9]+")


def _slug(text: str) -> str:
    return _SLUG.sub("_", text).strip("_")


def item_name(stem: str, class_name: str) -> str:
    """``{stem}__{class}``: readable, unique per (image, class), safe on every file system."""
    return f"{_slug(stem)}__{_slug(class_name).lower()}"


def image_suffix(path: Path) -> str:
    """``.jpg`` for JPEG files (LISA's reader lists ``*.jpg`` only), else the lower-cased suffix."""
    s = path.suffix.lower()
    return ".jpg" if s in (".jpg", ".jpeg") else s


def place_image(src: Path, dest: Path, mode: ImageMode) -> None:
    """Put ``src`` at ``dest`` (replacing it atomically): a symlink to its absolute path, a hard
    link, or a copy."""
    mode = choice(ImageMode, mode, "--image-mode")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        if mode is ImageMode.symlink:
            os.symlink(os.path.abspath(src), tmp)
        elif mode is ImageMode.hardlink:
            os.link(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        hint = "; try --image-mode copy" if mode is not ImageMode.copy else ""
        raise CoresError(f"cannot {mode.value} {src} to {dest} ({exc.strerror or exc}){hint}") from None


def _is_item_json(path: Path, entry: dict[str, Any]) -> bool:
    """Whether ``path`` is the JSON make-reasonpart wrote for ``entry``'s item: it carries the
    ``cores_reasonpart`` record of that part class and image (a user's file of the same name
    does not)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    mark = doc.get(EXTRA_KEY) if isinstance(doc, dict) else None
    return isinstance(mark, dict) and mark.get("part_class") == entry.get("part_class") and mark.get("image_id") == entry.get("image_id")


def _is_placed_image(path: Path, src: str | None) -> bool:
    """Whether ``path`` is what :func:`place_image` made of ``src``: a symlink to it, a hard link
    to it, or a copy with the same bytes."""
    if not src:
        return False
    try:
        if path.is_symlink():
            return os.path.realpath(path) == os.path.realpath(src)
        return os.path.samefile(path, src) or filecmp.cmp(path, src, shallow=False)
    except OSError:
        return False


def conversion_iou(shapes: Sequence, mask: np.ndarray) -> float:
    """IoU of the target pixels LISA's rasteriser draws from ``shapes`` with ``mask``."""
    drawn = rasterize_shapes(shapes, *mask.shape) == 1
    src = mask != 0
    union = int((drawn | src).sum())
    return 1.0 if union == 0 else int((drawn & src).sum()) / union


# ---- the manifest ---------------------------------------------------------------------------


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The manifest's lines (after a torn tail was cut); a bad complete line is an error."""
    return _read_records(path, ("name", "split", "image", "source"), "not a make-reasonpart manifest record; fix or remove that line")


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's entries (after a torn tail was cut): ``{split, name, image, src, image_id,
    part_class}`` per item begun; a bad complete line is an error (the journal decides what may be
    removed, so it is never guessed at)."""
    return _read_records(path, ("split", "name", "image", "src"), "not a make-reasonpart journal entry; remove that line")


def _read_records(path: Path, keys: tuple[str, ...], problem: str) -> list[dict[str, Any]]:
    """JSON objects, one a line, each with string ``keys``; none when the file is absent."""
    if not path.is_file():
        return []
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CoresError(f"{path}: not UTF-8 text (byte {exc.start}); it is not make-reasonpart's, or it was damaged") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in keys):
            raise CoresError(f"{path}, line {lineno}: {problem}, then run again to resume")
        out.append(rec)
    return out


# ---- the build ------------------------------------------------------------------------------


def make_reasonpart(
    options: ReasonPartOptions,
    api_key: str | None = None,
    on_progress: Callable[[BuildProgress], None] | None = None,
) -> ReasonPartSummary:
    """Grow ``options.out/{split}`` to ``options.n`` images (see the module docstring).

    Returns the summary whether or not the target was reached; raises :class:`CoresError` for
    problems found before any question is asked (options, files, layout)."""
    with prepare(options, api_key) as build:
        return build.run(on_progress)


def prepare(options: ReasonPartOptions, api_key: str | None = None) -> ReasonPartBuild:
    """Check the options, read the annotation file, lock and repair the output, without asking or
    writing any question yet (so that a command can report mistakes before its progress bar).
    The build holds ``out``'s lock until it is closed: use it as a context manager."""
    _check_options(options, api_key)
    return ReasonPartBuild(options, api_key)


def _check_options(options: ReasonPartOptions, api_key: str | None) -> None:
    for name in ("parts_per_image", "batch_size", "item_attempts"):
        if getattr(options, name) < 1:
            raise CoresError(f"--{name.replace('_', '-')} must be at least 1")
    if options.n is not None and options.n < 1:
        raise CoresError("--n must be at least 1")
    if not 0 <= options.min_area < 1:
        raise CoresError("--min-area is a fraction of the image: at least 0 and below 1")
    if options.split is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", options.split):
        raise CoresError(f"--split {options.split!r} must be a plain folder name (letters, digits, '-' and '_')")
    _check_paths(options)
    if options.questions is QuestionMode.chat:
        check_chat_settings(options, api_key or "")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_paths(options: ReasonPartOptions) -> None:
    """Refuse inputs and output that overlap (module docstring, Files), on real paths: symlinks
    and ``..`` resolved, so that ``--images link-to-out/partimagenet`` is caught too."""
    out = Path(os.path.realpath(options.out))
    split_dir = Path(os.path.realpath(out / (options.split or options.source.value)))  # itself a link, possibly
    images = Path(os.path.realpath(options.images))
    if out.exists() and not out.is_dir():
        raise CoresError(f"--out {options.out} is a file; give a folder")
    if _inside(images, split_dir):
        raise CoresError(f"--images {options.images} lies inside {split_dir}, where make-reasonpart writes; choose another --out or --split")
    if _inside(out, images):
        raise CoresError(f"--out {options.out} lies inside --images {options.images}; write the benchmark outside the image folder")
    ours = {out / MANIFEST, out / JOURNAL, out / LOCK_FILE}
    for flag, given in (("--ann", options.ann), ("--table", options.table)):
        if given is None:
            continue
        real = Path(os.path.realpath(given))
        if _inside(real, split_dir) or real in ours:
            raise CoresError(f"{flag} {given} lies inside {split_dir} or is one of make-reasonpart's files in {out}; "
                             "move it or choose another --out or --split")


class ReasonPartBuild:
    """One build: the image pool, what is written, what to ask again (both question modes).
    Made by :func:`prepare`, holding ``out``'s lock until :meth:`close` (or the end of a ``with``
    block); :meth:`run` does the work and returns the summary."""

    def __init__(self, options: ReasonPartOptions, api_key: str | None = None) -> None:
        self.options = options
        self.api_key = api_key or ""
        self.split = options.split or options.source.value
        self.out = Path(options.out)
        self.dir = self.out / self.split
        self.manifest = self.out / MANIFEST
        self.journal = self.out / JOURNAL
        self.table = load_part_table(options.table)
        self.retry: deque[PartItem] = deque()
        self.unresolved: set[str] = set()  # opened images with nothing written yet
        self.attempts: Counter[tuple[str, str]] = Counter()
        self.names: set[str] = set()  # items of this split listed in the manifest
        self.owned: set[str] = set()  # their files' names
        self.annotation_warnings: Counter[str] = Counter()
        self.classes: dict[str, tuple[str, str | None]] = {}  # category name -> (object, part)
        samples = self._read_source()
        self.by_key = {image_key(s): s for s in samples}
        self.stems = self._stems(samples)
        pool = sorted(self.by_key)
        random.Random(options.seed).shuffle(pool)
        target = len(pool) if options.n is None else options.n
        if target > len(pool):
            raise CoresError(
                f"--n {options.n} but only {len(pool)} images of {options.ann} have a part annotation"
                + (" with a template" if options.questions is QuestionMode.template else "")
            )
        model = options.model if options.questions is QuestionMode.chat else "template"
        self.summary = ReasonPartSummary(
            target=target, out=str(self.out), model=model, split=self.split, mode=options.questions.value
        )
        self.summary.annotation_warnings = self.annotation_warnings
        self._held = contextlib.ExitStack()
        try:
            self._lock()
            written = self._resume()
            self._check_planned_names()
            self.done: set[str] = set(written)
            self.pool = deque(k for k in pool if k not in self.done)
            self.summary.existing = len(self.done)
            self.summary.items_existing = sum(len(v) for v in written.values())
            self._queue_missing_parts(written)
        except BaseException:
            self.close()  # a build that failed to start holds no lock
            raise

    def __enter__(self) -> ReasonPartBuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release ``out``'s lock (also done by the kernel if the process dies)."""
        self._held.close()

    def run(self, on_progress: Callable[[BuildProgress], None] | None = None) -> ReasonPartSummary:
        if self.finished():
            return self.summary
        try:
            if self.options.questions is QuestionMode.template:
                self.run_template(on_progress)
            else:
                _QuestionLoop(self.options, self.api_key, make_client(self.options, self.api_key), self, on_progress).run()
        finally:
            self._compact_journal()
        return self.summary

    # ---- reading the source
    def _read_source(self) -> list[SegSample]:
        options = self.options
        source_name = options.source.value
        what = f"{source_name} annotations (--ann)"
        data = load_json(require_file(Path(options.ann), what), what)
        check_coco_parts(data, Path(options.ann), what)
        self.annotation_warnings.update(coco_part_warnings(data))
        from_partimagenet = options.source is PartDataset.partimagenet
        name_of = partimagenet_name if from_partimagenet else pascal_part_name
        classes = {str(c["name"]): name_of(c) for c in data["categories"]}
        self.classes = classes
        _check_naming(source_name, Path(options.ann), sorted(classes))
        usable = set(filter(self._askable, classes))
        if not usable:
            raise CoresError(self._no_parts_message(classes))
        images = require_dir(Path(options.images), f"{source_name} images (--images)")
        image_path = partimagenet_image_path(images) if from_partimagenet else (lambda img, _ix: images / img["file_name"])
        source = PartSource(source_name, Path(options.ann).name, Path(options.ann), name_of, image_path)
        hint = f"check --images {images}, or pass --skip-missing to leave them out"
        samples = read_coco_parts(source, skip_missing=options.skip_missing, missing_hint=hint, data=data)
        kept = [s for s in samples if any(n in usable for n in s.meta["classes"])]
        if not kept:
            raise CoresError(f"{options.ann} holds no image with a usable part annotation")
        return kept

    def _no_parts_message(self, classes: dict[str, tuple[str, str | None]]) -> str:
        options = self.options
        names = sorted(classes)
        listed = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        if all(part is None for _obj, part in classes.values()):
            return f"{options.ann}: no category name reads as a part of an object ({listed})"
        return f"{options.ann}: none of its part classes ({listed}) is in the part-function table {self.table.path}; use --questions chat"

    @staticmethod
    def _stems(samples: list[SegSample]) -> dict[str, str]:
        """File stems, made unique with the image id where two images share one as written in
        item names (``a b.jpg`` and ``a_b.jpg`` both read ``a_b``)."""
        stems = {image_key(s): Path(str(s.meta["file_name"])).stem for s in samples}
        seen = Counter(_slug(v) for v in stems.values())
        return {k: (v if seen[_slug(v)] == 1 else f"{v}_{json.loads(k)}") for k, v in stems.items()}

    # ---- the lock and resume
    def _lock(self) -> None:
        """Hold ``out``'s lock for the whole build: a second writer would interleave manifest
        lines and take the first one's unfinished items for a killed run's and remove them."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._held.enter_context(exclusive_lock(self.out, self.out / LOCK_FILE))
        except OutputLocked as exc:
            raise CoresError(
                f"{self.out} is being written by another make-reasonpart run ({exc.holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        except OSError as exc:
            raise CoresError(f"cannot write to --out {self.out} ({exc.strerror or exc})") from None

    def _resume(self) -> dict[str, set[str]]:
        """Repair the output (see the module docstring); return the written classes per image."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CoresError(f"cannot create {self.dir} ({exc.strerror or exc})") from None
        self.summary.torn_tail_removed = repair_torn_tail(self.manifest)
        repair_torn_tail(self.journal)
        records = read_manifest(self.manifest)
        keep: list[dict] = []
        stale: list[dict] = []
        written: dict[str, set[str]] = {}
        for rec in records:
            if rec["split"] != self.split:
                keep.append(rec)
                continue
            if rec["source"] != self.options.source.value:
                raise CoresError(
                    f"{self.manifest} holds {self.split!r} items made from {rec['source']}, not {self.options.source.value}; "
                    "use another --split or --out"
                )
            # lexists: a link whose source image moved away is still this item's file
            if not (self.dir / f"{rec['name']}.json").is_file() or not os.path.lexists(self.dir / rec["image"]):
                stale.append(rec)
                continue
            keep.append(rec)
            self._relink_if_dangling(rec)
            self.names.add(rec["name"])
            self.owned.update((f"{rec['name']}.json", rec["image"]))
            written.setdefault(json.dumps(rec.get("image_id")), set()).add(str(rec.get("part_class")))
        if stale:
            self.summary.stale_lines_removed = len(stale)
            atomic_write_text(self.manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
            for rec in stale:  # listed, so ours: the file the user (or a disk) left of it goes too
                sample = self.by_key.get(json.dumps(rec.get("image_id")))
                self._remove_item_files({**rec, "src": rec.get("src") or (sample.image_path if sample else None)})
                if os.path.lexists(self.dir / rec["image"]):
                    # kept because it could not be shown unchanged; the manifest named it as this
                    # item's, so writing the item again may replace it
                    self.owned.add(rec["image"])
        self._remove_unfinished_items()
        return written

    def _relink_if_dangling(self, rec: dict[str, Any]) -> None:
        """A written item whose image link points where the source image no longer is (the
        images were moved, and --images names their new place) is pointed at the new place."""
        link = self.dir / rec["image"]
        if not link.is_symlink() or link.exists():
            return
        sample = self.by_key.get(json.dumps(rec.get("image_id")))
        if sample is None or not Path(sample.image_path).is_file():
            self.summary.dangling += 1
            return
        place_image(Path(sample.image_path), link, ImageMode.symlink)
        self.summary.relinked += 1

    def _remove_unfinished_items(self) -> None:
        """Files of items the journal says were begun and the manifest does not list (a kill
        between the writes of one item), with their temporaries; then the journal keeps only
        other splits' entries."""
        entries = read_journal(self.journal)
        others = [e for e in entries if e["split"] != self.split]
        for entry in entries:
            if entry["split"] == self.split and entry["name"] not in self.names:
                self.summary.orphans_removed += self._remove_item_files(entry)
        if len(others) != len(entries):
            self._write_journal(others)

    def _remove_item_files(self, entry: dict[str, Any]) -> bool:
        """Remove an item's JSON, image and temporaries where they still are what this item
        wrote; whether anything was removed."""
        name, removed = entry["name"], False
        json_path, image_path = self.dir / f"{name}.json", self.dir / entry["image"]
        if json_path.is_file() and _is_item_json(json_path, entry):
            json_path.unlink()
            removed = True
        if os.path.lexists(image_path) and _is_placed_image(image_path, entry.get("src")):
            image_path.unlink()
            removed = True
        temporaries = re.compile(rf"\.(?:{re.escape(name)}\.json|{re.escape(entry['image'])})\.[A-Za-z0-9_]+\.tmp")
        for p in self.dir.iterdir():
            if temporaries.fullmatch(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink()
        return removed

    def _write_journal(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            atomic_write_text(self.journal, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        elif self.journal.exists():
            self.journal.unlink()

    def _compact_journal(self) -> None:
        """After a run, the journal keeps only items still unfinished (an error mid-item)."""
        entries = read_journal(self.journal)
        left = [e for e in entries if not (e["split"] == self.split and e["name"] in self.names)]
        if len(left) != len(entries):
            self._write_journal(left)

    def _check_planned_names(self) -> None:
        """Before any question: every file an item could write must be free (or be that item's,
        listed), and no two items may share a name; a user's file is never replaced."""
        present = {p.name for p in self.dir.iterdir()}
        planned: dict[str, tuple[str, str]] = {}
        foreign: list[str] = []
        for key, sample in self.by_key.items():
            suffix = image_suffix(Path(sample.image_path))
            for class_name in filter(self._askable, sample.meta["classes"]):
                name = item_name(self.stems[key], class_name)
                other = planned.setdefault(name, (key, class_name))
                if other != (key, class_name):
                    raise CoresError(
                        f"{self.options.ann}: image {other[0]} class {other[1]!r} and image {key} class {class_name!r} "
                        f"would both be written as {self.dir / name}.json; rename one of the categories"
                    )
                foreign += [f for f in (f"{name}.json", name + suffix) if f in present and f not in self.owned]
        if foreign:
            listed = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CoresError(
                f"{self.dir} holds {len(foreign)} file(s) that make-reasonpart did not write where its items go "
                f"({listed}); move them away or choose another --out or --split"
            )

    def _queue_missing_parts(self, written: dict[str, set[str]]) -> None:
        """Images already in the output with fewer items than chosen get the missing ones."""
        for key, classes in written.items():
            if len(classes) >= self.options.parts_per_image or key not in self.by_key:
                continue
            task = self._open(self.by_key[key])
            if task is None:
                continue
            task.written = len(classes)
            task.items = [it for it in task.items if it.class_name not in classes]
            task.pending = len(task.items)
            self.retry.extend(task.items)

    # ---- opening images
    def open_next(self) -> ImageTask | None:
        """The next image of the pool that yields at least one part; None when none is left."""
        while self.pool:
            key = self.pool.popleft()
            task = self._open(self.by_key[key])
            if task is not None:
                self.unresolved.add(key)
                return task
        return None

    def _askable(self, class_name: str) -> bool:
        """Whether a class of the annotation file can become an item: a part (not a whole object)
        and, for template questions, one in the table."""
        info = self.classes.get(class_name)
        if info is None or info[1] is None:
            return False
        return self.options.questions is QuestionMode.chat or self.table.get(self.options.source.value, class_name) is not None

    def _open(self, sample: SegSample) -> ImageTask | None:
        key = image_key(sample)
        size = upright_size(Path(sample.image_path))
        if size is None:
            self.summary.skipped["unreadable image"] += 1
            return None
        warnings = list(sample.meta.get("warnings", []))
        if tuple(size) != tuple(sample.meta["image_size"]):
            ah, aw = sample.meta["image_size"]
            warnings.append(ReaderWarning("size_mismatch", f"the annotation says {aw}×{ah} but the image is {size[1]}×{size[0]}; masks resized"))
        task = ImageTask(sample, key, self.stems[key], size, warnings)
        candidates = []
        for rnd in sample.rounds:
            info = sample.meta["classes"].get(rnd.class_name)
            if info is None or not self._askable(rnd.class_name):
                continue
            entry = self.table.get(self.options.source.value, rnd.class_name)
            mask = (rnd.target.rasterize(*size) == 1).astype(np.uint8)
            candidates.append(
                PartItem(
                    task, rnd.class_name, info["category_id"], info["object"], info["part"],
                    entry.object if entry else info["object"], entry.names if entry else (),
                    list(info["annotation_ids"]), float(mask.mean()), mask,
                )
            )
        chosen = choose_parts(candidates, self.options.parts_per_image, self.options.min_area, random.Random(f"{self.options.seed}:{key}"))
        if not chosen:
            self.summary.skipped["no non-empty part"] += 1
            return None
        for it in chosen:
            it.other_parts = sorted({c.part for c in candidates if c.part != it.part})
        task.items, task.pending = chosen, len(chosen)
        return task

    # ---- outcomes of one item
    def finished(self) -> bool:
        return self.summary.complete and not self.retry

    def room(self) -> int:
        return self.summary.target - self.summary.total - len(self.unresolved)

    def write(self, item: PartItem, question: str) -> None:
        task = item.image
        options = self.options
        name = item_name(task.stem, item.class_name)
        src = Path(task.sample.image_path)
        image_name = name + image_suffix(src)
        image_id = task.sample.meta["image_id"]
        for dest in (self.dir / f"{name}.json", self.dir / image_name):
            if os.path.lexists(dest):  # checked for all items up front; this catches a file made since
                raise CoresError(
                    f"{dest} already exists and this run did not write it; "
                    "make-reasonpart never replaces such a file: move it away and run again"
                )
        begun = {"split": self.split, "name": name, "image": image_name, "src": os.path.abspath(src),
                 "image_id": image_id, "part_class": item.class_name}
        append_line(self.journal, json.dumps(begun, ensure_ascii=False))  # recorded as ours before the files exist
        place_image(src, self.dir / image_name, options.image_mode)
        shapes = mask_to_shapes(item.mask, options.holes.value)
        iou = conversion_iou(shapes, item.mask)
        source, mode = options.source.value, options.questions.value
        extra = {EXTRA_KEY: {"version": 1, "source": source, "part_class": item.class_name, "image_id": image_id, "mode": mode}}
        doc = reasonseg_document([question], True, shapes, image_name, extra)
        atomic_write_text(self.dir / f"{name}.json", dumps_reasonseg(doc))
        chat = options.questions is QuestionMode.chat
        record = {
            "name": name, "split": self.split, "image": image_name, "source": source,
            "annotation_file": Path(options.ann).name, "image_id": image_id, "file_name": task.sample.meta["file_name"],
            "category_id": item.category_id, "part_class": item.class_name, "object": item.obj, "part": item.part,
            "annotation_ids": item.annotation_ids, "area_fraction": round(item.area_fraction, 6),
            "question": question, "mode": mode, "model": options.model if chat else None,
            "prompt_version": PROMPT_VERSION if chat else None, "template_version": None if chat else self.table.version,
            "seed": options.seed, "holes": options.holes.value, "target_polygons": sum(s.label == "target" for s in shapes),
            "ignore_polygons": sum(s.label != "target" for s in shapes), "conversion_iou": round(iou, 6),
            "warnings": task.warnings, "cores_version": __version__, "src": os.path.abspath(src),
        }
        append_line(self.manifest, json.dumps(record, ensure_ascii=False))
        self.names.add(name)
        self.owned.update((f"{name}.json", image_name))
        self.summary.items_written += 1
        self.summary.min_conversion_iou = iou if self.summary.min_conversion_iou is None else min(self.summary.min_conversion_iou, iou)
        task.written += 1
        task.pending -= 1
        if task.key not in self.done:
            self.done.add(task.key)
            self.unresolved.discard(task.key)
            self.summary.accepted += 1
            for warning in task.warnings:  # per written image, as the manifest lists them
                self.annotation_warnings[f"written images with a {warning_kind(warning)} warning (see the manifest)"] += 1

    def reject(self, item: PartItem, reason: str | None) -> None:
        """A question that was not accepted (``reason`` None: already counted for the reply)."""
        if reason:
            self.summary.rejected[reason] += 1
        key = (item.image.key, item.class_name)
        self.attempts[key] += 1
        if self.attempts[key] < self.options.item_attempts:
            self.retry.append(item)
            return
        task = item.image
        task.pending -= 1
        self.summary.dropped_items += 1
        if task.pending == 0 and task.written == 0:
            self.summary.dropped_images += 1
            self.unresolved.discard(task.key)

    def exhausted_reason(self) -> str:
        parts = [f"ran out of images: {len(self.by_key)} have a part annotation"]
        if self.summary.skipped:
            parts.append(f"passed over: {format_counts(self.summary.skipped)}")
        if self.summary.dropped_images:
            parts.append(f"{self.summary.dropped_images} got no acceptable question in {self.options.item_attempts} tries")
        if self.summary.rejected:
            parts.append(f"rejections: {format_counts(self.summary.rejected)}")
        return "; ".join(parts)

    # ---- template mode
    def template_question(self, item: PartItem) -> str:
        entry = self.table.get(self.options.source.value, item.class_name)
        assert entry is not None  # template mode only opens parts that have an entry
        return random.Random(f"{self.options.seed}:{item.image.key}:{item.class_name}").choice(entry.questions)

    def run_template(self, on_progress: Callable[[BuildProgress], None] | None) -> None:
        """Every item gets a table question: no requests, deterministic by seed."""
        while not self.finished():
            if self.retry:
                items = [self.retry.popleft()]
            elif self.room() > 0 and (task := self.open_next()) is not None:
                items = task.items
            else:
                break
            for item in items:
                try:
                    self.write(item, validate_question(self.template_question(item), item.part, item.names))
                except QuestionRejected as exc:  # only a hand-edited table gets here
                    self.reject(item, exc.reason)
            if on_progress is not None:
                on_progress(BuildProgress(self.summary.total, self.summary.target, self.summary.accepted, sum(self.summary.rejected.values()), 0))
        if not self.finished():
            self.summary.stop_reason = self.exhausted_reason()


def _check_naming(source: str, ann: Path, names: list[str]) -> None:
    """PASCAL-Part names are "object:part", PartImageNet's "Supercategory Part": a file whose
    names mostly read the other way was given the wrong --source."""
    if not names:
        raise CoresError(f"{ann} has no categories")
    looks = "pascalpart" if sum(":" in n for n in names) * 2 > len(names) else "partimagenet"
    if looks != source:
        listed = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise CoresError(f"{ann}: category names like {listed} are {looks}'s, not {source}'s; is it a {looks} file (--source {looks})?")


# ---- chat mode --------------------------------------------------------------------------------


def build_question_messages(
    items: Mapping[str, PartItem], examples: Sequence[tuple[str, str, tuple[str, ...], str]]
) -> list[dict[str, str]]:
    """System rules, one worked example turn (the paper's in-context examples), then the items,
    each under its id (``{id: item}``; ids are unique in the run, see the module docstring)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    if examples:
        shots = [{"id": f"e{i + 1}", "object": o, "part": p, "other_parts": list(others)} for i, (o, p, others, _q) in enumerate(examples)]
        answers = [{"id": f"e{i + 1}", "question": q} for i, (*_rest, q) in enumerate(examples)]
        messages.append({"role": "user", "content": json.dumps({"items": shots})})
        messages.append({"role": "assistant", "content": json.dumps({"questions": answers})})
    request = [{"id": qid, "object": it.display, "part": it.part, "other_parts": it.other_parts} for qid, it in items.items()]
    messages.append({"role": "user", "content": json.dumps({"items": request}, ensure_ascii=False)})
    return messages


def parse_questions(content: str | None) -> list[tuple[str, object]]:
    """``(id, question)`` pairs, in reply order, from ``{"questions": [...]}``, a bare list, or one
    entry."""
    data = reply_json(content)
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        entries = data["questions"]
    elif isinstance(data, list):
        entries = data
    elif isinstance(data, dict) and "question" in data:
        entries = [data]
    else:
        raise ExemplarError("malformed JSON", "the reply is JSON but holds no 'questions' list")
    return [(str(e.get("id")), e.get("question")) for e in entries if isinstance(e, dict)]


class _QuestionLoop(ChatLoop):
    """Requests of ``batch_size`` items; new images are opened only while there is room."""

    def __init__(self, options: ReasonPartOptions, api_key: str, client, builder: ReasonPartBuild, on_progress) -> None:
        super().__init__(options, api_key, client, builder.summary, on_progress)
        self.options: ReasonPartOptions = options
        self.build = builder
        # Item ids: a random nonce per run and a counter, so that no two requests of this run (and
        # almost surely none of an earlier run) share an id: a reply matches only its own request.
        self.nonce = secrets.token_hex(3)
        self.counter = itertools.count(1)

    def room(self) -> int:
        return self.build.room()

    def done(self) -> bool:
        return self.build.finished()

    def next_job(self, room: int) -> ChatJob | None:
        items: list[PartItem] = []
        while self.build.retry and len(items) < self.options.batch_size:
            items.append(self.build.retry.popleft())
        opened = 0
        while len(items) < self.options.batch_size and opened < room and (task := self.build.open_next()) is not None:
            opened += 1
            items.extend(task.items)
        if len(items) > self.options.batch_size:
            self.build.retry.extendleft(reversed(items[self.options.batch_size :]))
            items = items[: self.options.batch_size]
        if not items:
            return None
        asked = {f"{self.nonce}-{next(self.counter)}": it for it in items}
        return ChatJob(build_question_messages(asked, self._examples(items)), units=0, payload=asked)

    def _examples(self, items: list[PartItem]) -> list[tuple[str, str, tuple[str, ...], str]]:
        asked = {object_key(it.part) for it in items}
        pool = [e for e in PROMPT_EXAMPLES if object_key(e[1]) not in asked]
        return self.rng.sample(pool, min(self.options.few_shot, len(pool)))

    def handle_failure(self, job: ChatJob) -> None:
        self.build.retry.extend(job.payload.values())  # not the items' fault: ask again, no attempt used

    def handle_reply(self, job: ChatJob, content: str | None) -> int:
        asked: dict[str, PartItem] = job.payload
        try:
            answers = self._match(asked, parse_questions(content))
        except ExemplarError as exc:
            self.summary.rejected[exc.reason] += 1
            for it in asked.values():
                self.build.reject(it, None)
            return 0
        accepted = 0
        for qid, it in asked.items():
            if qid not in answers:
                self.build.reject(it, "missing from the reply")
                continue
            try:
                question = validate_question(answers[qid], it.part, it.names)
            except QuestionRejected as exc:
                self.build.reject(it, exc.reason)
                continue
            self.build.write(it, question)
            accepted += 1
        return accepted

    def _match(self, asked: dict[str, PartItem], answers: list[tuple[str, object]]) -> dict[str, object]:
        """The first answer to each id this request asked for; an entry under any other id (one
        of another request's, replayed or mixed up) and a second answer to an id are rejected."""
        matched: dict[str, object] = {}
        for qid, question in answers:
            if qid not in asked:
                self.summary.rejected["not requested"] += 1
            elif qid in matched:
                self.summary.rejected["answered twice"] += 1
            else:
                matched[qid] = question
        return matched

    def exhausted_reason(self) -> str:
        return self.build.exhausted_reason()

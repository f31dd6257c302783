"""The in-context exemplar library (paper §3.2): format, loading, validation, sampling.

A library is a JSONL file, one exemplar per line::

    {"schema_version": 1, "object": "dog paw",
     "question": "What is the dog paw in this image? Please output segmentation mask.",
     "appears_on": "the end of each leg",
     "location": "at the bottom of the animal, where it touches the ground",
     "appearance": "tough and cushioned with pads and claws",
     "answer": "Sure, it appears on the end of each leg. It is tough and cushioned with pads and claws.",
     "source": "manual"}

``appears_on`` / ``location`` / ``appearance`` are the chain's levels (what it typically appears
on; where it lies in the image; its intrinsic appearance). ``answer`` is the depth-2 rendering;
:meth:`Exemplar.render` gives the answer for any depth so exemplars follow the same chain as
the model's own answer template. Exemplars are text only: no image, no special tokens.

The levels are clauses slotted into fixed sentences ("it appears on {appears_on}", "It is
located {location}", "It is {appearance}"), so validation also checks that each one reads
right in its slot, and that none of them gives the answer away by naming the object.

The shipped ``contexts/`` folder also holds the class-name vocabulary of the training sets
(``vocabulary.json``, see :func:`load_vocabulary`) and the hand-written seed examples that
``cores build-context`` shows the chat model (``seeds.jsonl``, same format as a library).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import CoresError

SCHEMA_VERSION = 1
QUESTION_FORMAT = "What is the {object} in this image? Please output segmentation mask."
MAX_FIELD_CHARS = 150  # per chain level: exemplars are short clauses, and k of them share the context
MAX_LEVEL_WORDS = 25
MIN_LEVEL_CHARS = 3
MAX_OBJECT_CHARS = 60
MAX_SOURCE_CHARS = 100
FIELDS = ("object", "question", "appears_on", "location", "appearance", "answer", "source")
LEVELS = ("appears_on", "location", "appearance")
SPECIAL_TOKENS = ("[SEG]", "[LOC]", "[POS]", "<image>")

# "It is located {location}" must read as a sentence, so a location opens with a preposition
# or an adverb of place/frequency ("at the bottom of ...", "usually near ...", "high above ...").
LOCATION_OPENERS = frozenset(
    """about above across against ahead along alongside amid among around at atop behind below beneath
    beside besides between beyond by close deep down far flush from halfway high in inside just level low mid
    midway near next off on opposite out outdoors indoors outside over overhead past right round
    through throughout to toward towards under underfoot underneath up upon within usually often
    mostly typically generally commonly mainly always sometimes normally either both all directly
    centred centered anywhere everywhere wherever where""".split()
)

# Plurals that the regular rules below miss, both ways, for the "names the object" check.
_IRREGULAR_PLURALS = {
    "foot": "feet", "tooth": "teeth", "leaf": "leaves", "knife": "knives", "shelf": "shelves",
    "person": "people", "mouse": "mice", "hoof": "hooves", "scarf": "scarves", "calf": "calves",
    "half": "halves", "loaf": "loaves", "wolf": "wolves", "life": "lives", "man": "men",
    "woman": "women", "child": "children", "goose": "geese",
}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items()}
_WORD = re.compile(r"[a-z0-9]+")
_ARTICLES = ("the", "a", "an")


class ExemplarError(ValueError):
    """An exemplar that fails validation; ``reason`` is a short category for summaries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Exemplar:
    object: str
    question: str
    appears_on: str
    location: str
    appearance: str
    answer: str
    source: str
    schema_version: int = SCHEMA_VERSION

    def render(self, depth: int) -> str:
        """The exemplar's answer for a chain of ``depth`` levels, in the answer template's words."""
        return render_answer(depth, self.appears_on, self.location, self.appearance)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def render_answer(depth: int, appears_on: str, location: str, appearance: str) -> str:
    if depth == 1:
        return f"Sure, it is {appearance}."
    if depth == 2:
        return f"Sure, it appears on {appears_on}. It is {appearance}."
    if depth == 3:
        return f"Sure, it appears on {appears_on}. It is located {location}. It is {appearance}."
    raise ValueError(f"depth must be 1, 2 or 3, got {depth}")


def make_exemplar(obj: str, appears_on: str, location: str, appearance: str, source: str) -> Exemplar:
    """Build an exemplar whose question and answer follow the canonical forms.

    Levels are normalised into clauses (whitespace collapsed, no final period, a capitalised
    first word lowered) because chat models write them as sentences; the result is not
    validated here, call :func:`validate_exemplar` on ``asdict(...)`` for that.
    """
    obj = " ".join(obj.split())
    ex = Exemplar(
        object=obj,
        question=QUESTION_FORMAT.format(object=obj),
        appears_on=_clause(appears_on),
        location=_clause(location),
        appearance=_clause(appearance),
        answer="",
        source=source,
    )
    return Exemplar(**{**asdict(ex), "answer": ex.render(2)})


def _clause(text: str) -> str:
    text = " ".join(text.split()).rstrip(".").rstrip()
    # "The end of each leg" -> "the end of each leg", but keep acronyms such as "TV screens".
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and not first[1:2].isupper():
        text = text[0].lower() + text[1:]
    return text


def validate_exemplar(data: object) -> Exemplar:
    """Check one decoded JSON line; raise :class:`ExemplarError` (a ValueError) naming the first problem."""
    if not isinstance(data, dict):
        raise ExemplarError("not an object", "expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ExemplarError("schema version", f"schema_version is {version!r}, this cores reads {SCHEMA_VERSION}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise ExemplarError("missing field", f"missing field {missing[0]!r}")
    extra = sorted(set(data) - set(FIELDS) - {"schema_version"})
    if extra:
        raise ExemplarError("unknown field", f"unknown field {extra[0]!r}")
    for f in FIELDS:
        value = data[f]
        if not isinstance(value, str) or not value.strip():
            raise ExemplarError("empty field", f"field {f!r} must be a non-empty string")
        if "\n" in value or "\r" in value or "\t" in value:
            raise ExemplarError("bad text", f"field {f!r} holds a line break or tab")
        if any(tok in value for tok in SPECIAL_TOKENS):
            raise ExemplarError("special token", f"field {f!r} holds a special token; exemplars are plain text")
    _check_lengths(data)
    obj = data["object"]
    if not _WORD.search(obj.lower()):
        raise ExemplarError("bad object", f"object {obj!r} has no letters")
    for f in LEVELS:
        if names_object(data[f], obj):
            raise ExemplarError("names the object", f"field {f!r} names the object {obj!r} itself")
    _check_grammar(data)
    ex = Exemplar(**{f: data[f] for f in FIELDS}, schema_version=SCHEMA_VERSION)
    if ex.question != QUESTION_FORMAT.format(object=ex.object):
        raise ExemplarError(
            "bad question", "question is not in the form 'What is the X in this image? Please output segmentation mask.'"
        )
    if ex.answer != ex.render(2):
        raise ExemplarError("bad answer", "answer is not the depth-2 rendering of its levels")
    return ex


def _check_lengths(data: dict) -> None:
    if len(data["object"]) > MAX_OBJECT_CHARS:
        raise ExemplarError("too long", f"object is longer than {MAX_OBJECT_CHARS} characters")
    if len(data["source"]) > MAX_SOURCE_CHARS:
        raise ExemplarError("too long", f"source is longer than {MAX_SOURCE_CHARS} characters")
    for f in LEVELS:
        value = data[f]
        if len(value) > MAX_FIELD_CHARS or len(value.split()) > MAX_LEVEL_WORDS:
            raise ExemplarError(
                "too long", f"field {f!r} is longer than {MAX_FIELD_CHARS} characters or {MAX_LEVEL_WORDS} words"
            )
        if len(value.strip()) < MIN_LEVEL_CHARS:
            raise ExemplarError("too short", f"field {f!r} is shorter than {MIN_LEVEL_CHARS} characters")


def _check_grammar(data: dict) -> None:
    """Each level must read right in its slot of the answer sentence (see module docstring)."""
    for f in LEVELS:
        value = data[f]
        if value != value.strip() or value[-1] in ".!?;:,":
            raise ExemplarError("bad clause", f"field {f!r} must be a clause without surrounding spaces or a final stop")
    first = {f: _words(data[f])[:1] for f in LEVELS}
    if first["appears_on"] and first["appears_on"][0] in ("on", "appears", "it"):
        raise ExemplarError("bad clause", "appears_on must be what it appears on ('the end of each leg'), not a sentence")
    if not first["location"] or first["location"][0] not in LOCATION_OPENERS:
        raise ExemplarError(
            "bad clause", "location must open with a preposition, as in 'It is located at the bottom of ...'"
        )
    if first["appearance"] and first["appearance"][0] in ("it", "is", "its"):
        raise ExemplarError("bad clause", "appearance must complete 'It is ...', not repeat 'it is'")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("'s ", " ").replace("’s ", " "))


def _singular(word: str) -> str:
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "zes", "ches", "shes")) and len(word) > 4:
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def _word_forms(word: str) -> set[str]:
    """The word, its singular and its plurals: the spellings that count as naming it."""
    base = _singular(word)
    forms = {word, base, base + "s", base + "es"}
    if base.endswith("y"):
        forms.add(base[:-1] + "ies")
    if base in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[base])
    if base.endswith(("f", "fe")):
        forms.add(base.rstrip("e")[:-1] + "ves")
    return forms


def head_noun(obj: str) -> str:
    """The word that names what the object is: the last word, or the one before "of"."""
    words = _words(obj)
    if "of" in words[1:]:
        return words[words.index("of", 1) - 1]
    return words[-1] if words else ""


def names_object(text: str, obj: str) -> bool:
    """Whether ``text`` names the object: its head noun in any number ("paws" for "dog paw").

    The whole the part belongs to may be named ("the end of a dog's leg" for "dog paw"): that
    is where it appears on. Naming the part itself would give the answer away.
    """
    head = head_noun(obj)
    if not head:
        return False
    forms = _word_forms(head)
    return any(w in forms for w in _words(text))


def object_key(obj: str) -> str:
    """Normalised object name for de-duplication: "The Dog Paws" and "dog paw" are one object."""
    words = _words(obj.replace("-", " ").replace("_", " "))
    while words and words[0] in _ARTICLES:
        words = words[1:]
    if words:
        words[-1] = _singular(words[-1])
    return " ".join(words)


# ---- shipped files --------------------------------------------------------------------------


def _shipped(name: str) -> Path:
    return Path(str(resources.files("cores_cli") / "_contexts" / name))


def default_library_path() -> Path:
    """The library shipped with the package (top-level ``contexts/`` in the source tree)."""
    return _shipped("library.jsonl")


def default_seeds_path() -> Path:
    """The hand-written seed examples that ``build-context`` shows the chat model."""
    return _shipped("seeds.jsonl")


def default_vocabulary_path() -> Path:
    """The training sets' class names (``contexts/vocabulary.json``)."""
    return _shipped("vocabulary.json")


def load_library(path: str | Path | None = None) -> list[Exemplar]:
    """Load and validate a library; errors name the file and line (also for bytes that are not
    UTF-8: lines are decoded one by one so that the message can say which)."""
    p = Path(path) if path is not None else default_library_path()
    if p.is_dir():
        raise CoresError(f"context library {p} is a folder; give the library's JSONL file")
    if not p.is_file():
        raise CoresError(f"context library not found: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CoresError(f"cannot read context library {p}: {exc.strerror or exc}") from None
    out: list[Exemplar] = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CoresError(f"{p}, line {lineno}: not UTF-8 text; a library is UTF-8 JSONL") from None
        if not line.strip():
            continue
        try:
            out.append(validate_exemplar(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as exc:
            raise CoresError(f"{p}, line {lineno}: {exc}") from None
    if not out:
        raise CoresError(f"context library {p} holds no exemplars")
    return out


class ExemplarSampler:
    """Draws ``k`` distinct exemplars at random for each sample (paper: one draw per forward)."""

    def __init__(self, library: list[Exemplar], seed: int | None = None) -> None:
        if not library:
            raise CoresError("the context library is empty")
        self.library = library
        self.seed = seed
        self.rng = random.Random(seed)

    def reseed(self, seed: int | str | None = None) -> None:
        """Start the draw again: from ``seed``, or the sampler's own seed when None (the same
        exemplars for every query of a run, whatever was drawn before)."""
        self.rng = random.Random(self.seed if seed is None else seed)

    def sample_for(self, key: str, k: int) -> list[Exemplar]:
        """A draw that depends only on ``key`` and the sampler's seed (string seeding is
        deterministic across runs and processes), not on what was drawn before."""
        if k <= 0:
            return []
        return random.Random(f"{self.seed}:{key}").sample(self.library, min(k, len(self.library)))

    def sample(self, k: int) -> list[Exemplar]:
        if k <= 0:
            return []
        return self.rng.sample(self.library, min(k, len(self.library)))


# ---- vocabulary -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabularyClass:
    """One class of a training set: its name as the dataset spells it and our question phrase.

    Part classes also carry ``whole`` (the object) and ``part`` (the part's phrase).
    """

    dataset: str
    name: str
    object: str
    whole: str | None = None
    part: str | None = None


@dataclass(frozen=True)
class Vocabulary:
    """Class names per dataset. ``parts_pooled`` datasets count a part as covered by any object's
    exemplar of that part (PACO-LVIS has 456 object:part pairs over 200 part names)."""

    classes: tuple[VocabularyClass, ...]
    parts_pooled: frozenset[str] = frozenset()

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(c.dataset for c in self.classes))

    def objects(self, dataset: str | None = None) -> list[str]:
        """Distinct question phrases (first spelling of each key), in file order."""
        seen: dict[str, str] = {}
        for c in self.classes:
            if dataset is None or c.dataset == dataset:
                seen.setdefault(object_key(c.object), c.object)
        return list(seen.values())


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read ``vocabulary.json``: ``{"schema_version": 1, "datasets": {name: {"classes": [...]}}}``."""
    p = Path(path) if path is not None else default_vocabulary_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CoresError(f"vocabulary not found: {p}") from None
    except UnicodeDecodeError:
        raise CoresError(f"{p}: not UTF-8 text; a vocabulary is UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise CoresError(f"{p}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CoresError(f"cannot read vocabulary {p}: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or not isinstance(data.get("datasets"), dict):
        raise CoresError(f"{p}: expected {{'schema_version': {SCHEMA_VERSION}, 'datasets': {{...}}}}")
    classes: list[VocabularyClass] = []
    pooled: set[str] = set()
    for ds, body in data["datasets"].items():
        entries = body.get("classes") if isinstance(body, dict) else None
        if not isinstance(entries, list) or not entries:
            raise CoresError(f"{p}: dataset {ds!r} has no 'classes' list")
        if body.get("parts_pooled"):
            pooled.add(ds)
        for i, c in enumerate(entries):
            ok = isinstance(c, dict) and all(isinstance(c.get(k), str) and c[k].strip() for k in ("name", "object"))
            if not ok or len(c["object"]) > MAX_OBJECT_CHARS:
                raise CoresError(f"{p}: dataset {ds!r}, class {i}: needs 'name' and 'object' strings (object ≤ {MAX_OBJECT_CHARS} chars)")
            classes.append(VocabularyClass(ds, c["name"], c["object"], c.get("whole"), c.get("part")))
    return Vocabulary(tuple(classes), frozenset(pooled))


def uncovered_classes(library: Iterable[Exemplar], vocabulary: Vocabulary) -> list[VocabularyClass]:
    """Vocabulary classes the library does not cover.

    A class is covered when an exemplar's object is the class's phrase (compared with
    :func:`object_key`). In a ``parts_pooled`` dataset a part class is also covered when any
    covered class of that dataset has the same part name.
    """
    keys = {object_key(e.object) for e in library}
    covered_parts = {
        (c.dataset, c.part)
        for c in vocabulary.classes
        if c.dataset in vocabulary.parts_pooled and c.part and object_key(c.object) in keys
    }
    return [
        c
        for c in vocabulary.classes
        if object_key(c.object) not in keys and not (c.part and (c.dataset, c.part) in covered_parts)
    ]

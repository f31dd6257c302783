"""The in-context exemplar library (paper §3.2): format, loading, validation, sampling.

A library is a JSONL file, one exemplar per line::

    {"schema_version": 1, "object": "dog paw",
     "question": "What is the dog paw in this image? Please output segmentation mask.",
     "appears_on": "the end of each leg",
     "location": "at the bottom of the body, touching the ground",
     "appearance": "tough and cushioned with pads and claws",
     "answer": "Sure, it appears on the end of each leg. It is tough and cushioned with pads and claws.",
     "source": "manual"}

``appears_on`` / ``location`` / ``appearance`` are the chain's levels (what it typically appears
on; where it lies in the image; its intrinsic appearance). ``answer`` is the depth-2 rendering;
:meth:`Exemplar.render` gives the answer for any depth so exemplars follow the same chain as
the model's own answer template. Exemplars are text only: no image, no special tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import CoresError

SCHEMA_VERSION = 1
QUESTION_FORMAT = "What is the {object} in this image? Please output segmentation mask."
MAX_FIELD_CHARS = 200
FIELDS = ("object", "question", "appears_on", "location", "appearance", "answer", "source")


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
    """Build an exemplar whose question and answer follow the canonical forms."""
    obj = obj.strip()
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
    text = " ".join(text.split())
    return text[:-1] if text.endswith(".") else text


def validate_exemplar(data: object) -> Exemplar:
    """Check one decoded JSON line; raise ValueError naming the first problem."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema_version is {version!r}, this cores reads {SCHEMA_VERSION}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise ValueError(f"missing field {missing[0]!r}")
    extra = sorted(set(data) - set(FIELDS) - {"schema_version"})
    if extra:
        raise ValueError(f"unknown field {extra[0]!r}")
    for f in FIELDS:
        value = data[f]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field {f!r} must be a non-empty string")
        if f not in ("question", "answer") and len(value) > MAX_FIELD_CHARS:
            raise ValueError(f"field {f!r} is longer than {MAX_FIELD_CHARS} characters")
        if any(tok in value for tok in ("[SEG]", "[LOC]", "[POS]", "<image>")):
            raise ValueError(f"field {f!r} holds a special token; exemplars are plain text")
    obj = data["object"].lower()
    for f in ("appears_on", "location", "appearance"):
        if _names(data[f].lower(), obj):
            raise ValueError(f"field {f!r} names the object {data['object']!r} itself")
    ex = Exemplar(**{f: data[f] for f in FIELDS}, schema_version=SCHEMA_VERSION)
    if ex.question != QUESTION_FORMAT.format(object=ex.object):
        raise ValueError("question is not in the form 'What is the X in this image? Please output segmentation mask.'")
    if ex.answer != ex.render(2):
        raise ValueError("answer is not the depth-2 rendering of its levels")
    return ex


def _names(text: str, obj: str) -> bool:
    """Whether ``text`` contains the object's name as whole words."""
    words = text.replace(",", " ").replace(".", " ").split()
    target = obj.split()
    n = len(target)
    return any(words[i : i + n] == target for i in range(len(words) - n + 1))


def default_library_path() -> Path:
    """The library shipped with the package (top-level ``contexts/`` in the source tree)."""
    return Path(str(resources.files("cores_cli") / "_contexts" / "library.jsonl"))


def load_library(path: str | Path | None = None) -> list[Exemplar]:
    """Load and validate a library; errors name the file and line."""
    p = Path(path) if path is not None else default_library_path()
    if not p.is_file():
        raise CoresError(f"context library not found: {p}")
    out: list[Exemplar] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
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
        self.rng = random.Random(seed)

    def sample(self, k: int) -> list[Exemplar]:
        if k <= 0:
            return []
        return self.rng.sample(self.library, min(k, len(self.library)))

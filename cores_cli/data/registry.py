"""Dataset names → records: ``load_samples("reasonseg:val", data_root)``.

Names (``data_root`` is the folder holding the datasets in LISA's layout; see each reader's
module docstring for the exact files):

===============================================  ===========================================
``reasonseg:{train,val,test}[:{short,long}]``    :mod:`cores_cli.data.reasonseg`
``refcoco:{unc,google}:{train,val,testA,testB}`` :mod:`cores_cli.data.refer` (also
``refcoco+:unc:…``, ``refcocog:{umd,google}:…``, ``refclef:{unc,berkeley}:…``; the split_by
may be left out: ``refcoco:val`` = ``refcoco:unc:val``, ``refcocog:val`` = ``refcocog:umd:val``)
``ade20k|cocostuff|mapillary:{train,val}``       :mod:`cores_cli.data.semantic`
``pacolvis:{train,val,test}``,                   :mod:`cores_cli.data.parts`
``pascalpart:{train,val}``,
``partimagenet:{train,val,test}``
``synthetic:{train,val,test}[:{short,long}]``    :mod:`cores_cli.data.synthetic` (no data root)
``reasonpart:DIR``                               :mod:`cores_cli.data.reasonpart`: the ``--out``
folder of ``cores make-reasonpart`` (or one split folder inside it); everything after
``reasonpart:`` is the path, colons included; no data root
===============================================  ===========================================

Options (``**opts``) go to the reader; an option the reader does not take is an error that
lists those it does, and options whose value is None are dropped (so a CLI can pass its
unset flags through). Every value is checked before the reader runs (:data:`OPTION_RULES`:
types, ranges, allowed words; a flag must be a real boolean, a count a real integer), with a
one-line error naming the option and what it takes. Common ones: ``rounds_per_sample`` (default
3 on ``train``, all on eval splits), ``skip_missing`` (leave out samples whose image is missing
instead of failing). On the command line they are ``cores eval --opt key=value`` (``--opt
skip_missing=true``); in a training recipe, a dataset's ``options: {key: value}``.

Query text never holds the model's own tokens (:data:`QUERY_SPECIAL_TOKENS`: ``[SEG]``,
``<image>``, ``</s>``, ...): the tokenizer would read them as those tokens (a chain the answer
does not carry, an image placeholder too many), so :func:`load_samples` removes them from every
reader's queries and records a ``special_token_in_query`` warning (``synthetic`` queries come
from fixed banks without them, and its scenes stay unrendered until read).

:func:`dataset_folders` names the folders that hold a dataset's files, so that a command can
refuse to write into them.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import CHAIN_TOKENS
from ..contexts import SPECIAL_TOKENS
from ..errors import CoresError
from .parts import PART_SPLITS, load_parts
from .reasonpart import load_reasonpart
from .reasonseg import load_reasonseg
from .records import ReaderWarning, SegSample
from .refer import DEFAULT_SPLIT_BY, REFER_DATASETS, REFER_SPLITS, load_refer
from .semantic import SPLIT_FOLDERS, load_semantic
from .synthetic import MAX_TEXTS, SPLIT_IDS, load_synthetic

ALIASES = {"paco_lvis": "pacolvis", "paco": "pacolvis", "pascal_part": "pascalpart", "reason_seg": "reasonseg"}

NAME_PATTERNS: tuple[str, ...] = (
    "reasonseg:{train,val,test}[:{short,long}]",
    "refcoco:{unc,google}:{train,val,testA,testB}",
    "refcoco+:unc:{train,val,testA,testB}",
    "refcocog:{umd,google}:{train,val,test}",
    "refclef:{unc,berkeley}:{train,val,test,testA,testB,testC}",
    "ade20k:{train,val}",
    "cocostuff:{train,val}",
    "mapillary:{train,val}",
    "pacolvis:{train,val,test}",
    "pascalpart:{train,val}",
    "partimagenet:{train,val,test}",
    "synthetic:{train,val,test}[:{short,long}]",
    "reasonpart:DIR",
)

_OPTIONS: dict[str, tuple[str, ...]] = {
    "reasonseg": ("folder", "queries", "subset", "rounds_per_sample", "skip_missing"),
    "refer": ("rounds_per_sample", "shuffle_seed", "skip_missing"),
    "semantic": ("rounds_per_sample", "shuffle_seed", "skip_missing", "classes_file", "cache", "cache_dir", "workers", "progress"),
    "parts": ("rounds_per_sample", "instance_masks", "shuffle_seed", "skip_missing"),
    "synthetic": ("n", "seed", "image_size", "n_texts", "queries", "subset", "rounds_per_sample"),
    "reasonpart": ("queries", "subset", "rounds_per_sample", "skip_missing"),
}


@dataclass(frozen=True)
class OptionRule:
    """What values one reader option takes: ``accepts(value)`` and the words for the error."""

    accepts: Callable[[Any], bool]
    takes: str


def _integer(low: int | None = None, high: int | None = None) -> OptionRule:
    def accepts(v: Any) -> bool:
        # bool is an int in Python, and 2.9 must not become 2: only true integers count
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            return False
        return (low is None or v >= low) and (high is None or v <= high)

    if low is not None and high is not None:
        takes = f"an integer from {low} to {high}"
    elif low is not None:
        takes = f"an integer ≥ {low}"
    else:
        takes = "an integer"
    return OptionRule(accepts, takes)


def _one_of(*words: str) -> OptionRule:
    return OptionRule(lambda v: isinstance(v, str) and v in words, "one of " + ", ".join(words))


def _is_path(v: Any) -> bool:
    return isinstance(v, os.PathLike) or (isinstance(v, str) and bool(v.strip()))


def _is_folder_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip()) and Path(v).name == v and v not in (".", "..")


_FLAG = OptionRule(lambda v: isinstance(v, bool), "true or false")

OPTION_RULES: dict[str, OptionRule] = {
    "queries": _one_of("first", "all"),
    "subset": _one_of("short", "long"),
    "rounds_per_sample": _integer(1),
    "skip_missing": _FLAG,
    "shuffle_seed": _integer(),
    "folder": OptionRule(_is_folder_name, "the name of a folder beside ReasonSeg under {root}/reason_seg (e.g. ReasonSeg)"),
    "classes_file": OptionRule(_is_path, "the path of a file"),
    "cache": _FLAG,
    "cache_dir": OptionRule(_is_path, "the path of a folder"),
    "workers": _integer(1),
    "progress": OptionRule(callable, "a function (Python callers only)"),
    "instance_masks": _FLAG,
    "n": _integer(1),
    "seed": _integer(0),
    "image_size": _integer(32),
    "n_texts": _integer(1, MAX_TEXTS),
}
"""The values each reader option takes (every option of :data:`_OPTIONS` has a rule)."""


def check_options(spec: DatasetName, opts: dict[str, Any]) -> None:
    """A :class:`CoresError` naming the first option whose value its rule refuses."""
    for key, value in opts.items():
        rule = OPTION_RULES[key]
        if not rule.accepts(value):
            raise CoresError(f"{spec}: option {key} must be {rule.takes}; got {value!r}")


@dataclass(frozen=True)
class DatasetName:
    """A parsed dataset name."""

    family: str
    """reasonseg | refer | semantic | parts | synthetic | reasonpart (whose ``split`` is a folder)"""
    dataset: str
    split: str
    split_by: str | None = None
    subset: str | None = None

    def __str__(self) -> str:
        parts = [self.dataset] + ([self.split_by] if self.split_by else []) + [self.split] + ([self.subset] if self.subset else [])
        return ":".join(parts)

    @property
    def needs_data_root(self) -> bool:
        return self.family not in ("synthetic", "reasonpart")


def _unknown(name: str, why: str) -> CoresError:
    return CoresError(f"unknown dataset {name!r} ({why}); valid names: " + ", ".join(NAME_PATTERNS))


def parse_name(name: str) -> DatasetName:
    """``"refcoco:unc:val"`` → :class:`DatasetName`; a clear error listing valid names."""
    pieces = [p.strip() for p in str(name).strip().split(":")]
    if len(pieces) < 2 or not all(pieces):
        raise _unknown(name, "expected DATASET:SPLIT")
    ds = ALIASES.get(pieces[0].lower(), pieces[0].lower())
    if ds == "reasonpart":  # the rest is a path, which may hold colons of its own
        return DatasetName("reasonpart", ds, str(name).strip().split(":", 1)[1].strip())
    rest = pieces[1:]
    if ds in ("reasonseg", "synthetic"):
        splits = ("train", "val", "test") if ds == "reasonseg" else tuple(SPLIT_IDS)
        if len(rest) > 2 or rest[0] not in splits:
            raise _unknown(name, f"{ds} splits are {', '.join(splits)}")
        subset = rest[1] if len(rest) == 2 else None
        if subset not in (None, "short", "long"):
            raise _unknown(name, f"the optional subset is short or long, not {subset!r}")
        return DatasetName(ds, ds, rest[0], subset=subset)
    if ds in REFER_DATASETS:
        if len(rest) == 1:
            split_by, split = DEFAULT_SPLIT_BY[ds], rest[0]
        elif len(rest) == 2:
            split_by, split = rest
        else:
            raise _unknown(name, "expected DATASET:SPLIT_BY:SPLIT")
        if split_by not in REFER_DATASETS[ds]["split_bys"]:
            raise _unknown(name, f"{ds} is split by {', '.join(REFER_DATASETS[ds]['split_bys'])}")
        if split not in REFER_SPLITS:
            raise _unknown(name, f"REFER splits are {', '.join(REFER_SPLITS)}")
        return DatasetName("refer", ds, split, split_by=split_by)
    if ds in SPLIT_FOLDERS:
        if len(rest) != 1 or rest[0] not in SPLIT_FOLDERS[ds]:
            raise _unknown(name, f"{ds} splits are {', '.join(SPLIT_FOLDERS[ds])}")
        return DatasetName("semantic", ds, rest[0])
    if ds in PART_SPLITS:
        if len(rest) != 1 or rest[0] not in PART_SPLITS[ds]:
            raise _unknown(name, f"{ds} splits are {', '.join(PART_SPLITS[ds])}")
        return DatasetName("parts", ds, rest[0])
    raise _unknown(name, f"no dataset called {pieces[0]!r}")


def load_samples(name: str, data_root: Path | str | None = None, **opts: Any) -> Sequence[SegSample]:
    """Parse ``name``, check the options, and run its reader. See the module docstring. A list,
    except for ``synthetic``, whose scenes are rendered when read (a read-only sequence,
    :class:`~cores_cli.data.synthetic.SyntheticSamples`)."""
    spec = parse_name(name)
    allowed = _OPTIONS[spec.family]
    # unknown keys are checked before None values are dropped: a typo whose value parsed as
    # None (e.g. YAML's "{n:8}", a key "n:8") must not vanish silently
    bad = sorted(set(opts) - set(allowed))
    opts = {k: v for k, v in opts.items() if v is not None}
    if bad:
        raise CoresError(f"{spec}: unknown option {bad[0]!r}; {spec.dataset} takes {', '.join(allowed)}")
    if spec.subset is not None:
        if opts.get("subset", spec.subset) != spec.subset:
            raise CoresError(f"{spec}: the name says subset {spec.subset!r} but the options say {opts['subset']!r}")
        opts["subset"] = spec.subset
    check_options(spec, opts)
    if spec.needs_data_root and data_root is None:
        raise CoresError(f"{spec} needs a data root (--data-root): the folder holding its files in LISA's layout")
    root = Path(data_root) if data_root is not None else None
    readers: dict[str, Callable[..., Sequence[SegSample]]] = {
        "reasonseg": lambda: load_reasonseg(root, spec.split, **opts),
        "refer": lambda: load_refer(root, spec.dataset, spec.split, spec.split_by, **opts),
        "semantic": lambda: load_semantic(spec.dataset, root, spec.split, **opts),
        "parts": lambda: load_parts(spec.dataset, root, spec.split, **opts),
        "synthetic": lambda: load_synthetic(spec.split, **opts),
        "reasonpart": lambda: load_reasonpart(spec.split, **opts),
    }
    samples = readers[spec.family]()
    if spec.family == "synthetic":
        # its queries come from the generator's own banks, which hold none of those tokens
        # (tests/test_synthetic_lazy.py checks); cleaning would render every scene up front
        return samples
    return [without_special_tokens(s) for s in samples]


TOKENIZER_MARKERS = ("<s>", "</s>", "<unk>", "<pad>")
"""The LLaVA (Llama) tokenizer's own special tokens, which the tiny tokenizer shares; ``</s>``
ends a round of the conversation."""

QUERY_SPECIAL_TOKENS: tuple[str, ...] = tuple(dict.fromkeys((*CHAIN_TOKENS, *SPECIAL_TOKENS, *TOKENIZER_MARKERS)))
"""Text no query may hold: the chain tokens, the image placeholder and the tokenizer's markers."""


def without_special_tokens(sample: SegSample) -> SegSample:
    """``sample`` with :data:`QUERY_SPECIAL_TOKENS` removed from its queries, each removal a
    ``special_token_in_query`` warning (a query with nothing else left also gets ``blank_query``)."""
    rounds, found_warnings = [], []
    for i, rnd in enumerate(sample.rounds):
        found = [t for t in QUERY_SPECIAL_TOKENS if t in rnd.query]
        if not found:
            rounds.append(rnd)
            continue
        text = rnd.query
        for token in found:
            text = text.replace(token, " ")
        text = " ".join(text.split())
        found_warnings.append(ReaderWarning("special_token_in_query", f"query {i} {rnd.query!r} holds {' '.join(found)}: removed, the model would read it as its own token"))
        if not text:
            found_warnings.append(ReaderWarning("blank_query", f"query {i} is blank once its special tokens are removed"))
        rounds.append(replace(rnd, query=text))
    if not found_warnings:
        return sample
    meta = {**sample.meta, "warnings": [*sample.meta.get("warnings", ()), *found_warnings]}
    return replace(sample, rounds=tuple(rounds), meta=meta)


_DATASET_FOLDERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ade20k": (("ade20k",),),
    "cocostuff": (("cocostuff",), ("coco",)),
    "mapillary": (("mapillary",),),
    "pacolvis": (("vlpart", "paco"), ("coco",)),
    "pascalpart": (("vlpart", "pascal_part"),),
    "partimagenet": (("vlpart", "partimagenet"),),
}


def dataset_folders(name: str, data_root: Path | str | None = None) -> list[Path]:
    """The folders of the layout that hold ``name``'s files (images, annotations, label maps):
    nothing but the dataset belongs in them, so no output may be written there. Paths only (no
    file is read); empty for ``synthetic``. ``reasonpart:DIR`` is DIR itself: a JSON written
    there would be read as an annotation by the next evaluation."""
    spec = parse_name(name)
    if spec.family == "synthetic":
        return []
    if spec.family == "reasonpart":
        return [Path(spec.split)]
    if data_root is None:
        return []
    root = Path(data_root)
    if spec.family == "reasonseg":
        return [root / "reason_seg"]
    if spec.family == "refer":
        return [root / "refer_seg"]
    return [root.joinpath(*parts) for parts in _DATASET_FOLDERS[spec.dataset]]


def protocol(name: str, **opts: Any) -> str:
    """A one-line statement of what a name evaluates, to print beside its numbers."""
    spec = parse_name(name)
    opts = {k: v for k, v in opts.items() if v is not None}
    if spec.family in ("reasonseg", "synthetic"):
        q = opts.get("queries") or ("all" if spec.split == "train" else "first")
        which = "the first query of each image (LISA's protocol)" if q == "first" else "every query of each image"
        sub = f", {spec.subset} queries only" if spec.subset else ""
        extra = f", n={opts.get('n', 'default')}, seed={opts.get('seed', 0)}" if spec.family == "synthetic" else ""
        return f"{spec}: {which}{sub}{extra}; ignore pixels (255) excluded; gIoU with empty unions = 1"
    if spec.family == "reasonpart":
        q = opts.get("queries") or "first"
        which = "the first question of each (image, part) item (LISA's protocol)" if q == "first" else "every question of each (image, part) item"
        sub = f", {opts['subset']} queries only" if opts.get("subset") else ""
        return (
            f"{spec}: ReasonPart (paper App. C, Table S4), every item of every split folder; {which}{sub}; target = all instances "
            "of the part class; ignore pixels (255: holes inside a part) excluded; gIoU with empty unions = 1"
        )
    if spec.family == "refer":
        return f"{spec}: every sentence of every ref, one target each (LISA's ValDataset); gIoU with empty unions = 1"
    return f"{spec}: every class present per image, class-level masks; mIoU = mean over classes of ΣI/ΣU"

"""Generate an exemplar library with an OpenAI-compatible chat model (paper §3.2).

The paper induces ChatGPT to write more question/answer pairs from a few hand-written ones.
Here each request shows the model a few seed exemplars (``contexts/seeds.jsonl``) and asks for
the three chain levels of a small batch of objects drawn from the training sets' vocabulary
(``contexts/vocabulary.json``). Every returned entry is validated like any library line
(:func:`cores_cli.contexts.validate_exemplar`), duplicates are rejected, and accepted entries
are appended to the output file one whole line at a time.

Writing and resuming. The run holds an exclusive lock on the output (``.NAME.lock`` beside it,
:func:`cores_cli.fileio.exclusive_lock`) from before it reads the file until it returns, so a
second run on the same file is refused with the first one's pid instead of asking for the same
objects and appending duplicates. Each accepted line is appended whole and fsynced
(:func:`.append_only.append_line`), so the file only ever grows by whole lines, except that a
crash or power loss in the middle of that write could leave a torn last line. On start the
file is read back: a last line without its newline is such a torn write and is cut off (the
summary says so); every complete line must be a valid exemplar, otherwise the run stops with
the file and line, since that file was edited by hand and silently dropping lines would lose
work. The valid entries count towards ``n``, once per object (:func:`object_key`: "Dog Paws"
and "dog paw" are one object), and their objects are not asked for again.

Requests go through the chat plumbing shared with ``cores make-reasonpart`` (deadlines, retries
and the rules that stop a run: :mod:`.chat_requests`, :mod:`.chat_loop`); an object whose entries
keep being rejected is given up after ``object_attempts`` tries.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ..contexts import LEVELS, Exemplar, ExemplarError, Vocabulary, default_seeds_path, default_vocabulary_path, load_library, load_vocabulary, make_exemplar, object_key, validate_exemplar
from ..errors import CoresError
from ..fileio import OutputLocked, exclusive_lock
from .append_only import append_line, repair_torn_tail
from .chat_loop import BuildProgress, ChatJob, ChatLoop, RunSummary, format_counts
from .chat_requests import reply_json
from .chat_settings import ChatSettings, check_chat_settings, make_client

SYSTEM_PROMPT = """\
You write short text examples that teach an image segmentation assistant to reason from \
where an object appears to what it looks like. For every object you are given, write:
- "appears_on": the larger thing or scene it typically appears on, as a noun phrase that \
completes "It appears on ..." (for a dog paw: "the end of each leg").
- "location": where it lies in a typical photo, as a phrase that completes "It is located ..." \
and opens with a preposition (for a dog paw: "at the bottom of the animal, where it touches the ground").
- "appearance": its intrinsic look (shape, colour, material, texture), as a phrase that \
completes "It is ..." (for a dog paw: "tough and cushioned with pads and claws").
Rules: never use the object's own name or its main noun, in singular or plural, in any of the \
three fields; each field is one clause under 120 characters, starting in lower case, without a \
final period; use accurate common knowledge. Reply with JSON only, in the form \
{"exemplars": [{"object": "...", "appears_on": "...", "location": "...", "appearance": "..."}]}, \
one entry per requested object, objects spelled exactly as requested."""


@dataclass(kw_only=True)
class BuildOptions(ChatSettings):
    """What ``cores build-context`` exposes; the defaults are the command's defaults."""

    n: int
    out: Path
    batch_size: int = 5  # objects per request: fewer prompt tokens per exemplar than one by one
    object_attempts: int = 3  # an object whose entries keep being rejected is dropped after this
    few_shot: int = 4  # seed exemplars shown per request
    vocabulary: Path | None = None
    seeds: Path | None = None


@dataclass
class BuildSummary(RunSummary):
    """A build-context run; the unit is a valid, unique exemplar."""

    dropped_objects: int = 0  # objects given up after object_attempts rejected tries

    def message(self) -> str:
        if self.complete:
            return f"{self.out} holds {self.total} exemplars, {self.target} asked ({self.accepted} new)"
        return super().message()


# ---- prompt and reply -----------------------------------------------------------------------


def build_messages(objects: list[str], shots: list[Exemplar]) -> list[dict[str, str]]:
    """System rules, one worked example turn made of seed exemplars, then the request."""
    example = {"exemplars": [{"object": s.object, **{f: getattr(s, f) for f in LEVELS}} for s in shots]}
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    if shots:
        messages.append({"role": "user", "content": json.dumps({"objects": [s.object for s in shots]})})
        messages.append({"role": "assistant", "content": json.dumps(example, ensure_ascii=False)})
    messages.append({"role": "user", "content": json.dumps({"objects": objects}, ensure_ascii=False)})
    return messages


def parse_reply(content: str | None) -> list[object]:
    """The entries of a reply: ``{"exemplars": [...]}``, a bare list, or one entry object."""
    data = reply_json(content)
    if isinstance(data, dict) and isinstance(data.get("exemplars"), list):
        return data["exemplars"]
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and "object" in data:
        return [data]
    raise ExemplarError("malformed JSON", "the reply is JSON but holds no 'exemplars' list")


def entry_to_exemplar(entry: object, requested: Mapping[str, str], source: str) -> Exemplar:
    """Validate one returned entry for one of the requested objects (keys of ``requested``)."""
    if not isinstance(entry, dict):
        raise ExemplarError("not an object", "an entry is not a JSON object")
    obj = entry.get("object")
    if not isinstance(obj, str) or not obj.strip():
        raise ExemplarError("missing field", "an entry has no 'object'")
    key = object_key(obj)
    if key not in requested:
        raise ExemplarError("not requested", f"{obj!r} was not asked for")
    for f in LEVELS:
        if not isinstance(entry.get(f), str) or not entry[f].strip():
            raise ExemplarError("missing field", f"entry for {obj!r} has no {f!r}")
    ex = make_exemplar(requested[key], entry["appears_on"], entry["location"], entry["appearance"], source)
    return validate_exemplar(asdict(ex))


# ---- the run --------------------------------------------------------------------------------


def candidate_objects(vocabulary: Vocabulary, exclude: set[str], seed: int) -> list[str]:
    """Objects to ask for: each dataset's phrases shuffled, then dealt round-robin across
    datasets so that any prefix of the list covers all of them about evenly."""
    rng = random.Random(seed)
    per_dataset = []
    for ds in vocabulary.datasets:
        phrases = vocabulary.objects(ds)
        rng.shuffle(phrases)
        per_dataset.append(deque(phrases))
    out: list[str] = []
    seen = set(exclude)
    while any(per_dataset):
        for d in per_dataset:
            if d:
                phrase = d.popleft()
                if object_key(phrase) not in seen:
                    seen.add(object_key(phrase))
                    out.append(phrase)
    return out


def build_context(
    options: BuildOptions,
    api_key: str,
    on_progress: Callable[[BuildProgress], None] | None = None,
) -> BuildSummary:
    """Grow ``options.out`` to ``options.n`` valid, unique exemplars; see the module docstring.

    Returns the summary whether or not the target was reached; raises :class:`CoresError` for
    problems found before any request (bad files, an unreachable ``n``).
    """
    check_chat_settings(options, api_key)
    for name in ("batch_size", "object_attempts"):
        if getattr(options, name) < 1:
            raise CoresError(f"--{name.replace('_', '-')} must be at least 1")
    if options.n < 1:
        raise CoresError("--n must be at least 1")
    out = Path(options.out)
    summary = BuildSummary(target=options.n, out=str(out), model=options.model)
    vocabulary_path = options.vocabulary or default_vocabulary_path()
    seeds_path = options.seeds or default_seeds_path()
    check_output_file(out, {"--seeds": seeds_path, "--vocabulary": vocabulary_path})
    vocabulary = load_vocabulary(vocabulary_path)
    seeds = load_library(seeds_path)
    with lock_output(out, "build-context"):
        summary.torn_tail_removed, existing = resume_output(out)
        keys = {object_key(e.object) for e in existing}
        summary.existing = len(keys)
        need = options.n - summary.existing
        if need <= 0:
            return summary
        pool = deque(candidate_objects(vocabulary, keys, options.seed))
        if len(pool) < need:
            raise CoresError(
                f"--n {options.n} needs {need} more exemplars but only {len(pool)} vocabulary objects are not in "
                f"{out} yet (one exemplar per object); lower --n or give a larger --vocabulary"
            )
        loop = _LibraryLoop(options, api_key, make_client(options, api_key), summary, on_progress, seeds, keys, pool)
        loop.run()
    return summary


def check_output_file(out: Path, inputs: Mapping[str, Path]) -> None:
    """Refuse an ``--out`` that is a folder, sits under a file, or is one of the ``inputs``."""
    if out.is_dir():
        raise CoresError(f"--out {out} is a folder; give the library file inside it, e.g. {out / 'library.jsonl'}")
    if out.exists() and not out.is_file():
        # a FIFO would block the first open for ever; a device is nobody's library
        raise CoresError(f"--out {out} is not a regular file; give a library file")
    for option, path in inputs.items():
        if out.exists() and Path(path).exists() and os.path.samefile(out, path):  # links, hard ones too
            raise CoresError(f"--out {out} is the {option} file; write the library to a file of its own")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CoresError(f"cannot create the folder of --out {out}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def lock_output(out: Path, command: str) -> Iterator[None]:
    """Hold the output's lock for the whole run; a second writer is refused, naming the first."""
    try:
        with exclusive_lock(out):
            yield
    except OutputLocked as exc:
        raise CoresError(
            f"{out} is being written by {exc.holder} (another {command} run?); "
            "wait for it to finish, or give another --out"
        ) from None


def read_existing(path: Path) -> list[Exemplar]:
    """The entries of an existing output file (all of its complete lines must be valid)."""
    if not path.is_file() or not path.read_bytes().strip():
        return []
    try:
        return load_library(path)
    except CoresError as exc:
        raise CoresError(f"{exc}; fix or remove that line, then run again to resume") from None


def resume_output(out: Path) -> tuple[bool, list[Exemplar]]:
    """Cut a torn last line of ``out`` and read the entries it already holds."""
    try:
        torn = repair_torn_tail(out)
        return torn, read_existing(out)
    except OSError as exc:
        raise CoresError(f"cannot read or repair {out} to resume: {exc.strerror or exc}") from None


class _LibraryLoop(ChatLoop):
    """build-context's requests: batches of vocabulary objects, each asked up to
    ``object_attempts`` times."""

    def __init__(
        self,
        options: BuildOptions,
        api_key: str,
        client,
        summary: BuildSummary,
        on_progress: Callable[[BuildProgress], None] | None,
        seeds: list[Exemplar],
        keys: set[str],
        pool: deque[str],
    ) -> None:
        super().__init__(options, api_key, client, summary, on_progress)
        self.options: BuildOptions = options
        self.summary: BuildSummary = summary
        self.seeds: list[Exemplar] = seeds
        self.keys: set[str] = keys
        self.pool: deque[str] = pool
        self.tries: Counter[str] = Counter()

    def next_job(self, room: int) -> ChatJob | None:
        if not self.pool or room <= 0:
            return None
        count = min(self.options.batch_size, room, len(self.pool))
        objects = [self.pool.popleft() for _ in range(count)]
        shots = self.rng.sample(self.seeds, min(self.options.few_shot, len(self.seeds)))
        return ChatJob(build_messages(objects, shots), units=count, payload=objects)

    def handle_failure(self, job: ChatJob) -> None:
        self.pool.extend(job.payload)

    def handle_reply(self, job: ChatJob, content: str | None) -> int:
        requested = {object_key(o): o for o in job.payload}
        accepted: set[str] = set()
        try:
            entries = parse_reply(content)
        except ExemplarError as exc:
            self.summary.rejected[exc.reason] += 1
            entries = []
        for entry in entries:
            self._take(entry, requested, accepted)
        for key, phrase in requested.items():
            if key not in accepted and key not in self.keys:
                self.tries[key] += 1
                if self.tries[key] < self.options.object_attempts:
                    self.pool.append(phrase)
                else:
                    self.summary.dropped_objects += 1
        return len(accepted)

    def _take(self, entry: object, requested: dict[str, str], accepted: set[str]) -> None:
        obj = entry.get("object") if isinstance(entry, dict) else None
        if isinstance(obj, str) and object_key(obj) in self.keys:
            self.summary.rejected["duplicate"] += 1
            return
        try:
            ex = entry_to_exemplar(entry, requested, self.options.model)
        except ExemplarError as exc:
            self.summary.rejected[exc.reason] += 1
            return
        key = object_key(ex.object)
        append_line(Path(self.options.out), ex.to_json())
        self.keys.add(key)
        accepted.add(key)
        self.summary.accepted += 1

    def exhausted_reason(self) -> str:
        parts = [f"ran out of objects to ask for: {self.summary.dropped_objects} were rejected {self.options.object_attempts} times"]
        if self.summary.rejected:
            parts.append(f"rejections: {format_counts(self.summary.rejected)}")
        return "; ".join(parts)

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
objects and appending duplicates. Each accepted line is written with a single ``os.write`` on an
``O_APPEND`` descriptor and fsynced, so the file only ever grows by whole lines, except that a
crash or power loss in the middle of that write could leave a torn last line. On start the
file is read back: a last line without its newline is such a torn write and is cut off (the
summary says so); every complete line must be a valid exemplar, otherwise the run stops with
the file and line, since that file was edited by hand and silently dropping lines would lose
work. The valid entries count towards ``n``, once per object (:func:`object_key`: "Dog Paws"
and "dog paw" are one object), and their objects are not asked for again.

Failures. The client's own retries are off (``max_retries=0``) so that this module decides.
``timeout`` is a deadline for the whole of one attempt, from connecting to the last byte of the
reply: the HTTP call runs on a thread of its own (:func:`call_with_deadline`) and is abandoned
when the deadline passes, since the client's own timeout only bounds each read and a server
that trickles bytes would never trip it. An abandoned attempt keeps nothing but a private slot
that nobody reads any more, so a reply that arrives late can never be written. HTTP 429, 5xx,
timeouts and connection errors are retried with exponential back-off (honouring
``Retry-After``); other HTTP errors (401, 403, 404, 400) would fail the same way for every
request, so they stop the run at once. :data:`REFUSED_ATTEMPTS` refused connections in a row
stop the run, naming the URL: nothing listens there, and waiting will not change that. The run
also stops after ``max_consecutive_failures`` attempts
in a row, across all requests, got no usable answer (timeouts, connection errors, 5xx; a 429
neither counts nor breaks the streak), after ``max_failed_requests`` requests failed for good,
or after ``max_barren_replies`` replies in a row without one acceptable entry (a model that
cannot follow the format), rather than walking the whole vocabulary in vain. Requests still in
flight when the run stops are abandoned, not waited for.

The API key is passed in by the caller and only ever handed to the ``openai`` client. Messages
carry no server text except a refusal's error message, and that goes through :func:`redact`
first, because servers echo keys in their error messages ("Incorrect API key provided: ...").

Shared with ``cores make-reasonpart`` (:mod:`cores_cli.reasonpart_build`): the chat settings
(:class:`ChatSettings`), the key, the client, retries (:func:`call_with_retries`), the
append-only output with torn-tail repair, JSON replies (:func:`reply_json`), the run summary
(:class:`RunSummary`) and the concurrent request loop (:class:`ChatLoop`), whose deadline and
stop rules (a refusal, a refused connection, ``max_consecutive_failures``,
``max_failed_requests``, ``max_barren_replies``) are the same for both commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .contexts import (
    Exemplar,
    ExemplarError,
    LEVELS,
    Vocabulary,
    default_seeds_path,
    default_vocabulary_path,
    load_library,
    load_vocabulary,
    make_exemplar,
    object_key,
    validate_exemplar,
)
from .errors import CoresError
from .fileio import OutputLocked, exclusive_lock

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
NO_KEY_PLACEHOLDER = "no-key-needed"  # sent to local servers when OPENAI_API_KEY is unset
REFUSED_ATTEMPTS = 2  # refused connections in a row (across requests) that stop the run

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


class RetrySettings(Protocol):
    """What :func:`call_with_retries` and :func:`backoff_delay` read from their options."""

    retries: int
    backoff: float
    max_backoff: float


@dataclass(kw_only=True)
class ChatSettings:
    """How to talk to the chat model; shared by every command that asks one for text."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    temperature: float = 0.7
    concurrency: int = 4
    timeout: float = 60.0  # deadline in seconds for one attempt, from connecting to the last byte
    retries: int = 5  # retries of one request on 429, 5xx, timeouts, connection errors
    backoff: float = 1.0  # first back-off delay in seconds, doubled on each retry
    max_backoff: float = 60.0
    max_failed_requests: int = 10
    max_consecutive_failures: int = 8  # attempts in a row, across requests, without a usable answer
    max_barren_replies: int = 20  # stop after this many replies in a row with nothing accepted
    json_mode: bool = True  # ask for response_format=json_object (some local servers lack it)
    seed: int = 0


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
class BuildProgress:
    """Reported after every finished request (for a progress bar)."""

    done: int  # valid unique entries in the file
    target: int
    accepted: int
    rejected: int
    failed: int


@dataclass
class RunSummary:
    """What a chat-driven run did, for the summary table, ``--json`` and the exit status.

    ``existing``/``accepted``/``target`` count the command's unit (exemplars, images)."""

    target: int
    out: str
    model: str
    existing: int = 0  # units already in the output at start
    accepted: int = 0  # units added by this run
    requests: int = 0  # HTTP requests sent, retries included
    rejected: Counter[str] = field(default_factory=Counter)  # entries (or whole replies) by reason
    failed: Counter[str] = field(default_factory=Counter)  # requests that failed for good, by last error
    retried: Counter[str] = field(default_factory=Counter)  # attempts retried after a transient error, by error
    torn_tail_removed: bool = False
    stop_reason: str | None = None

    @property
    def total(self) -> int:
        return self.existing + self.accepted

    @property
    def complete(self) -> bool:
        return self.total >= self.target

    def message(self) -> str:
        """One line: what was reached and, if short of the target, why."""
        if self.complete:
            return f"{self.out} holds {self.total}, {self.target} asked ({self.accepted} new)"
        return f"stopped at {self.total}/{self.target}: {self.stop_reason or 'unknown reason'}"

    def to_dict(self) -> dict:
        # not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and counts the pairs
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in d.items():
            if isinstance(v, Counter):
                d[k] = dict(sorted(v.items()))
        d.update(total=self.total, complete=self.complete, message=self.message())
        return d


@dataclass
class BuildSummary(RunSummary):
    """A build-context run; the unit is a valid, unique exemplar."""

    dropped_objects: int = 0  # objects given up after object_attempts rejected tries

    def message(self) -> str:
        if self.complete:
            return f"{self.out} holds {self.total} exemplars, {self.target} asked ({self.accepted} new)"
        return super().message()


class RequestFailed(Exception):
    """A request that failed for good; ``fatal`` when retrying or asking again cannot help."""

    def __init__(self, reason: str, fatal: bool = False, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal
        self.detail = detail


# ---- key and redaction ----------------------------------------------------------------------


def is_local_url(url: str | None) -> bool:
    return bool(url) and (urlsplit(url).hostname or "") in LOCAL_HOSTS


def resolve_api_key(base_url: str | None, environ: Mapping[str, str] = os.environ, command: str = "build-context") -> str:
    """The key from ``OPENAI_API_KEY`` only (never an option: options end up in shell history
    and process lists). Local servers (vLLM, llama.cpp, Ollama on localhost) rarely check keys,
    so there a missing key is replaced by a placeholder instead of being an error."""
    key = environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    effective = base_url or environ.get("OPENAI_BASE_URL")
    if is_local_url(effective):
        return NO_KEY_PLACEHOLDER
    raise CoresError(
        f"OPENAI_API_KEY is not set: export it before running {command} "
        "(the key is read from the environment only and never written anywhere)"
    )


_SK_TOKEN = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")


def redact(text: str, secret: str | None) -> str:
    """Remove the key, and anything shaped like an OpenAI key, from a message."""
    if secret and secret != NO_KEY_PLACEHOLDER:
        text = text.replace(secret, "***")
    return _SK_TOKEN.sub("***", text)


def safe_url(url: str | None) -> str:
    """A base URL without user info, query or fragment, fit for messages."""
    if not url:
        return "the OpenAI API"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# ---- resume and append ----------------------------------------------------------------------


def repair_torn_tail(path: Path) -> bool:
    """Cut a last line that lacks its newline (a torn write); return whether one was cut."""
    if not path.is_file():
        return False
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return False
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def read_existing(path: Path) -> list[Exemplar]:
    """The entries of an existing output file (all of its complete lines must be valid)."""
    if not path.is_file() or not path.read_bytes().strip():
        return []
    try:
        return load_library(path)
    except CoresError as exc:
        raise CoresError(f"{exc}; fix or remove that line, then run again to resume") from None


def append_line(path: Path, line: str) -> None:
    """Append one whole line with a single write, then fsync (see module docstring)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CoresError(f"could not open {path} to append: {exc.strerror or exc}") from None
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write on a regular file means the disk is full
            raise CoresError(f"could not write to {path} (disk full?)")
        os.fsync(fd)
    except OSError as exc:
        raise CoresError(f"could not write to {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


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


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def reply_json(content: str | None) -> Any:
    """The JSON document of a reply, also when the model wrapped it in a Markdown fence.

    Raises :class:`ExemplarError` with reason ``empty reply`` or ``malformed JSON``."""
    if not content or not content.strip():
        raise ExemplarError("empty reply", "the reply is empty")
    m = _FENCE.match(content)
    text = m.group(1) if m else content
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExemplarError("malformed JSON", f"the reply is not JSON ({exc.msg})") from None


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


# ---- requests -------------------------------------------------------------------------------


def backoff_delay(attempt: int, options: RetrySettings, retry_after: float | None, rng: random.Random) -> float:
    """Exponential back-off with jitter, or the server's Retry-After, capped by max_backoff."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, options.max_backoff)
    base = min(options.backoff * (2**attempt), options.max_backoff)
    return base * (0.5 + 0.5 * rng.random())


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class DeadlinePassed(Exception):
    """An attempt that did not finish within its deadline; it was abandoned."""


def call_with_deadline(client, request: dict, deadline: float):
    """``client.chat.completions.create(**request)``, given up after ``deadline`` seconds in all.

    The client's own timeout applies to each read, so a server that sends a byte now and then
    keeps one attempt alive for ever. Here the call runs on a daemon thread and the caller stops
    waiting at the deadline. The thread's outcome goes into a slot only this call reads, so an
    abandoned attempt that completes later has nowhere to deliver its reply: it is dropped.
    Raises :class:`DeadlinePassed`, or whatever the call raised.
    """
    slot: dict[str, Any] = {}
    finished = threading.Event()

    def attempt() -> None:
        try:
            slot["response"] = client.chat.completions.create(**request)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as is
            slot["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=attempt, name="chat-attempt", daemon=True).start()
    if not finished.wait(deadline):
        raise DeadlinePassed(f"no complete reply within {deadline:g} s")
    if "error" in slot:
        raise slot["error"]
    return slot["response"]


def _is_refused(exc: BaseException) -> bool:
    """Whether a connection error was a refused connection (nothing listens at the address)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def call_with_retries(
    client,
    request: dict,
    options: RetrySettings,
    on_attempt: Callable[[str | None, bool], None],
    rng: random.Random,
    sleep: Callable[[float], Any] = time.sleep,
    should_stop: Callable[[], bool] = lambda: False,
) -> str | None:
    """One chat completion, retried on transient errors; returns the reply's content.

    Every attempt has ``options.timeout`` seconds in all (:func:`call_with_deadline`).
    ``on_attempt(reason, will_retry)`` is called after every attempt with the transient error's
    reason (None on an answer) and whether another attempt follows, so the caller can count
    requests and retries and decide to stop; ``should_stop()`` is asked before and after each
    back-off (the run may have ended meanwhile).
    """
    import openai

    for attempt in range(options.retries + 1):
        retry_after: float | None = None
        try:
            response = call_with_deadline(client, request, options.timeout)
        except (DeadlinePassed, openai.APITimeoutError):
            reason = "timeout"
        except openai.APIConnectionError as exc:
            reason = "connection refused" if _is_refused(exc) else "connection error"
        except openai.APIStatusError as exc:
            code = exc.status_code
            if code != 429 and code < 500:
                on_attempt(None, False)
                raise RequestFailed(f"HTTP {code}", fatal=True, detail=_error_detail(exc)) from None
            reason, retry_after = f"HTTP {code}", _retry_after(exc)
        else:
            on_attempt(None, False)
            choices = getattr(response, "choices", None) or []
            return choices[0].message.content if choices else None
        last = attempt == options.retries or should_stop()
        on_attempt(reason, not last)
        if last:
            raise RequestFailed(reason)
        sleep(backoff_delay(attempt, options, retry_after, rng))
        if should_stop():
            raise RequestFailed(reason)
    raise AssertionError("unreachable")


def _error_detail(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = getattr(exc, "message", "") or ""
    return " ".join(str(message).split())[:200]


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


@dataclass
class ChatJob:
    """One request for :class:`ChatLoop`: its messages, how many units of the target it may add
    (so that no more is asked for than ``target`` needs) and what the caller wants back."""

    messages: list[dict[str, str]]
    units: int = 1
    payload: Any = None


@dataclass
class _Result:
    job: ChatJob
    content: str | None = None
    error: RequestFailed | None = None


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
        runner = _Runner(options, api_key, make_client(options, api_key), summary, on_progress, seeds, keys, pool)
        runner.run()
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


def resume_output(out: Path) -> tuple[bool, list[Exemplar]]:
    """Cut a torn last line of ``out`` and read the entries it already holds."""
    try:
        torn = repair_torn_tail(out)
        return torn, read_existing(out)
    except OSError as exc:
        raise CoresError(f"cannot read or repair {out} to resume: {exc.strerror or exc}") from None


def check_chat_settings(settings: ChatSettings, api_key: str) -> None:
    """Refuse settings that cannot work, before any request."""
    options = {"concurrency": "--concurrency", "max_failed_requests": "--max-failures",
               "max_consecutive_failures": "--max-consecutive-failures", "max_barren_replies": "--max-barren-replies"}
    for name, option in options.items():
        if getattr(settings, name) < 1:
            raise CoresError(f"{option} must be at least 1")
    if settings.retries < 0 or settings.timeout <= 0 or settings.backoff < 0:
        raise CoresError("--retries and --backoff must be ≥ 0 and --timeout > 0")
    if api_key and api_key != NO_KEY_PLACEHOLDER and api_key in settings.model:
        raise CoresError("--model holds the API key; pass the model name only")


def make_client(settings: ChatSettings, api_key: str):
    """An ``openai`` client with its own retries off: :func:`call_with_retries` decides."""
    import openai

    return openai.OpenAI(api_key=api_key, base_url=settings.base_url, timeout=settings.timeout, max_retries=0)


class ChatLoop:
    """The request loop: daemon worker threads do HTTP, the calling thread validates and writes.

    Subclasses say what to ask (:meth:`next_job`), what to do with a reply (:meth:`handle_reply`,
    returning how many entries it accepted) and with a request that failed for good
    (:meth:`handle_failure`); the loop keeps ``settings.concurrency`` requests in flight, counts
    requests, retries and failures into the summary, and stops on a refusal (HTTP 4xx other than
    429), on a refused connection, after ``max_consecutive_failures`` attempts in a row without a
    usable answer, after ``max_failed_requests`` failures, or after ``max_barren_replies`` replies
    in a row that gave nothing (a model that cannot follow the format would otherwise walk the
    whole pool). When it stops, requests still in flight are abandoned: their replies are never
    read, so nothing more is written, and the workers send nothing more.

    Daemon threads (rather than a ThreadPoolExecutor, whose threads are joined at exit) let
    Ctrl-C end the process at once; outputs are whole-lines-only at every instant anyway.
    """

    def __init__(self, settings: ChatSettings, api_key: str, client, summary: RunSummary, on_progress=None) -> None:
        self.o = settings
        self.key = api_key
        self.client = client
        self.s = summary
        self.on_progress: Callable[[BuildProgress], None] | None = on_progress
        self.rng = random.Random(settings.seed)
        self.jobs: queue.Queue[ChatJob | None] = queue.Queue()
        self.results: queue.Queue[_Result] = queue.Queue()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.in_flight_units = 0
        self.failed_requests = 0
        self.barren_replies = 0  # consecutive replies without an accepted entry
        self.stop_reason: str | None = None
        # set by a worker (a streak of failed attempts) or by the loop when it ends: workers
        # then send nothing more and cut their back-off short
        self.halt = threading.Event()
        self.halt_reason: str | None = None
        self.streak: Counter[str] = Counter()  # attempts in a row without a usable answer, by reason
        self.refused_in_a_row = 0
        self.closed = False  # the run has returned: late attempt outcomes no longer count

    # ---- what subclasses provide
    def next_job(self, room: int) -> ChatJob | None:
        """The next request, asking for at most ``room`` units; None when there is nothing to ask."""
        raise NotImplementedError

    def handle_reply(self, job: ChatJob, content: str | None) -> int:
        """Validate and write a reply; return how many entries were accepted."""
        raise NotImplementedError

    def handle_failure(self, job: ChatJob) -> None:
        """A request failed for good (not its items' fault): put its items back to ask again."""

    def exhausted_reason(self) -> str:
        return "nothing left to ask for"

    def room(self) -> int:
        """Units that may still be asked for without overshooting the target."""
        return self.s.target - self.s.total - self.in_flight_units

    def done(self) -> bool:
        return self.s.complete

    # ---- the loop
    def run(self) -> None:
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.o.concurrency)]
        for w in workers:
            w.start()
        try:
            self._submit()
            while self.in_flight and not self.stop_reason:
                result = self.results.get()
                self.in_flight -= 1
                self.in_flight_units -= result.job.units
                self._handle(result)
                self._report()
                if not (self.done() or self.stop_reason):
                    self._submit()
        finally:
            with self.lock:
                self.closed = True
            self.halt.set()
            for _ in workers:
                self.jobs.put(None)
        if not self.done():
            self.s.stop_reason = self.stop_reason or self.exhausted_reason()

    def _submit(self) -> None:
        while self.in_flight < self.o.concurrency and not self.stop_reason:
            job = self.next_job(self.room())
            if job is None:
                return
            self.jobs.put(job)
            self.in_flight += 1
            self.in_flight_units += job.units

    def _work(self) -> None:
        rng = random.Random()
        while (job := self.jobs.get()) is not None:
            if self.halt.is_set():
                continue  # the run is ending: send nothing more
            request = dict(model=self.o.model, messages=job.messages, temperature=self.o.temperature)
            if self.o.json_mode:
                request["response_format"] = {"type": "json_object"}
            try:
                content = call_with_retries(
                    self.client, request, self.o, self._count_attempt, rng, sleep=self.halt.wait, should_stop=self.halt.is_set
                )
                self.results.put(_Result(job, content=content))
            except RequestFailed as exc:
                self.results.put(_Result(job, error=exc))
            except Exception as exc:  # noqa: BLE001 - any client bug must reach the main thread
                self.results.put(_Result(job, error=RequestFailed(f"client error ({type(exc).__name__})")))

    def _count_attempt(self, reason: str | None, will_retry: bool) -> None:
        with self.lock:
            if self.closed:
                return
            self.s.requests += 1
            if reason is None:
                self.streak.clear()  # an answer, even a refusal: the server is there
            elif reason != "HTTP 429":  # asked to slow down: neither a failure nor an answer
                self.streak[reason] += 1
            self.refused_in_a_row = self.refused_in_a_row + 1 if reason == "connection refused" else 0
            if not self.halt.is_set():
                self._halt_on_streak()
            if reason and will_retry and not self.halt.is_set():  # a halted worker does not retry
                self.s.retried[reason] += 1

    def _halt_on_streak(self) -> None:
        """Stop the workers when the attempts in a row say the server is gone (under ``lock``)."""
        url = safe_url(self.o.base_url)
        failures = sum(self.streak.values())
        if self.refused_in_a_row >= REFUSED_ATTEMPTS:
            self.halt_reason = (
                f"cannot connect to {url}: connection refused {self.refused_in_a_row} times in a row; "
                "is the server running, and is --base-url right?"
            )
        elif failures >= self.o.max_consecutive_failures:
            self.halt_reason = (
                f"{failures} attempts in a row got no usable answer from {url} ({format_counts(self.streak)}); "
                f"check that the server is up, or raise --timeout (now {self.o.timeout:g} s) if it is only slow"
            )
        else:
            return
        self.halt.set()

    def _handle(self, result: _Result) -> None:
        if result.error is not None:
            err = result.error
            self.s.failed[err.reason] += 1
            self.failed_requests += 1
            self.handle_failure(result.job)
            if err.fatal:
                detail = f": {err.detail}" if err.detail else ""
                self.stop_reason = redact(
                    f"{safe_url(self.o.base_url)} refused the request ({err.reason}{detail}); "
                    "check OPENAI_API_KEY, --model and --base-url",
                    self.key,
                )
            elif self.halt_reason:
                self.stop_reason = self.halt_reason
            elif self.failed_requests >= self.o.max_failed_requests:
                retries = f"{self.o.retries} {'retry' if self.o.retries == 1 else 'retries'}"
                self.stop_reason = f"{self.failed_requests} requests failed after {retries} ({format_counts(self.s.failed)})"
            return
        accepted = self.handle_reply(result.job, result.content)
        self.barren_replies = 0 if accepted else self.barren_replies + 1
        if self.halt_reason and not self.stop_reason:
            self.stop_reason = self.halt_reason
        if self.barren_replies >= self.o.max_barren_replies and not self.stop_reason:
            self.stop_reason = (
                f"{self.barren_replies} replies in a row had no acceptable entry ({format_counts(self.s.rejected)})"
            )

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(
                BuildProgress(
                    done=self.s.total,
                    target=self.s.target,
                    accepted=self.s.accepted,
                    rejected=sum(self.s.rejected.values()),
                    failed=sum(self.s.failed.values()),
                )
            )


class _Runner(ChatLoop):
    """build-context's requests: batches of vocabulary objects, each asked up to
    ``object_attempts`` times."""

    def __init__(self, options, api_key, client, summary, on_progress, seeds, keys, pool) -> None:
        super().__init__(options, api_key, client, summary, on_progress)
        self.o: BuildOptions = options
        self.s: BuildSummary = summary
        self.seeds: list[Exemplar] = seeds
        self.keys: set[str] = keys
        self.pool: deque[str] = pool
        self.tries: Counter[str] = Counter()

    def next_job(self, room: int) -> ChatJob | None:
        if not self.pool or room <= 0:
            return None
        count = min(self.o.batch_size, room, len(self.pool))
        objects = [self.pool.popleft() for _ in range(count)]
        shots = self.rng.sample(self.seeds, min(self.o.few_shot, len(self.seeds)))
        return ChatJob(build_messages(objects, shots), units=count, payload=objects)

    def handle_failure(self, job: ChatJob) -> None:
        self.pool.extend(job.payload)

    def handle_reply(self, job: ChatJob, content: str | None) -> int:
        requested = {object_key(o): o for o in job.payload}
        accepted: set[str] = set()
        try:
            entries = parse_reply(content)
        except ExemplarError as exc:
            self.s.rejected[exc.reason] += 1
            entries = []
        for entry in entries:
            self._take(entry, requested, accepted)
        for key, phrase in requested.items():
            if key not in accepted and key not in self.keys:
                self.tries[key] += 1
                if self.tries[key] < self.o.object_attempts:
                    self.pool.append(phrase)
                else:
                    self.s.dropped_objects += 1
        return len(accepted)

    def _take(self, entry: object, requested: dict[str, str], accepted: set[str]) -> None:
        obj = entry.get("object") if isinstance(entry, dict) else None
        if isinstance(obj, str) and object_key(obj) in self.keys:
            self.s.rejected["duplicate"] += 1
            return
        try:
            ex = entry_to_exemplar(entry, requested, self.o.model)
        except ExemplarError as exc:
            self.s.rejected[exc.reason] += 1
            return
        key = object_key(ex.object)
        append_line(Path(self.o.out), ex.to_json())
        self.keys.add(key)
        accepted.add(key)
        self.s.accepted += 1

    def exhausted_reason(self) -> str:
        parts = [f"ran out of objects to ask for: {self.s.dropped_objects} were rejected {self.o.object_attempts} times"]
        if self.s.rejected:
            parts.append(f"rejections: {format_counts(self.s.rejected)}")
        return "; ".join(parts)


def format_counts(counter: Counter[str]) -> str:
    """``reason: count`` pairs, most frequent first, for messages and the summary table."""
    return ", ".join(f"{reason}: {count}" for reason, count in counter.most_common())

"""The concurrent request loop of the chat builders, and what a run reports.

:class:`ChatLoop` keeps ``concurrency`` requests in flight and decides when a run stops; both
builders subclass it with what to ask and what to do with a reply. A run stops on a refusal (HTTP
4xx other than 429: it would fail the same way for every request), after :data:`REFUSED_ATTEMPTS`
refused connections in a row (nothing listens there, and waiting will not change that), after
``max_consecutive_failures`` attempts in a row, across all requests, got no usable answer
(timeouts, connection errors, 5xx; a 429 neither counts nor breaks the streak), after
``max_failed_requests`` requests failed for good, or after ``max_barren_replies`` replies in a row
without one acceptable entry (a model that cannot follow the format), rather than walking the
whole pool in vain. Requests still in flight when the run stops are abandoned, not waited for.
"""

from __future__ import annotations

import queue
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .chat_requests import RequestFailed, call_with_retries
from .chat_settings import ChatSettings, redact, safe_url

REFUSED_ATTEMPTS = 2  # refused connections in a row (across requests) that stop the run


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
        self.settings = settings
        self.api_key = api_key
        self.client = client
        self.summary = summary
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
        return self.summary.target - self.summary.total - self.in_flight_units

    def done(self) -> bool:
        return self.summary.complete

    # ---- the loop
    def run(self) -> None:
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.settings.concurrency)]
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
            self.summary.stop_reason = self.stop_reason or self.exhausted_reason()

    def _submit(self) -> None:
        while self.in_flight < self.settings.concurrency and not self.stop_reason:
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
            request = dict(model=self.settings.model, messages=job.messages, temperature=self.settings.temperature)
            if self.settings.json_mode:
                request["response_format"] = {"type": "json_object"}
            try:
                content = call_with_retries(
                    self.client, request, self.settings, self._count_attempt, rng, sleep=self.halt.wait, should_stop=self.halt.is_set
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
            self.summary.requests += 1
            if reason is None:
                self.streak.clear()  # an answer, even a refusal: the server is there
            elif reason != "HTTP 429":  # asked to slow down: neither a failure nor an answer
                self.streak[reason] += 1
            self.refused_in_a_row = self.refused_in_a_row + 1 if reason == "connection refused" else 0
            if not self.halt.is_set():
                self._halt_on_streak()
            if reason and will_retry and not self.halt.is_set():  # a halted worker does not retry
                self.summary.retried[reason] += 1

    def _halt_on_streak(self) -> None:
        """Stop the workers when the attempts in a row say the server is gone (under ``lock``)."""
        url = safe_url(self.settings.base_url)
        failures = sum(self.streak.values())
        if self.refused_in_a_row >= REFUSED_ATTEMPTS:
            self.halt_reason = (
                f"cannot connect to {url}: connection refused {self.refused_in_a_row} times in a row; "
                "is the server running, and is --base-url right?"
            )
        elif failures >= self.settings.max_consecutive_failures:
            self.halt_reason = (
                f"{failures} attempts in a row got no usable answer from {url} ({format_counts(self.streak)}); "
                f"check that the server is up, or raise --timeout (now {self.settings.timeout:g} s) if it is only slow"
            )
        else:
            return
        self.halt.set()

    def _handle(self, result: _Result) -> None:
        if result.error is not None:
            err = result.error
            self.summary.failed[err.reason] += 1
            self.failed_requests += 1
            self.handle_failure(result.job)
            if err.fatal:
                detail = f": {err.detail}" if err.detail else ""
                self.stop_reason = redact(
                    f"{safe_url(self.settings.base_url)} refused the request ({err.reason}{detail}); "
                    "check OPENAI_API_KEY, --model and --base-url",
                    self.api_key,
                )
            elif self.halt_reason:
                self.stop_reason = self.halt_reason
            elif self.failed_requests >= self.settings.max_failed_requests:
                retries = f"{self.settings.retries} {'retry' if self.settings.retries == 1 else 'retries'}"
                self.stop_reason = f"{self.failed_requests} requests failed after {retries} ({format_counts(self.summary.failed)})"
            return
        accepted = self.handle_reply(result.job, result.content)
        self.barren_replies = 0 if accepted else self.barren_replies + 1
        if self.halt_reason and not self.stop_reason:
            self.stop_reason = self.halt_reason
        if self.barren_replies >= self.settings.max_barren_replies and not self.stop_reason:
            self.stop_reason = (
                f"{self.barren_replies} replies in a row had no acceptable entry ({format_counts(self.summary.rejected)})"
            )

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(
                BuildProgress(
                    done=self.summary.total,
                    target=self.summary.target,
                    accepted=self.summary.accepted,
                    rejected=sum(self.summary.rejected.values()),
                    failed=sum(self.summary.failed.values()),
                )
            )


def format_counts(counter: Counter[str]) -> str:
    """``reason: count`` pairs, most frequent first, for messages and the summary table."""
    return ", ".join(f"{reason}: {count}" for reason, count in counter.most_common())

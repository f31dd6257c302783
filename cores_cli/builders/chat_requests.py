"""One chat request: its deadline, its retries, and the JSON of its reply.

The client's own retries are off (``max_retries=0``, :func:`.chat_settings.make_client`) so that
this module decides. ``timeout`` is a deadline for the whole of one attempt, from connecting to
the last byte of the reply: the HTTP call runs on a thread of its own (:func:`call_with_deadline`)
and is abandoned when the deadline passes, since the client's own timeout only bounds each read
and a server that trickles bytes would never trip it. An abandoned attempt keeps nothing but a
private slot that nobody reads any more, so a reply that arrives late can never be written.
HTTP 429, 5xx, timeouts and connection errors are retried with exponential back-off (honouring
``Retry-After``); other HTTP errors (401, 403, 404, 400) would fail the same way for every
request, so they fail the request as ``fatal`` and the run stops at once
(:class:`.chat_loop.ChatLoop` holds the rules that stop a run).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from ..contexts import ExemplarError
from .chat_settings import RetrySettings


class RequestFailed(Exception):
    """A request that failed for good; ``fatal`` when retrying or asking again cannot help."""

    def __init__(self, reason: str, fatal: bool = False, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal
        self.detail = detail


class DeadlinePassed(Exception):
    """An attempt that did not finish within its deadline; it was abandoned."""


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


# ---- the reply ------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def reply_json(content: str | None) -> Any:
    """The JSON document of a reply, also when the model wrapped it in a Markdown fence.

    Raises :class:`~cores_cli.contexts.ExemplarError` with reason ``empty reply`` or
    ``malformed JSON``."""
    if not content or not content.strip():
        raise ExemplarError("empty reply", "the reply is empty")
    m = _FENCE.match(content)
    text = m.group(1) if m else content
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExemplarError("malformed JSON", f"the reply is not JSON ({exc.msg})") from None

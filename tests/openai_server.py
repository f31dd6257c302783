"""A real OpenAI-compatible HTTP server for tests: stdlib only, on 127.0.0.1, port 0.

Tests point the real ``openai`` client at it (``base_url=server.url``), so the client's own
request building, HTTP handling and error mapping are exercised, not mocked. It serves
``POST /v1/chat/completions`` (and ``GET /v1/models``); every request is recorded.

What each request gets is decided, in order, by:

1. the replies queued with :meth:`OpenAIServer.enqueue`, one per request in arrival order;
2. otherwise ``server.handler(request)``, a function of the :class:`ChatRequest`;
3. otherwise an HTTP 500 saying that the test scripted nothing.

Replies are built with :func:`chat_reply` (an assistant message), :func:`json_reply` (an
assistant message whose content is a JSON document), :func:`error_reply` (an OpenAI-style
error with any status, e.g. 429 or 500, optionally with ``Retry-After``) and :func:`raw_reply`
(any bytes, e.g. a body that is not JSON at all). Any reply can be delayed with
``delay=seconds`` or :func:`slow` to run past a client timeout.

Misbehaving servers, for deadlines and give-up rules: :func:`held` sends a reply only once the
test sets an event (so a test can prove the client stopped waiting for it without measuring
time), :func:`no_reply` accepts a request and never answers, :func:`trickle_reply` sends a
response one byte at a time and never finishes it (from the body, or from the status line
with ``head=True``); :attr:`OpenAIServer.pending` counts the requests being held or trickled
right now, and :meth:`OpenAIServer.wait_for_pending` waits until that count is reached (the
request may reach the server a moment after the client gave up on it). Held and trickled
replies end when the server stops. :func:`refused_url` gives a
base URL on which every connection is refused.

Example::

    with OpenAIServer() as server:
        server.enqueue(error_reply(429), json_reply({"answer": 42}))
        client = openai.OpenAI(api_key="k", base_url=server.url, max_retries=0)
        ...
        assert server.requests[0].headers["authorization"] == "Bearer k"
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """An HTTP response: status, body, headers, and a delay before it is sent."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hold: threading.Event | None = None  # sent only once this is set (never, if the server stops first)
    trickle: float | None = None  # seconds between bytes of a response that is never finished
    trickle_head: bool = False  # trickle from the status line on, not only the body


@dataclass(frozen=True)
class ChatRequest:
    """One request as the server received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # decoded JSON, or None when the body was empty or not JSON
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list((self.body or {}).get("messages", []))

    @property
    def last_user_content(self) -> str:
        """The text of the last user message (what the test usually needs to answer)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                content = m.get("content")
                return content if isinstance(content, str) else json.dumps(content)
        return ""


Handler = Callable[[ChatRequest], Reply]


def chat_reply(content: str, *, model: str = "test-model", finish_reason: str = "stop", delay: float = 0.0) -> Reply:
    """A 200 chat.completion whose single choice is an assistant message with ``content``."""
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return Reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, delay)


def json_reply(document: Any, **kwargs: Any) -> Reply:
    """A chat reply whose content is ``document`` serialised as JSON."""
    return chat_reply(json.dumps(document), **kwargs)


def error_reply(status: int, message: str = "scripted error", *, retry_after: float | None = None, delay: float = 0.0) -> Reply:
    """An OpenAI-style error body (``{"error": {...}}``) with the given HTTP status."""
    body = {"error": {"message": message, "type": "test_error", "param": None, "code": str(status)}}
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Reply(status, json.dumps(body).encode(), headers, delay)


def raw_reply(body: bytes | str, status: int = 200, content_type: str = "application/json", delay: float = 0.0) -> Reply:
    """Any body as is, e.g. a truncated or non-JSON HTTP body."""
    data = body.encode() if isinstance(body, str) else body
    return Reply(status, data, {"Content-Type": content_type}, delay)


def slow(reply: Reply, seconds: float) -> Reply:
    """``reply`` sent only after ``seconds`` (e.g. longer than the client's timeout)."""
    return replace(reply, delay=seconds)


def held(reply: Reply, release: threading.Event) -> Reply:
    """``reply`` sent only once the test sets ``release``; until then the request is pending."""
    return replace(reply, hold=release)


def no_reply() -> Reply:
    """Accept the request and never answer it (until the server stops)."""
    return held(error_reply(500, "released a request that was never to be answered"), threading.Event())


def trickle_reply(interval: float = 0.01, *, head: bool = False) -> Reply:
    """A 200 whose body arrives one byte (a space) every ``interval`` seconds and never ends, so
    that no single read waits long; with ``head=True`` even the status line is trickled."""
    return Reply(200, b"", {"Content-Type": "application/json"}, trickle=interval, trickle_head=head)


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A base URL where every connection is refused: its port is bound but never listened on,
    so no other program can take it while the block runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()


class OpenAIServer:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`.

    ``url`` is the base URL to give an OpenAI client (it ends in ``/v1``). ``requests``
    holds every request received, in arrival order. Thread-safe: the server answers
    concurrent requests from its own threads.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self._queue: deque[Reply] = deque()
        self._requests: list[ChatRequest] = []
        self._pending = 0
        self._lock = threading.Lock()
        self._pending_changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[ChatRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[ChatRequest]:
        """Only the ``/chat/completions`` requests."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def pending(self) -> int:
        """Requests whose reply is being held (:func:`held`, :func:`no_reply`) or trickled now."""
        with self._lock:
            return self._pending

    def wait_for_pending(self, count: int, *, at_least: bool = False, guard: float = 120.0) -> bool:
        """Wait until ``count`` requests (or, ``at_least``, that many or more) are held or
        trickled; False if that did not happen within ``guard`` seconds (a guard against a hang,
        not a time budget)."""
        with self._pending_changed:
            return self._pending_changed.wait_for(
                lambda: self._pending >= count if at_least else self._pending == count, timeout=guard
            )

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies for the next requests, one each, before the handler is consulted."""
        with self._lock:
            self._queue.extend(replies)

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; delayed replies still waiting are abandoned at once."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _reply_for(self, request: ChatRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
            if self._queue:
                return self._queue.popleft()
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            return raw_reply(json.dumps({"object": "list", "data": [{"id": "test-model", "object": "model"}]}))
        if not request.path.endswith("/chat/completions"):
            return error_reply(404, f"no route {request.path}")
        if self.handler is not None:
            return self.handler(request)
        return error_reply(500, "the test scripted no reply for this request")

    def _make_handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self._serve("POST")

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                request = ChatRequest(
                    method=method,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    received_at=time.monotonic(),
                )
                try:
                    reply = server._reply_for(request)
                except Exception as exc:  # a broken test handler should fail loudly, not hang
                    reply = error_reply(500, f"test handler raised {type(exc).__name__}: {exc}")
                if reply.delay and server._stopping.wait(reply.delay):
                    return
                if reply.hold is not None or reply.trickle is not None:
                    self._serve_slowly(reply)
                    return
                try:
                    self._send_whole(reply)
                except OSError:
                    pass  # the client gave up (timeout) and closed the connection

            def _send_whole(self, reply: Reply) -> None:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def _serve_slowly(self, reply: Reply) -> None:
                with server._pending_changed:
                    server._pending += 1
                    server._pending_changed.notify_all()
                try:
                    if reply.hold is not None and not _wait_either(reply.hold, server._stopping):
                        self.close_connection = True  # the client sees the connection close
                        return
                    if reply.trickle is not None:
                        self.close_connection = True  # the response was never finished
                        self._trickle(reply)
                        return
                    self._send_whole(reply)
                except OSError:
                    pass  # the client gave up and closed the connection
                finally:
                    with server._pending_changed:
                        server._pending -= 1
                        server._pending_changed.notify_all()

            def _trickle(self, reply: Reply) -> None:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
                if not reply.trickle_head:
                    self.wfile.write(head)
                    self.wfile.flush()
                data = iter(head) if reply.trickle_head else iter(())
                while not server._stopping.wait(reply.trickle):
                    self.wfile.write(bytes([next(data, 0x20)]))  # then spaces: valid JSON padding, never a document
                    self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

        return _Handler


def _wait_either(release: threading.Event, stopping: threading.Event) -> bool:
    """Wait until ``release`` is set (True) or the server stops (False)."""
    while not release.wait(0.05):
        if stopping.is_set():
            return False
    return True

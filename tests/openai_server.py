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

Example::

    with OpenAIServer() as server:
        server.enqueue(error_reply(429), json_reply({"answer": 42}))
        client = openai.OpenAI(api_key="k", base_url=server.url, max_retries=0)
        ...
        assert server.requests[0].headers["authorization"] == "Bearer k"
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
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
        self._lock = threading.Lock()
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
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (timeout) and closed the connection

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

        return _Handler

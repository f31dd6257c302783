"""How the chat builders talk to the model: the settings, the API key and the client.

The API key is passed in by the caller and only ever handed to the ``openai`` client. Messages
carry no server text except a refusal's error message, and that goes through :func:`redact`
first, because servers echo keys in their error messages ("Incorrect API key provided: ...").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from ..errors import CoresError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
NO_KEY_PLACEHOLDER = "no-key-needed"  # sent to local servers when OPENAI_API_KEY is unset


class RetrySettings(Protocol):
    """What :func:`~cores_cli.builders.chat_requests.call_with_retries` and
    :func:`~cores_cli.builders.chat_requests.backoff_delay` read from their options."""

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
    """An ``openai`` client with its own retries off: :func:`.chat_requests.call_with_retries` decides."""
    import openai

    return openai.OpenAI(api_key=api_key, base_url=settings.base_url, timeout=settings.timeout, max_retries=0)


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

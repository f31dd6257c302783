"""`cores build-context`: generate the in-context exemplar library with a chat model."""

from __future__ import annotations

from pathlib import Path

import typer

from ..builders.chat_settings import resolve_api_key
from ..builders.context_library import BuildOptions, BuildSummary
from ..builders.context_library import build_context as run_build
from . import chat_run as chat
from .common import clean_errors


@clean_errors
def build_context(
    n: int = typer.Option(500, "--n", min=1, help="Number of valid, unique exemplars the library must hold."),
    out: Path = typer.Option(
        Path("contexts/library.jsonl"), "--out", help="Library file (JSONL), appended to and resumed."
    ),
    model: str = chat.MODEL,
    base_url: str = chat.BASE_URL,
    temperature: float = chat.TEMPERATURE,
    concurrency: int = chat.CONCURRENCY,
    batch_size: int = typer.Option(5, "--batch-size", min=1, max=20, help="Objects asked for per request."),
    timeout: float = chat.TIMEOUT,
    retries: int = chat.RETRIES,
    backoff: float = chat.BACKOFF,
    max_failures: int = chat.MAX_FAILURES,
    max_consecutive: int = chat.MAX_CONSECUTIVE,
    max_barren: int = chat.MAX_BARREN,
    seed: int = typer.Option(0, "--seed", help="Order in which vocabulary objects are asked for."),
    json_mode: bool = chat.JSON_MODE,
    vocabulary: Path = typer.Option(None, "--vocabulary", help="Class-name vocabulary (default: the shipped one)."),
    seeds: Path = typer.Option(None, "--seeds", help="Seed exemplars shown to the model (default: the shipped ones)."),
    json_output: bool = chat.JSON_OUTPUT,
) -> None:
    """Ask a chat model for question/answer exemplars (paper §3.2) and append them to a library.

    Objects come from the training sets' class names (COCO-Stuff, ADE20K, PASCAL-Part, PartImageNet, PACO-LVIS); each reply is validated and de-duplicated before it is appended. An interrupted run resumes where it stopped: run the same command again. Exits non-zero, saying why, when the library could not reach --n. One run at a time may write a given --out (a second is refused).

    Example: OPENAI_API_KEY=... cores build-context --n 500 --out my_library.jsonl
    """
    settings = chat.chat_settings(model, base_url, temperature, concurrency, timeout, retries, backoff, max_failures, max_barren,
                                  json_mode, seed, max_consecutive)
    options = BuildOptions(n=n, out=out, batch_size=batch_size, vocabulary=vocabulary, seeds=seeds, **settings)
    api_key = resolve_api_key(base_url)
    summary = chat.run_with_progress("building context library", n, lambda cb: run_build(options, api_key, on_progress=cb))
    chat.finish(summary, _summary_table(summary), json_output)


def _summary_table(s: BuildSummary):
    rows = [
        *chat.common_rows(s, "already in file"),
        ("objects dropped", s.dropped_objects, "rejected on every try" if s.dropped_objects else ""),
        ("HTTP requests", s.requests, ""),
    ]
    return chat.summary_table("build-context summary", rows)

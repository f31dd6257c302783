"""`cores build-context`: generate the in-context exemplar library with a chat model."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors
from .not_yet import not_yet


@clean_errors
def build_context(
    n: int = typer.Option(500, "--n", help="Number of valid, unique exemplars the library must hold."),
    out: Path = typer.Option(Path("contexts/library.jsonl"), "--out", help="Library file (JSONL), appended to and resumed."),
    model: str = typer.Option("gpt-4o-mini", "--model", help="Chat model name."),
    base_url: str = typer.Option(None, "--base-url", help="Any OpenAI-compatible server; the key is read from OPENAI_API_KEY."),
) -> None:
    """Ask a chat model for question/answer exemplars (paper §3.2) and append them to a library.

    Example: cores build-context --n 500 --out contexts/library.jsonl
    """
    not_yet("build-context", 5)

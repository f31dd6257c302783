"""What the chat-driven commands (build-context, make-reasonpart) print: a progress bar while
requests run, a summary table of what happened and why, ``--json``, and the exit status."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..builders.chat_loop import BuildProgress, RunSummary, format_counts
from ..builders.chat_settings import ChatSettings
from .common import err_console, fail, stdout_line

S = TypeVar("S", bound=RunSummary)

# Options every chat-driven command takes, defined once (typer reads these as defaults).
MODEL = typer.Option("gpt-4o-mini", "--model", help="Chat model name; recorded as the source of everything it wrote.")
BASE_URL = typer.Option(
    None,
    "--base-url",
    help="Any OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1. The key is read from "
    "OPENAI_API_KEY only; for a server on localhost it may be unset.",
)
TEMPERATURE = typer.Option(0.7, "--temperature", min=0.0, max=2.0, help="Sampling temperature.")
CONCURRENCY = typer.Option(4, "--concurrency", min=1, max=64, help="Requests in flight at once.")
TIMEOUT = typer.Option(
    60.0, "--timeout", min=0.001,
    help="Deadline in seconds for one attempt of a request, from connecting to the reply's last byte.",
)
RETRIES = typer.Option(5, "--retries", min=0, help="Retries per request on HTTP 429, 5xx, timeouts and connection errors.")
BACKOFF = typer.Option(1.0, "--backoff", min=0.0, help="First back-off delay in seconds; doubles per retry.")
MAX_FAILURES = typer.Option(10, "--max-failures", min=1, help="Stop after this many requests failed even after their retries.")
MAX_CONSECUTIVE = typer.Option(
    ChatSettings.max_consecutive_failures, "--max-consecutive-failures", min=1,
    help="Stop after this many attempts in a row, across requests, got no usable answer (timeout, "
    "connection error, HTTP 5xx). Two refused connections in a row stop the run at once.",
)
MAX_BARREN = typer.Option(
    20, "--max-barren-replies", min=1, help="Stop after this many replies in a row gave no acceptable entry."
)
JSON_MODE = typer.Option(
    True, "--json-mode/--no-json-mode", help="Ask for response_format=json_object (turn off if the server lacks it)."
)
JSON_OUTPUT = typer.Option(False, "--json", help="Print the summary as JSON on stdout.")


def chat_settings(model: str, base_url: str | None, temperature: float, concurrency: int, timeout: float, retries: int,
                  backoff: float, max_failures: int, max_barren: int, json_mode: bool, seed: int,
                  max_consecutive: int = ChatSettings.max_consecutive_failures) -> dict:
    """The :class:`~cores_cli.builders.chat_settings.ChatSettings` fields from the options above."""
    return dict(model=model, base_url=base_url, temperature=temperature, concurrency=concurrency, timeout=timeout,
                retries=retries, backoff=backoff, max_failed_requests=max_failures, max_barren_replies=max_barren,
                max_consecutive_failures=max_consecutive, json_mode=json_mode, seed=seed)


def run_with_progress(label: str, total: int | None, run: Callable[[Callable[[BuildProgress], None]], S]) -> S:
    """Call ``run(on_progress)`` under a progress bar on stderr and return its summary. The bar's
    total follows the run's target (``total`` is only the first guess; None = not known yet)."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task("run", total=total, note="")

        def on_progress(p: BuildProgress) -> None:
            note = f"rejected {p.rejected}, failed {p.failed}"
            bar.update(task, total=p.target, completed=min(p.done, p.target), note=note)

        summary = run(on_progress)
        bar.update(task, total=summary.target, completed=min(summary.total, summary.target))
    return summary


def common_rows(s: RunSummary, existing_label: str) -> list[tuple[str, int, str]]:
    """The summary rows every chat-driven run has; ``existing_label`` says where ``existing`` was."""
    return [
        (existing_label, s.existing, "torn last line removed" if s.torn_tail_removed else ""),
        ("accepted", s.accepted, f"total {s.total}, target {s.target}"),
        ("rejected", sum(s.rejected.values()), format_counts(s.rejected)),
        ("failed requests", sum(s.failed.values()), format_counts(s.failed)),
        ("retries", sum(s.retried.values()), format_counts(s.retried)),
    ]


def summary_table(title: str, rows: Sequence[tuple[str, int | str, str]]) -> Table:
    table = Table(title=title, show_header=True, title_justify="left")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_column("reasons")
    for label, count, reasons in rows:
        table.add_row(label, str(count), Text(reasons))  # Text: reasons are data, not markup
    return table


def finish(summary: RunSummary, table: Table, json_output: bool) -> None:
    """Print the table (and the JSON summary); exit non-zero, saying why, when incomplete."""
    err_console.print(table)
    if json_output:
        stdout_line(json.dumps(summary.to_dict(), ensure_ascii=False))
    if not summary.complete:
        raise fail(summary.message())
    err_console.print(summary.message(), soft_wrap=True, markup=False)

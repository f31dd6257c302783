"""`cores build-context`: generate the in-context exemplar library with a chat model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..context_build import (
    BuildOptions,
    BuildProgress,
    BuildSummary,
    format_counts,
    resolve_api_key,
)
from ..context_build import build_context as run_build
from .common import clean_errors, err_console, fail, stdout_line


@clean_errors
def build_context(
    n: int = typer.Option(500, "--n", min=1, help="Number of valid, unique exemplars the library must hold."),
    out: Path = typer.Option(
        Path("contexts/library.jsonl"), "--out", help="Library file (JSONL), appended to and resumed."
    ),
    model: str = typer.Option("gpt-4o-mini", "--model", help="Chat model name; also written as each entry's source."),
    base_url: str = typer.Option(
        None,
        "--base-url",
        help="Any OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1. The key is read from "
        "OPENAI_API_KEY only; for a server on localhost it may be unset.",
    ),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, max=2.0, help="Sampling temperature."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="Requests in flight at once."),
    batch_size: int = typer.Option(5, "--batch-size", min=1, max=20, help="Objects asked for per request."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.001, help="Seconds before one request times out."),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per request on HTTP 429, 5xx and timeouts."),
    backoff: float = typer.Option(1.0, "--backoff", min=0.0, help="First back-off delay in seconds; doubles per retry."),
    max_failures: int = typer.Option(
        10, "--max-failures", min=1, help="Stop after this many requests failed even after their retries."
    ),
    max_barren: int = typer.Option(
        20, "--max-barren-replies", min=1, help="Stop after this many replies in a row gave no acceptable exemplar."
    ),
    seed: int = typer.Option(0, "--seed", help="Order in which vocabulary objects are asked for."),
    json_mode: bool = typer.Option(
        True, "--json-mode/--no-json-mode", help="Ask for response_format=json_object (turn off if the server lacks it)."
    ),
    vocabulary: Path = typer.Option(None, "--vocabulary", help="Class-name vocabulary (default: the shipped one)."),
    seeds: Path = typer.Option(None, "--seeds", help="Seed exemplars shown to the model (default: the shipped ones)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Ask a chat model for question/answer exemplars (paper §3.2) and append them to a library.

    Objects come from the training sets' class names (COCO-Stuff, ADE20K, PASCAL-Part, PartImageNet, PACO-LVIS); each reply is validated and de-duplicated before it is appended. An interrupted run resumes where it stopped: run the same command again. Exits non-zero, saying why, when the library could not reach --n.

    Example: OPENAI_API_KEY=... cores build-context --n 500 --out my_library.jsonl
    """
    options = BuildOptions(
        n=n,
        out=out,
        model=model,
        base_url=base_url,
        temperature=temperature,
        concurrency=concurrency,
        batch_size=batch_size,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_failed_requests=max_failures,
        max_barren_replies=max_barren,
        seed=seed,
        json_mode=json_mode,
        vocabulary=vocabulary,
        seeds=seeds,
    )
    api_key = resolve_api_key(base_url)
    with Progress(
        TextColumn("building context library"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task("build", total=n, note="")

        def on_progress(p: BuildProgress) -> None:
            bar.update(task, completed=min(p.done, p.target), note=f"rejected {p.rejected}, failed {p.failed}")

        summary = run_build(options, api_key, on_progress=on_progress)
        bar.update(task, completed=min(summary.total, n))
    err_console.print(_summary_table(summary))
    if json_output:
        stdout_line(json.dumps(summary.to_dict(), ensure_ascii=False))
    if not summary.complete:
        raise fail(summary.message())
    err_console.print(summary.message(), soft_wrap=True, markup=False)


def _summary_table(s: BuildSummary) -> Table:
    table = Table(title="build-context summary", show_header=True, title_justify="left")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_column("reasons")
    rows = [
        ("already in file", s.existing, "torn last line removed" if s.torn_tail_removed else ""),
        ("accepted", s.accepted, f"total {s.total}, target {s.target}"),
        ("rejected", sum(s.rejected.values()), format_counts(s.rejected)),
        ("failed requests", sum(s.failed.values()), format_counts(s.failed)),
        ("retries", sum(s.retried.values()), format_counts(s.retried)),
        ("objects dropped", s.dropped_objects, "rejected on every try" if s.dropped_objects else ""),
        ("HTTP requests", s.requests, ""),
    ]
    for label, count, reasons in rows:
        table.add_row(label, str(count), Text(reasons))  # Text: reasons are data, not markup
    return table


"""What every command shares: one-line errors, the stderr console, device/dtype choice."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CoresError

F = TypeVar("F", bound=Callable[..., object])

# Progress, tables and messages go to stderr so stdout stays clean for --json consumers.
# Messages and table cells quote user text (paths, queries, dataset names like "reasonseg:train"):
# Rich must print it as written, so markup and :emoji: codes are off unless a call asks for markup.
err_console = Console(stderr=True, highlight=False, markup=False, emoji=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on one line of stderr and return the Exit to raise."""
    # Messages quote user text and chain tokens like [SEG]: never read them as Rich markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def clean_errors(fn: F) -> F:
    """Turn a :class:`CoresError` into a one-line message and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CoresError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", markup=True, soft_wrap=True)


def stdout_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def use_threads(threads: int | None) -> int:
    """``--threads``: set torch's CPU threads for this process (one of the run's processes when
    a launcher started it: torchrun's LOCAL_WORLD_SIZE)."""
    import os

    from ..threads import apply_threads

    return apply_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))

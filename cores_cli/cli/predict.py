"""`cores predict` (placeholder until the model lands in this issue)."""

from __future__ import annotations

import typer

from .common import clean_errors
from .not_yet import not_yet


@clean_errors
def predict(image: str = typer.Argument(None), query: str = typer.Argument(None)) -> None:
    """Segment what QUERY refers to in IMAGE."""
    not_yet("predict", 2)

"""`cores make-reasonpart`: build the ReasonPart benchmark (paper appendix C)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors
from .not_yet import not_yet


@clean_errors
def make_reasonpart(
    source: str = typer.Option(..., "--source", help="partimagenet or pascalpart."),
    ann: Path = typer.Option(..., "--ann", help="COCO-format part annotation file."),
    images: Path = typer.Option(..., "--images", help="Image folder of that annotation file."),
    out: Path = typer.Option(..., "--out", help="Output folder in ReasonSeg format."),
) -> None:
    """Write reasoning questions about object parts in ReasonSeg format.

    Example: cores make-reasonpart --source partimagenet --ann val.json --images val/ --out reasonpart/
    """
    not_yet("make-reasonpart", 6)

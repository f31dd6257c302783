"""`cores eval`: gIoU / cIoU / mIoU on a named dataset, LISA's protocol."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors
from .not_yet import not_yet


@clean_errors
def evaluate(
    dataset: str = typer.Option(..., "--dataset", help="e.g. reasonseg:val, refcoco:unc:val, synthetic:val."),
    data_root: Path = typer.Option(None, "--data-root", help="Folder holding the datasets in LISA's layout."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="A cores checkpoint directory."),
) -> None:
    """Evaluate a checkpoint and print the metrics with the protocol used.

    Example: cores eval --dataset reasonseg:val --data-root ./dataset --checkpoint runs/cores-7b
    """
    not_yet("eval", 3)

"""`cores train`: LoRA fine-tuning of CoReS on DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors
from .not_yet import not_yet


@clean_errors
def train(
    gpus: int = typer.Option(8, "--gpus", help="Processes per node; 0 trains on the CPU in one process."),
    config: Path = typer.Option(None, "--config", help="Recipe (YAML or JSON)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value, e.g. --set model.chain.depth=3 (repeatable)."),
) -> None:
    """Train CoReS (LoRA on LLaVA, SAM mask decoder, projector, token refiner).

    Example: cores train --gpus 8 --config recipes/cores-7b.yaml
    """
    not_yet("train", 4)

"""`cores export`: merge LoRA into a plain HF LLaVA directory, plus cores' other weights."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors, err_console, stdout_line


@clean_errors
def export(
    checkpoint: Path = typer.Argument(..., help="A cores checkpoint directory, e.g. runs/NAME/checkpoints/best."),
    out: Path = typer.Argument(..., help="Output directory (must not exist unless --overwrite)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (exact), bf16 or fp16 (half the size)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an earlier export (never any other folder, the checkpoint or its run)."),
) -> None:
    """Export a checkpoint: LoRA merged (peft merge_and_unload) and the chain-token rows written
    into a standalone HF LLaVA directory OUT/llava (loadable with transformers alone), beside SAM,
    β and the token refiner in OUT/weights.safetensors. OUT is itself a cores checkpoint:
    `cores predict -c OUT` uses it.

    OUT may not be, contain or lie inside the checkpoint or its run directory.

    Example: cores export runs/cores-7b/checkpoints/best exported/cores-7b --dtype bf16
    """
    from transformers.utils import logging as hf_logging

    from ..engine.export import export_checkpoint

    hf_logging.disable_progress_bar()
    dest = export_checkpoint(checkpoint, out, dtype=dtype, overwrite=overwrite)
    err_console.print(f"exported {checkpoint} → {dest} (HF LLaVA in {dest / 'llava'})", markup=False, soft_wrap=True)
    stdout_line(str(dest))

"""`cores import`: a LISA or original-LLaVA checkpoint converted into a cores checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors, err_console, stdout_line


@clean_errors
def import_source(
    source: str = typer.Argument(..., help="The source checkpoint directory, or a Hugging Face Hub id (org/name, or org/name@revision), e.g. xinlai/LISA-7B-v1."),
    out: Path = typer.Argument(..., help="Output directory for the cores checkpoint (must not exist unless --overwrite)."),
    fmt: str = typer.Option("auto", "--format", help="lisa, llava (liuhaotian's original v0/v1/1.5 layout), or auto: read from config.json."),
    clip: str = typer.Option(None, "--clip", help="The CLIP tower (an HF CLIPVisionModel/CLIPModel directory or Hub id); default: the source config's mm_vision_tower."),
    sam: Path = typer.Option(None, "--sam", help="--format llava only: the SAM .pth to pair with the LLM (e.g. sam_vit_h_4b8939.pth); LISA carries its own."),
    sam_preset: str = typer.Option(None, "--sam-preset", help="SAM's configuration (vit_h, vit_l, vit_b, tiny); default: read from the weights' shapes."),
    overrides: list[str] = typer.Option([], "--set", help="Change the imported model's config, e.g. --set mllm.vision_feature_layer=-2 (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an earlier import (never any other folder)."),
) -> None:
    """Convert a LISA or original-LLaVA checkpoint into a cores checkpoint for `cores predict -c OUT`, `cores eval -c OUT` and training.

    LISA (the merged directory of its merge_lora_weights_and_save_hf_model.py, e.g. xinlai/LISA-7B-v1) becomes a [SEG] (depth-1) model that computes what LISA does: its prompt, its hidden state before [SEG], its answer. LISA does not save the CLIP tower: it comes from the config's mm_vision_tower (openai/clip-vit-large-patch14) or --clip.

    LLaVA (liuhaotian's v0/v1/1.5 weights) becomes a base to train CoReS from (recipe cores-7b-v0), with the SAM of --sam; β, the refiner and the chain tokens start fresh.

    Every source tensor is mapped or dropped for a stated reason; a missing, unknown or mis-shaped tensor is an error naming it. OUT/llava is a standalone HF LLaVA directory.

    Example: cores import xinlai/LISA-7B-v1 models/lisa-7b

    Example: cores import /models/LLaVA-7B-v0 models/llava-7b-v0 --sam /models/sam_vit_h_4b8939.pth
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers.utils import logging as hf_logging

    from ..engine.importing import import_checkpoint

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    columns = (TextColumn("converting {task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(str(source), total=None)

        def tensors_written(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = import_checkpoint(
            source, out, fmt=fmt, clip=clip, sam=sam, sam_preset=sam_preset, overrides=list(overrides), overwrite=overwrite, progress=tensors_written
        )
    for line in report.lines():
        err_console.print(line, markup=False, soft_wrap=True, highlight=False)
    stdout_line(str(out))

"""`cores train`: LoRA fine-tuning of CoReS on DeepSpeed (ZeRO-2; bf16 on GPU, fp32 on CPU).

The command parses its options, calls :func:`cores_cli.engine.train_run.start_training` and
shows what it did; torch and DeepSpeed are imported only once the command runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ..engine.train_run import DEFAULT_RECIPE, TrainRequest, start_training  # torch comes when training starts
from ..errors import UsageError
from .common import clean_errors, err_console, fail, stdout_line

WORKER_VIEW = "cores_cli.cli.train_view:for_recipe"
"""Rank 0 of the launched workers shows its progress through this view, as this process does."""


class LauncherChoice(str, Enum):
    deepspeed = "deepspeed"
    torchrun = "torchrun"


@clean_errors
def train(
    gpus: int = typer.Option(None, "--gpus", min=0, help="Processes per node, one per GPU; 0 trains on the CPU in this process. Default: one per visible GPU, or the CPU in this process when none is visible."),
    recipe: str = typer.Option(None, "--recipe", "-r", help=f"Recipe: a YAML/JSON file or a shipped name (tiny-synthetic, cores-7b, …). Default: {DEFAULT_RECIPE}, or with --resume the run directory's recipe.yaml."),
    config: str = typer.Option(None, "--config", hidden=True, help="The old name of --recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value, e.g. --set train.lr=1e-4 --set model.chain.depth=3 (repeatable)."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run directory (checkpoints, metrics, recipe); same as --set train.run_dir=..."),
    data_root: Path = typer.Option(None, "--data-root", help="Folder holding the datasets in LISA's layout; same as --set data.root=..."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint (step, optimizer, schedule, RNG and data position)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again in a run directory that holds an earlier run: its metrics.jsonl, checkpoints/ and tensorboard/ are removed (nothing else)."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Number of nodes (with --hostfile for the deepspeed launcher)."),
    hostfile: Path = typer.Option(None, "--hostfile", help="MPI-style hostfile ('HOST slots=N' per line) for multi-node runs."),
    launcher: LauncherChoice = typer.Option(LauncherChoice.deepspeed, "--launcher", help="deepspeed (default) or torchrun."),
    master_port: int = typer.Option(None, "--master-port", help="Rendezvous port (default: a free one on a single node, 29500 on several)."),
    master_addr: str = typer.Option(None, "--master-addr", help="Address of node 0 (torchrun on several nodes, or to override deepspeed's guess)."),
    node_rank: int = typer.Option(None, "--node-rank", help="This node's rank (torchrun on several nodes)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the launch command, then exit."),
) -> None:
    """Train CoReS: LoRA on LLaVA, the chain-token rows, the projector β, the token refiner and
    SAM's mask decoder, on a mixture of segmentation datasets.

    \b
    Examples:
      cores train --gpus 8 --recipe cores-7b --data-root ./dataset \\
          --set model.mllm.path=/models/llava-1.5-7b-hf --set model.sam.checkpoint=/models/sam_vit_h_4b8939.pth
      cores train --gpus 0 --recipe tiny-synthetic            # the tiny model on the CPU
      cores train --gpus 0 --resume --run-dir runs/tiny-synthetic

    Without --gpus, training uses every visible GPU (one process each), or the CPU in this
    process when there is none; stderr says which. Checkpoints go to RUN/checkpoints/step-NNNNNN
    (and best/ by validation gIoU), metrics to RUN/metrics.jsonl. A run directory that holds an
    earlier run's results is refused unless --resume continues it or --overwrite starts again.
    Exit status 0 when training finished, 1 on an error, 2 for a usage mistake.
    """
    if recipe is not None and config is not None:
        raise fail("--config is the old name of --recipe: pass one of them", code=2)
    request = TrainRequest(
        recipe=recipe if recipe is not None else config,
        overrides=list(set_),
        run_dir=run_dir,
        data_root=data_root,
        gpus=gpus,
        resume=resume,
        overwrite=overwrite,
        nodes=nodes,
        hostfile=hostfile,
        launcher=launcher.value,
        master_port=master_port,
        master_addr=master_addr,
        node_rank=node_rank,
        dry_run=dry_run,
    )
    try:
        outcome = start_training(request, notify=_note, reporter=_progress_view, worker_reporter=WORKER_VIEW)
    except UsageError as e:
        raise fail(str(e), code=2) from None
    if dry_run:
        _show_dry_run(outcome)
    elif outcome.result is not None:
        _show_result(outcome.result)
    elif outcome.exit_code != 0:
        raise typer.Exit(outcome.exit_code)


def _note(text: str) -> None:
    err_console.print(text, markup=False, soft_wrap=True)


def _progress_view(recipe):
    from .train_view import for_recipe  # imports the engine (torch): only once training starts

    return for_recipe(recipe)


def _show_dry_run(outcome) -> None:
    from ..engine.train_config import recipe_text

    stdout_line(recipe_text(outcome.recipe).rstrip())
    if outcome.replaced:
        stdout_line(f"# --overwrite would first remove from {outcome.run_dir}: {', '.join(p.name for p in outcome.replaced)}")
    if outcome.launch is None:
        stdout_line(f"# would train in this process on the CPU: {outcome.recipe.train.steps} steps → {outcome.run_dir}")
    else:
        stdout_line("# launch: " + " ".join(outcome.launch))


def _show_result(result) -> None:
    best = f", best validation gIoU {result.best_giou:.4f} at step {result.best_step}" if result.best_giou is not None else ""
    err_console.print(f"done: {result.steps} steps; last checkpoint {result.last_checkpoint}{best}", markup=False, soft_wrap=True)
    stdout_line(str(result.last_checkpoint))  # stdout: just the checkpoint, for scripts

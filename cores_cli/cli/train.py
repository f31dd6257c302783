"""`cores train`: LoRA fine-tuning of CoReS on DeepSpeed (ZeRO-2; bf16 on GPU, fp32 on CPU)."""

from __future__ import annotations

import subprocess
from enum import Enum
from pathlib import Path

import typer

from .common import clean_errors, err_console, fail, stdout_line


class LauncherChoice(str, Enum):
    deepspeed = "deepspeed"
    torchrun = "torchrun"


DEFAULT_RECIPE = "cores-7b"


@clean_errors
def train(
    gpus: int = typer.Option(8, "--gpus", min=0, help="Processes per node, one per GPU; 0 trains on the CPU in this process."),
    config: str = typer.Option(None, "--config", "-c", help=f"Recipe: a YAML/JSON file or a shipped name (tiny-synthetic, cores-7b, …). Default: {DEFAULT_RECIPE}, or with --resume the run directory's recipe.yaml."),
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
      cores train --gpus 8 --config cores-7b --data-root ./dataset \\
          --set model.mllm.path=/models/llava-1.5-7b-hf --set model.sam.checkpoint=/models/sam_vit_h_4b8939.pth
      cores train --gpus 0 --config tiny-synthetic            # the tiny model on the CPU
      cores train --gpus 0 --resume --run-dir runs/tiny-synthetic

    Checkpoints go to RUN/checkpoints/step-NNNNNN (and best/ by validation gIoU), metrics to
    RUN/metrics.jsonl. A run directory that holds an earlier run's results is refused unless
    --resume continues it or --overwrite starts again. Exit status 0 when training finished, 1 on
    an error, 2 for a usage mistake.
    """
    from ..configio import dump_text
    from ..engine.deepspeed_setup import free_port
    from ..engine.launch import LaunchSpec, launch_command
    from ..engine.train_config import load_recipe, recipe_text
    from ..engine.trainer import check_recipe, check_run_dir, clear_earlier_run
    from ..errors import CoresError
    from ..fileio import atomic_write_text

    overrides = list(set_)
    if run_dir is not None:
        overrides.append(f"train.run_dir={run_dir}")
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    if gpus == 0:
        overrides.append("train.device=cpu")
    if resume and overwrite:
        raise fail("--resume continues the run and --overwrite starts it again: pass one of them", code=2)
    source = config
    if source is None and resume:
        if run_dir is None:
            raise fail("--resume needs --run-dir (or the --config of the run)", code=2)
        saved = run_dir / "recipe.yaml"
        if not saved.is_file():
            raise CoresError(f"--resume: {saved} not found (nothing to resume in {run_dir})")
        source = str(saved)
    recipe = load_recipe(source or DEFAULT_RECIPE, overrides)
    check_recipe(recipe)
    rd = Path(recipe.train.run_dir)
    # once, here, before any worker starts: a dry run is refused (or told what --overwrite
    # would remove) exactly as the real run would be, and removes nothing
    replaced = check_run_dir(rd, resume=resume, overwrite=overwrite, recipe=recipe_text(recipe))
    if dry_run and gpus == 0:
        stdout_line(recipe_text(recipe).rstrip())
        _say_replaced(rd, replaced)
        stdout_line(f"# would train in this process on the CPU: {recipe.train.steps} steps → {rd}")
        return

    if gpus == 0:
        _train_here(recipe, resume, overwrite)
        return

    if not dry_run and recipe.train.device != "cpu" and nodes == 1 and hostfile is None:
        import torch

        visible = torch.cuda.device_count()
        if visible == 0:
            raise CoresError(f"--gpus {gpus} but no CUDA GPU is visible; use --gpus 0 to train on the CPU")
        if gpus > visible:
            raise CoresError(f"--gpus {gpus} but only {visible} CUDA GPU(s) are visible")
    recipe_file = rd / "recipe.yaml"
    port = master_port or (free_port() if nodes == 1 else 29500)
    spec = LaunchSpec(gpus, recipe_file, nodes, hostfile, launcher.value, port, master_addr, node_rank, resume)
    argv = launch_command(spec)
    if dry_run:
        stdout_line(dump_text(recipe, "yaml").rstrip())
        _say_replaced(rd, replaced)
        stdout_line("# launch: " + " ".join(argv))
        return
    if overwrite and replaced:
        clear_earlier_run(rd)  # the workers then find a directory with no earlier results
        err_console.print(f"--overwrite: removed the earlier run's {', '.join(p.name for p in replaced)} in {rd}", markup=False, soft_wrap=True)
    atomic_write_text(recipe_file, recipe_text(recipe))
    err_console.print(f"launching {gpus} process(es) per node on {nodes} node(s): {' '.join(argv)}", markup=False, soft_wrap=True)
    code = subprocess.call(argv)
    if code != 0:
        raise typer.Exit(code if 0 < code < 256 else 1)


def _say_replaced(run_dir: Path, replaced: list[Path]) -> None:
    if replaced:
        stdout_line(f"# --overwrite would first remove from {run_dir}: {', '.join(p.name for p in replaced)}")


def _train_here(recipe, resume: bool, overwrite: bool) -> None:
    from ..engine.deepspeed_setup import select_accelerator
    from ..engine.trainer import run_training
    from .train_view import TrainView

    select_accelerator("cpu")
    view = TrainView(err_console, recipe.train.log_every)
    try:
        result = run_training(recipe, resume=resume, overwrite=overwrite, reporter=view)
    finally:
        view.close()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    best = f", best validation gIoU {result.best_giou:.4f} at step {result.best_step}" if result.best_giou is not None else ""
    err_console.print(f"done: {result.steps} steps; last checkpoint {result.last_checkpoint}{best}", markup=False, soft_wrap=True)
    stdout_line(str(result.last_checkpoint))  # stdout: just the checkpoint, for scripts

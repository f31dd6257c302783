"""A whole ``cores train`` as one library call: :func:`start_training`.

It resolves the recipe (a file, a shipped name, or with ``resume`` the run directory's
``recipe.yaml``), decides where to train (``gpus``: 0 is the CPU in this process, N launches N
processes per node, None takes every visible GPU or else the CPU), checks the run directory once
(refused, or told what ``overwrite`` removes, before anything starts), and then either describes
the run (``dry_run``), trains in this process, or launches the workers and waits for them.

What the user sees is the caller's: short notes go to ``notify`` as they happen, the in-process
run reports to the :class:`~cores_cli.engine.trainer.Reporter` that ``reporter`` makes, and the
:class:`TrainOutcome` holds the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CoresError, UsageError
from .launch import Launcher

if TYPE_CHECKING:  # the names only: this module is imported before torch is needed
    from .train_config import Recipe
    from .trainer import Reporter, TrainResult

DEFAULT_RECIPE = "cores-7b"


@dataclass
class TrainRequest:
    recipe: str | None = None
    """A recipe file or a shipped name; None: :data:`DEFAULT_RECIPE`, or with ``resume`` the run
    directory's ``recipe.yaml``."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` recipe overrides (``--set``)."""
    run_dir: Path | None = None
    data_root: Path | None = None
    gpus: int | None = None
    """Processes per node; 0: the CPU in this process; None: one per visible GPU, or the CPU in
    this process when there is none."""
    resume: bool = False
    overwrite: bool = False
    nodes: int = 1
    hostfile: Path | None = None
    launcher: Launcher = "deepspeed"
    master_port: int | None = None
    """None: a free port on a single node, 29500 on several."""
    master_addr: str | None = None
    node_rank: int | None = None
    dry_run: bool = False


@dataclass
class TrainOutcome:
    recipe: Recipe
    run_dir: Path
    replaced: list[Path]
    """What ``overwrite`` removes from the run directory (removed, except in a dry run)."""
    launch: list[str] | None = None
    """The launch command; None when training in this process."""
    result: TrainResult | None = None
    """The in-process run's result; None for a dry run or a launch."""
    exit_code: int = 0
    """The launched processes' exit status (0 in this process)."""


def _ignore(_text: str) -> None:
    pass


def start_training(
    req: TrainRequest,
    *,
    notify: Callable[[str], None] = _ignore,
    reporter: Callable[[Recipe], Reporter] | None = None,
    worker_reporter: str | None = None,
) -> TrainOutcome:
    """Train as ``req`` says; see the module's docstring. ``notify`` gets one-line notes (where
    training runs, what ``overwrite`` removed, the launch command); ``reporter`` makes the
    progress reporter of a run in this process from its recipe, and ``worker_reporter`` names
    (``MODULE:FACTORY``) the one rank 0 of launched workers makes (none: they show no progress)."""
    from ..fileio import atomic_write_text
    from .distributed import free_port
    from .launch import launch_command, run_launched, train_launch
    from .train_config import recipe_text
    from .trainer import check_recipe, check_run_dir, clear_earlier_run

    if req.resume and req.overwrite:
        raise UsageError("--resume continues the run and --overwrite starts it again: pass one of them")
    gpus = req.gpus if req.gpus is not None else _visible_gpus(req.nodes, notify)
    recipe = _resolve_recipe(req, gpus)
    check_recipe(recipe)
    run_dir = Path(recipe.train.run_dir)
    # once, here, before any worker starts: a dry run is refused (or told what --overwrite
    # would remove) exactly as the real run would be, and removes nothing
    replaced = check_run_dir(run_dir, resume=req.resume, overwrite=req.overwrite, recipe=recipe_text(recipe))
    outcome = TrainOutcome(recipe, run_dir, replaced)
    if gpus == 0:
        if not req.dry_run:
            view = reporter(recipe) if reporter is not None else None
            outcome.result = train_in_this_process(recipe, resume=req.resume, overwrite=req.overwrite, reporter=view)
        return outcome

    if not req.dry_run and recipe.train.device != "cpu" and req.nodes == 1 and req.hostfile is None:
        _check_gpus_visible(gpus)
    recipe_file = run_dir / "recipe.yaml"
    port = req.master_port or (free_port() if req.nodes == 1 else 29500)
    spec = train_launch(
        gpus, recipe_file, resume=req.resume, nodes=req.nodes, hostfile=req.hostfile, launcher=req.launcher,
        master_port=port, master_addr=req.master_addr, node_rank=req.node_rank, reporter=worker_reporter,
    )
    outcome.launch = launch_command(spec)
    if req.dry_run:
        return outcome
    if req.overwrite and replaced:
        clear_earlier_run(run_dir)  # the workers then find a directory with no earlier results
        notify(f"--overwrite: removed the earlier run's {', '.join(p.name for p in replaced)} in {run_dir}")
    atomic_write_text(recipe_file, recipe_text(recipe))
    notify(f"launching {gpus} process(es) per node on {req.nodes} node(s): {' '.join(outcome.launch)}")
    outcome.exit_code = run_launched(outcome.launch)
    return outcome


def train_in_this_process(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """:func:`~cores_cli.engine.trainer.run_training` in this process (``cores train --gpus 0``,
    and each launched worker); the reporter is closed and the process group this run started is
    shut down afterwards, whatever happened."""
    from .deepspeed_setup import select_accelerator
    from .distributed import shutdown
    from .trainer import run_training, training_device

    # before anything imports deepspeed: it picks its accelerator once, at import
    select_accelerator(training_device(recipe.train).type)
    try:
        return run_training(recipe, resume=resume, overwrite=overwrite, reporter=reporter)
    finally:
        if reporter is not None:
            reporter.close()
        shutdown()


def _visible_gpus(nodes: int, notify: Callable[[str], None]) -> int:
    """No ``--gpus``: one process per visible GPU, or the CPU in this process."""
    import torch

    visible = torch.cuda.device_count()
    if visible:
        per_node = " per node" if nodes > 1 else ""
        notify(f"no --gpus: {visible} visible GPU(s), launching {visible} process(es){per_node}")
    else:
        notify("no --gpus and no visible GPU: training on the CPU in this process")
    return visible


def _resolve_recipe(req: TrainRequest, gpus: int) -> Recipe:
    from .train_config import load_recipe

    overrides = list(req.overrides)
    if req.run_dir is not None:
        overrides.append(f"train.run_dir={req.run_dir}")
    if req.data_root is not None:
        overrides.append(f"data.root={req.data_root}")
    if gpus == 0:
        overrides.append("train.device=cpu")
    source = req.recipe
    if source is None and req.resume:
        if req.run_dir is None:
            raise UsageError("--resume needs --run-dir (or the --recipe of the run)")
        saved = req.run_dir / "recipe.yaml"
        if not saved.is_file():
            raise CoresError(f"--resume: {saved} not found (nothing to resume in {req.run_dir})")
        source = str(saved)
    return load_recipe(source or DEFAULT_RECIPE, overrides)


def _check_gpus_visible(gpus: int) -> None:
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        raise CoresError(f"--gpus {gpus} but no CUDA GPU is visible; use --gpus 0 to train on the CPU")
    if gpus > visible:
        raise CoresError(f"--gpus {gpus} but only {visible} CUDA GPU(s) are visible")

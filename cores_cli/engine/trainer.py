"""The training loop: recipe → data → model → DeepSpeed engine → steps, validation, checkpoints.

One function, :func:`run_training`, used the same way by ``cores train --gpus 0`` (in the CLI's
own process) and by every process a launcher starts (``cores_cli.engine.train_worker``), both
through :func:`cores_cli.engine.train_run.train_in_this_process`. Progress
goes to a :class:`Reporter` (the CLI's Rich view; nothing by default), metrics to
``RUN/metrics.jsonl`` and the other trackers of ``train.report_to`` (TensorBoard, W&B), all
from rank 0.

Order within a step: ``grad_accumulation`` micro-batches (DeepSpeed accumulates, clips and
steps the optimizer and the schedule at the boundary), then validation if due, then the
checkpoint if due. A resumed run restores the weights, AdamW moments, schedule position, RNG
states and the data position, so on the CPU it reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from ..configio import to_dict
from ..errors import CoresError
from ..fileio import TEMPORARY_PATTERN, atomic_write_text
from ..model.precision import cast_for_run
from ..runtime import resolve_device
from .train_config import Recipe, TrainConfig, recipe_text

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ reporting


@dataclass
class RunInfo:
    run_dir: Path
    total_steps: int
    start_step: int
    world_size: int
    device: str
    dtype: str
    zero_stage: int
    global_batch: int
    trainable_params: int
    mixture: list[dict[str, Any]]
    val_samples: int
    resumed_from: str | None


@dataclass
class StepReport:
    step: int
    total_steps: int
    losses: dict[str, float]
    """``loss`` and its parts (``ce``, ``bce``, ``dice``, …), averaged over the step's micro-batches and ranks."""
    lr: float
    samples_per_s: float
    step_s: float
    elapsed_s: float
    eta_s: float
    samples_seen: int


@dataclass
class EvalReport:
    step: int
    metrics: dict[str, Any]
    best_giou: float | None
    is_best: bool
    seconds: float


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    last_checkpoint: Path | None
    best_giou: float | None
    best_step: int | None
    last_losses: dict[str, float] = field(default_factory=dict)


class Reporter(Protocol):
    def start(self, info: RunInfo) -> None: ...
    def step(self, report: StepReport) -> None: ...
    def evaluating(self, total: int) -> None: ...
    def eval_progress(self, n: int) -> None: ...
    def evaluated(self, report: EvalReport) -> None: ...
    def saved(self, path: Path, step: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    def start(self, info: RunInfo) -> None: pass
    def step(self, report: StepReport) -> None: pass
    def evaluating(self, total: int) -> None: pass
    def eval_progress(self, n: int) -> None: pass
    def evaluated(self, report: EvalReport) -> None: pass
    def saved(self, path: Path, step: int) -> None: pass
    def message(self, text: str) -> None: pass
    def close(self) -> None: pass


class MetricsLog:
    """Each step's and each validation's record, to every backend of ``train.report_to``
    (``engine/trackers.py``): ``metrics.jsonl`` always, TensorBoard and W&B when chosen.

    On resume ``metrics.jsonl`` is cut back to the checkpoint's step first (one atomic
    rewrite) and TensorBoard hides its later events: the resumed run redoes them. ``config``
    (the resolved recipe) becomes the W&B run's config. Created on rank 0 only.
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        *,
        report_to: list[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from .trackers import open_trackers

        self.path = run_dir / "metrics.jsonl"
        self.trackers = open_trackers(run_dir, report_to, tensorboard=tensorboard, resume_step=resume_step, config=config)

    def write(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        """Every tracker is closed, even after one fails (the first failure is raised then)."""
        trackers, self.trackers = self.trackers, []
        failures = []
        for tracker in reversed(trackers):
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - raised below, after the others are closed
                failures.append(exc)
        if failures:
            raise failures[0]


# ------------------------------------------------------------------------------ checks


def check_recipe(recipe: Recipe) -> None:
    """Mistakes worth catching before anything heavy is loaded."""
    m, t = recipe.model, recipe.train
    if t.require_pretrained and (not m.mllm.path or not (m.sam.checkpoint or t.init_from)):
        missing = " and ".join(k for k, v in (("model.mllm.path", m.mllm.path), ("model.sam.checkpoint", m.sam.checkpoint or t.init_from)) if not v)
        raise CoresError(
            f"this recipe fine-tunes pretrained LLaVA and SAM weights: set {missing} "
            "(or train.require_pretrained=false to start from random weights)"
        )
    if t.embedding_cache and "sam_image_encoder" in m.train_extra:
        raise CoresError("train.embedding_cache needs a frozen SAM image encoder, but model.train_extra makes it trainable")
    from .trackers import check_backends

    check_backends(t.report_to, t.tensorboard)  # a listed tracker that is not installed


def training_device(cfg: TrainConfig) -> torch.device:
    """``train.device`` resolved as every command's device is (``auto``: CUDA when visible)."""
    return resolve_device(cfg.device, setting="train.device", hint="use --gpus 0 to train on the CPU")


def run_dir_has_checkpoints(run_dir: Path) -> bool:
    from .train_state import complete_step_dirs

    return bool(complete_step_dirs(run_dir / "checkpoints"))


# ------------------------------------------------------------------------------ the run directory
# A fresh run must not mix with an earlier one's files (a run killed before its first checkpoint
# and started again used to append to the old metrics.jsonl). What a run writes into RUN (see
# train_state's layout): recipe.yaml, written at every start (a different one already there is
# replaced only with --overwrite); metrics.jsonl; checkpoints/ (possibly a link to another disk:
# emptied, the link kept); tensorboard/; and temporaries of atomic writes (.NAME.*.tmp).
# --overwrite removes those, and inside checkpoints/ and tensorboard/ only names a run writes; any
# other file stops it, and files of the user's own beside them in RUN are never touched.

RESULT_FILES = ("metrics.jsonl",)
RESULT_DIRS = ("checkpoints", "tensorboard")
_ATOMIC_TMP = re.compile(TEMPORARY_PATTERN.format(name=r"(recipe\.yaml|metrics\.jsonl)"))
_CHECKPOINTS_ENTRY = re.compile(
    r"^(step-\d+|latest|best|best\.json|best\.old|step-\d+\.old|\.(step-\d+|latest|best|best\.json)\..*\.(tmp|old))$"
)
_TENSORBOARD_ENTRY = re.compile(r"^events\.out\.tfevents\..+$")


def earlier_run_outputs(run_dir: Path) -> list[Path]:
    """The results an earlier run left in ``run_dir`` (metrics, checkpoints, TensorBoard events);
    empty for a new or empty directory. ``recipe.yaml`` alone is not one: it holds no results, and
    the launcher of ``--gpus N`` writes it before its workers check (:func:`check_run_dir` compares
    it with the run's own)."""
    found = [run_dir / f for f in RESULT_FILES if (run_dir / f).is_file()]
    found += [run_dir / d for d in RESULT_DIRS if (run_dir / d).is_dir() and any((run_dir / d).iterdir())]
    return found


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, recipe: str | None = None) -> list[Path]:
    """Whether a run may start in ``run_dir``: a CoresError naming the way out when not.

    Returns what ``--overwrite`` will remove (:func:`clear_earlier_run`). Called once by the
    process ``cores train`` runs in, before any worker starts, and again by every worker.
    ``recipe`` is the ``recipe.yaml`` text this run will write: a fresh run does not replace
    another one (a user's hand-written recipe, an earlier start with other settings) without
    ``--overwrite``."""
    from .train_state import find_resume_checkpoint

    if resume and overwrite:
        raise CoresError("--resume continues the run and --overwrite starts it again: pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise CoresError(f"the run directory {run_dir} is a file: choose another --run-dir")
    earlier = earlier_run_outputs(run_dir)
    saved = run_dir / "recipe.yaml"
    if not resume and recipe is not None and saved.is_file() and saved.read_bytes() != recipe.encode("utf-8"):
        if not overwrite:
            raise CoresError(
                f"{saved} holds another recipe than this run's (a recipe of yours, or an earlier start with other "
                "settings): pass --overwrite to replace it, or choose another run directory"
            )
        earlier = [saved, *earlier]  # replaced by the new recipe: listed so that the user is told
    if resume:
        if find_resume_checkpoint(run_dir / "checkpoints") is None:
            hint = f"; it holds an earlier run's {_names(earlier)}: pass --overwrite instead to start again" if earlier else ""
            raise CoresError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} (nothing to resume){hint}")
        return []
    if not earlier:
        return []
    if not overwrite:
        if run_dir_has_checkpoints(run_dir):
            raise CoresError(
                f"{run_dir} already holds checkpoints: pass --resume to continue that run, --overwrite to start again "
                f"(replacing its {_names(earlier)}), or choose another run directory"
            )
        raise CoresError(
            f"{run_dir} already holds an earlier run's {_names(earlier)} (stopped before its first checkpoint): "
            "pass --overwrite to start again (replacing them), or choose another run directory"
        )
    for folder, allowed in (("checkpoints", _CHECKPOINTS_ENTRY), ("tensorboard", _TENSORBOARD_ENTRY)):
        strange = sorted(p.name for p in (run_dir / folder).iterdir() if not allowed.match(p.name)) if (run_dir / folder).is_dir() else []
        if strange:
            raise CoresError(f"--overwrite: {run_dir / folder / strange[0]} is not something a training run writes; move it away first (nothing was removed)")
    return earlier + sorted(p for p in run_dir.iterdir() if _ATOMIC_TMP.fullmatch(p.name))


def clear_earlier_run(run_dir: Path) -> list[Path]:
    """Remove an earlier run's results for ``--overwrite`` (after :func:`check_run_dir` allowed it).
    The checkpoints go first and metrics.jsonl last, so a kill part-way leaves a directory that
    is still refused without --overwrite rather than one that looks new."""
    removed = check_run_dir(run_dir, resume=False, overwrite=True)
    for path in sorted(removed, key=lambda p: p.name == "metrics.jsonl"):
        if path.is_symlink() and path.is_dir():
            # checkpoints/ linked to a bigger disk: empty it (its entries were checked), keep the link
            for child in path.iterdir():
                _remove(child)
        else:
            _remove(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths)


# ------------------------------------------------------------------------------ the loop


def run_training(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train as the recipe says. All ranks call this; only rank 0 writes files and reports.

    A run directory holding an earlier run's results is refused unless ``resume`` (continue it)
    or ``overwrite`` (remove them first, just before this run writes its own). ``overwrite`` is
    for a caller running alone: ``cores train --gpus N`` clears the directory in the launching
    process and its workers get no ``overwrite``."""
    from . import deepspeed_setup as ds
    from . import train_state as ts
    from .distributed import init_distributed, mean_across_ranks

    reporter = reporter or NullReporter()
    cfg = recipe.train
    check_recipe(recipe)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    replaced = _names(check_run_dir(run_dir, resume=resume, overwrite=overwrite, recipe=recipe_text(recipe)))
    resume_from = ts.find_resume_checkpoint(ckpt_root) if resume else None

    ds.skip_unused_cpu_ops(training_device(cfg).type)  # no C++ build before step 1
    ds.announce_op_builds(training_device(cfg).type, reporter.message)  # any other build is said, with its cause and cache
    proc = init_distributed(training_device(cfg), start_alone=True, deepspeed=True)
    device = proc.device
    _quiet_deepspeed()
    dtype = ds.train_dtype(cfg, device)

    # Data first: a recipe naming a missing dataset fails here, before the model is built.
    from ..data.registry import load_samples
    from ..processing.mixture import load_mixture

    mixture = load_mixture(recipe.data, seed=cfg.seed)
    val = recipe.data.val
    val_samples = load_samples(val.dataset, recipe.data.root, **dict(val.options)) if val.dataset else []

    saved_state = None
    if resume_from is not None:
        saved_state = ts.read_train_state(resume_from)
        if saved_state[0].step > cfg.steps:
            raise CoresError(f"{resume_from} is at step {saved_state[0].step}, past train.steps={cfg.steps}; raise train.steps to continue")

    model = _build_model(recipe, resume_from, dtype, device)
    if cfg.init_from and resume_from is None:
        from .checkpoint import load_initial_weights
        from .loading import resolve_checkpoint

        required = () if recipe.model.sam.checkpoint else ("sam.",)
        reporter.message(load_initial_weights(model, resolve_checkpoint(cfg.init_from), required).summary())
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing works with frozen embeddings (no input grads needed)
        model.llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.embedding_cache:
        from .embedding_cache import attach_embedding_cache

        attach_embedding_cache(model, cfg.embedding_cache)
    prepare_for_training(model, dtype, device)
    engine = ds.build_engine(model, cfg, cfg.steps, dtype, device)

    state = ts.TrainState(world_size=proc.world)
    if saved_state is not None:
        state = _restore(engine, model, saved_state, proc, reporter, cfg.seed)
    else:
        ts.seed_everything(cfg.seed + proc.rank)  # dropout etc. differ per rank, the init did not

    metrics = None
    if proc.is_main:
        if overwrite and replaced:
            # as late as possible: a recipe or dataset mistake found above costs no earlier run
            clear_earlier_run(run_dir)
            reporter.message(f"--overwrite: removed the earlier run's {replaced} in {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", recipe_text(recipe))
        ts.remove_partial_writes(ckpt_root)
        resume_step = state.step if resume_from is not None else None
        metrics = MetricsLog(run_dir, cfg.tensorboard, resume_step, report_to=cfg.report_to, config=to_dict(recipe))

    loader, batches = _loader(recipe, model, mixture, state, proc)
    global_batch = cfg.micro_batch_size * cfg.grad_accumulation * proc.world
    reporter.start(
        RunInfo(
            run_dir=run_dir,
            total_steps=cfg.steps,
            start_step=state.step,
            world_size=proc.world,
            device=str(device),
            dtype=str(dtype).replace("torch.", ""),
            zero_stage=cfg.zero_stage,
            global_batch=global_batch,
            trainable_params=sum(p.numel() for _, p in ds.trainable_named(model)),
            mixture=mixture.describe(),
            val_samples=len(val_samples),
            resumed_from=str(resume_from) if resume_from else None,
        )
    )

    exemplars = _exemplars(model, cfg.seed)
    start_step = state.step
    last_ckpt: Path | None = resume_from
    losses: dict[str, float] = {}
    durations: deque[float] = deque(maxlen=20)
    run_start = time.perf_counter() - state.elapsed_s
    iterator = iter(loader)
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = ds.current_lr(engine)  # the lr this step's update uses
            sums: dict[str, float] = {}
            for _ in range(cfg.grad_accumulation):
                batch = next(iterator).to(device, dtype)
                out = engine(batch)
                engine.backward(out.loss)
                engine.step()
                for k, v in out.loss_parts().items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.grad_accumulation
            losses = mean_across_ranks(sums, device)
            state.step = step
            state.samples_consumed = batches.consumed_after(step - start_step)
            step_s = time.perf_counter() - t0
            durations.append(step_s)
            state.elapsed_s = time.perf_counter() - run_start
            avg = sum(durations) / len(durations)
            report = StepReport(step, cfg.steps, losses, lr, global_batch / avg, step_s, state.elapsed_s, avg * (cfg.steps - step), state.samples_consumed)
            if metrics is not None:
                metrics.write({"kind": "train", "step": step, **losses, "lr": lr, "samples_per_s": report.samples_per_s, "step_s": step_s, "elapsed_s": state.elapsed_s, "samples_seen": state.samples_consumed})
            reporter.step(report)

            last = step == cfg.steps
            if val_samples and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                _validate(engine.module, recipe, val_samples, exemplars, state, step, proc, metrics, reporter)
            if last or step % cfg.save_every == 0:
                last_ckpt = _save(engine, model, recipe, state, proc, reporter)
    finally:
        if metrics is not None:
            metrics.close()
    return TrainResult(run_dir, state.step, last_ckpt, state.best_giou, state.best_step, losses)


def prepare_for_training(model, dtype: torch.dtype, device: torch.device) -> None:
    """The model on ``device`` under the numeric policy eval/predict use (``cast_for_run``),
    in train mode, ready for ``deepspeed.initialize``: DeepSpeed casts parameters only and
    keeps buffers as they are, so the position buffers stay fp32 in training too."""
    cast_for_run(model, dtype, device)
    model.train()


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def _build_model(recipe: Recipe, resume_from: Path | None, dtype: torch.dtype, device: torch.device | None = None):
    from ..model.builder import build_model
    from .checkpoint import load_checkpoint

    # The same seed on every rank gives every rank the same initial weights.
    torch.manual_seed(recipe.train.seed)
    if resume_from is not None:
        model, _ = load_checkpoint(resume_from, overrides=recipe.model, dtype=dtype, device=device)
        return model
    # at the run's dtype, on the rank's device, from the start: no process holds an fp32 copy
    # of the frozen weights, nor a host copy of what goes to its GPU
    return build_model(recipe.model, dtype=dtype, device=device)


def _restore(engine, model, saved, proc, reporter: Reporter, seed: int):
    from . import deepspeed_setup as ds
    from . import train_state as ts

    state, optimizer, rng = saved
    ds.import_optimizer_state(engine, model, optimizer, state.optimizer_steps)
    ds.load_scheduler_state(engine, state.scheduler)
    engine.global_steps = state.step
    engine.global_samples = state.samples_consumed
    if proc.rank < len(rng) and proc.rank < len(state.rng):
        ts.restore_rng(state.rng[proc.rank], rng[proc.rank])
    else:
        ts.seed_everything(seed + proc.rank + 1000003 * state.step)
        if proc.is_main:
            reporter.message(f"the checkpoint was written by {len(rng)} processes, this run has {proc.world}: new ranks get fresh random states")
    if state.world_size != proc.world and proc.is_main:
        reporter.message(f"resuming a {state.world_size}-process run on {proc.world} processes: the data stream continues, per-step batches differ in size")
    state.world_size = proc.world
    return state


def _loader(recipe: Recipe, model, mixture, state, proc):
    from torch.utils.data import DataLoader

    from ..processing.mixture import MixtureDataset, StreamBatches
    from ..processing.transform import SampleTransform, collate

    cfg = recipe.train
    # with the embedding cache, each image carries the digest that names its entry (cheaper than hashing the input tensor)
    transform = SampleTransform.for_model(model, _exemplars(model, cfg.seed), train=True, seed=cfg.seed, sam_digests=bool(cfg.embedding_cache))
    dataset = MixtureDataset(mixture, transform, cfg.seed)
    batches = StreamBatches(state.samples_consumed, cfg.steps - state.step, cfg.micro_batch_size, cfg.grad_accumulation, proc.rank, proc.world)
    workers = recipe.data.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=partial(collate, pad_token_id=model.tokenizer.pad_token_id),
        num_workers=workers,
        # its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run would see different dropout masks than the uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    return loader, batches


def _exemplars(model, seed: int):
    from .loading import exemplar_sampler

    return exemplar_sampler(model, None, seed)


def _validate(module, recipe: Recipe, samples, exemplars, state, step: int, proc, metrics: MetricsLog | None, reporter: Reporter) -> None:
    from . import train_state as ts
    from .evaluate import evaluate

    val = recipe.data.val
    if proc.is_main:
        reporter.evaluating(len(samples))
    result = evaluate(
        module,
        samples,
        batch_size=val.batch_size,
        mode=val.mode,
        exemplars=exemplars,
        seed=recipe.train.seed,
        progress=reporter.eval_progress if proc.is_main else None,
    )
    giou = result.metrics.get("giou")
    is_best = giou is not None and (state.best_giou is None or giou > state.best_giou)
    if is_best:
        state.best_giou, state.best_step = float(giou), step
    if proc.is_main:
        plain = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) or v is None}
        if is_best:
            ts.write_best(module, Path(recipe.train.run_dir) / "checkpoints", step, plain, extra={"recipe": to_dict(recipe)})
        if metrics is not None:
            metrics.write({"kind": "eval", "step": step, **{k: v for k, v in plain.items() if v is not None}, "best_giou": state.best_giou, "eval_s": result.seconds})
        reporter.evaluated(EvalReport(step, plain, state.best_giou, is_best, result.seconds))


def _save(engine, model, recipe: Recipe, state, proc, reporter: Reporter) -> Path:
    from . import deepspeed_setup as ds
    from . import train_state as ts
    from .distributed import barrier, gather_objects

    tensors, steps = ds.export_optimizer_state(engine, model)  # collective under ZeRO
    state.optimizer_steps = steps
    state.scheduler = ds.scheduler_state(engine)
    plain, rng_tensors = ts.capture_rng()
    everyone = gather_objects((plain, rng_tensors))
    state.rng = [p for p, _ in everyone]
    root = Path(recipe.train.run_dir) / "checkpoints"
    path = root / ts.step_name(state.step)
    if proc.is_main:
        path = ts.write_training_checkpoint(model, root, state, tensors, [t for _, t in everyone], extra={"recipe": to_dict(recipe)})
        ts.prune(root, recipe.train.keep_checkpoints)
        reporter.saved(path, state.step)
    barrier()
    return path

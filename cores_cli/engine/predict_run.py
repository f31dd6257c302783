"""One ``cores predict`` run as a library call: lock the output folder, load the model once,
predict and write every item, report each through a :class:`PredictReporter`.

The command line only parses options, renders what the reporter is told, and turns the
:class:`PredictOutcome` into an exit status.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..bundled import EMBEDDED_SOURCE, is_synthetic_scene_size, synthetic_only_warning
from ..errors import CoresError
from ..images import DEFAULT_MAX_PIXELS
from .batch_predict import Job, OutputNamer, OutputOptions, StopSignals, output_dir_lock, prepare_job, remove_stale_temporaries
from .image_pipeline import Outcome, default_workers, prefetch, prepare_path
from .predictor import Mode


@dataclass
class PredictRequest:
    out: Path
    checkpoint: str | Path | None = None
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    context_library: Path | None = None
    seed: int = 0
    mode: Mode = "teacher"
    style: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    outputs: OutputOptions = field(default_factory=OutputOptions)
    """Which files each item gets (``--no-png``, ``--no-overlay``, ``--overlay-format``...)."""
    quantize: str | None = None
    """``8bit``/``4bit``: the LLaVA loaded through bitsandbytes (CUDA)."""
    device_map: str | None = None
    """``auto``: the LLaVA spread over the visible GPUs."""
    workers: int | None = None
    """Processes that read and prepare images ahead of the model (``--workers``); 0: all in
    this process, one image at a time; None: :func:`~cores_cli.engine.image_pipeline.default_workers`."""


class PredictReporter(Protocol):
    def warning(self, message: str) -> None: ...
    def started(self, total: int | None) -> None:
        """The model is loaded; ``total`` items follow (None: read from a stream)."""
    def item_done(self, record: dict) -> None:
        """An item's files are in place; called while a stop signal waits."""
    def item_failed(self, job: Job, error: CoresError) -> None: ...
    def finished(self) -> None: ...


@dataclass
class PredictOutcome:
    done: list[dict] = field(default_factory=list)
    """The records of the items written, in order."""
    failed: list[Job] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.failed)


def run_predict(request: PredictRequest, jobs: Iterable[Job], total: int | None, reporter: PredictReporter, outcome: PredictOutcome | None = None) -> PredictOutcome:
    """Predict every job into ``request.out``. A bad item is reported and the rest go on;
    SIGINT/SIGTERM raise :class:`~cores_cli.engine.batch_predict.Interrupted` between items
    (``outcome``, when given, then holds what was written). The folder must already exist
    (:func:`~cores_cli.engine.batch_predict.prepare_output_dir`)."""
    from .loading import load_predictor

    outcome = outcome if outcome is not None else PredictOutcome()
    out = request.out
    with output_dir_lock(out), StopSignals() as signals:
        # the leftovers of a killed run are ours to remove, and only under the lock
        stale = remove_stale_temporaries(out)
        if stale:
            reporter.warning(f"removed {len(stale)} unfinished file{'s' if len(stale) != 1 else ''} that an interrupted run left in {out}")
        predictor, loaded, model_info = load_predictor(
            request.checkpoint,
            request.preset,
            request.overrides,
            request.device,
            request.dtype,
            request.context_library,
            request.seed,
            quantize=request.quantize,
            device_map=request.device_map,
        )
        if loaded.random_weights:
            reporter.warning(f"{loaded.source}: masks are meaningless; use --checkpoint for real predictions")
        if loaded.report is not None and loaded.report.unexpected:
            reporter.warning(f"checkpoint has tensors the model does not use: {loaded.report.summary()}")
        jobs = list(jobs) if total is not None else jobs
        # a folder's or glob's files are all known up front: no output may land on one of them
        namer = OutputNamer(out, [j.image for j in jobs] if total is not None else [], predictor.reserved_tokens(), request.outputs.suffixes())
        cautioned = loaded.source != EMBEDDED_SOURCE  # only the shipped model needs the caution
        workers = request.workers if request.workers is not None else default_workers(predictor.param.device.type == "cuda")
        if total is not None:
            workers = min(workers, total - 1)  # one image has nothing to overlap with
        reporter.started(total)
        try:
            with contextlib.closing(_images(jobs, predictor, workers, request.max_pixels)) as items:
                _predict_all(items, request, predictor, namer, model_info, reporter, signals, outcome, cautioned)
        finally:
            reporter.finished()
    return outcome


def _images(jobs: Iterable[Job], predictor, workers: int, max_pixels: int):
    """Each job with its image read and prepared in a worker (``workers`` > 0), in order; with
    no workers each job as it comes (``prepare_job`` reads its image)."""
    if workers <= 0:
        return (Outcome(job, skipped=True) for job in jobs)
    # a job whose line was unusable has no image to read; it fails when it is named
    return prefetch(jobs, prepare_path, {"transform": predictor.transform}, workers, argument=lambda j: None if j.error else (j.image, max_pixels))


def _predict_all(items, request: PredictRequest, predictor, namer: OutputNamer, model_info, reporter: PredictReporter, signals: StopSignals, outcome: PredictOutcome, cautioned: bool) -> None:
    for item in items:  # a signal while waiting for the next stdin line stops here
        job = item.item
        try:
            # named first, then the image's own error: the order of the serial path
            paths = namer.paths_for(job)
            staged = prepare_job(predictor, job, paths, request.mode, request.style, request.max_pixels, model_info, request.outputs, prepared=item.get())
            try:
                # a signal waits while the files move into place and the item is reported
                with signals.deferred():
                    outcome.done.append(staged.commit())
                    reporter.item_done(outcome.done[-1])
                size = outcome.done[-1]["image_size"]
                if not cautioned and not is_synthetic_scene_size(size["height"], size["width"]):
                    cautioned = True
                    reporter.warning(synthetic_only_warning(f"{job.image} ({size['width']}×{size['height']})"))
            except BaseException:
                staged.discard()  # temporaries not yet moved; nothing once committed
                raise
        except CoresError as exc:
            outcome.failed.append(job)
            reporter.item_failed(job, exc)
        signals.check()

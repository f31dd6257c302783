"""A whole ``cores eval`` run: :func:`run_eval` checks the outputs, reads the samples and their
warnings, launches the processes or joins their group, evaluates, and writes the results; what
the user sees goes to an :class:`EvalView` (the command's terminal rendering).

Outputs (all atomic):

- ``--output results.json``: ``{"dataset", "protocol", "metrics", "warnings", "model",
  "seconds", ...}``; ``warnings`` counts the evaluated samples with reader warnings by kind
  (:data:`~cores_cli.data.records.WARNING_KINDS`) and lists their ids and messages;
- beside it (or at ``--per-sample``) a JSONL with one line per target: id, sample_id, query,
  class_name, intersection, union, iou, size bucket, area_fraction (and ``warnings``, the kinds,
  for a sample that has some); the aggregate metrics can be recomputed from it alone
  (:func:`metrics_from_records`); with ``--save-masks`` each line also holds the predicted
  mask as COCO RLE (``mask_rle``), so any other metric can be recomputed from it. The file
  grows while evaluating, a batch at a time, so that an interrupted run can be resumed from it
  (see below), and is rewritten in the samples' order at the end;
- ``--save-vis N``: PNGs of the N lowest-IoU targets, prediction filled and ground truth
  outlined, with a legend and the whole query below the image.

Resuming (``--resume``): the same command after an interruption continues from the per-target
file: samples whose every target is in it are not evaluated again, and the results are those
of an uninterrupted run. Beside the file, ``.NAME.resume.json`` holds what identifies the
evaluation (:func:`run_fingerprint`: dataset, reader options, limit, mode, seed, model and its
files, overrides, exemplar library, dtype, ``--save-masks``); a file written for another
evaluation is refused. The batch size and the number of processes may change between the runs
(they decide how fast, not what is computed). Without ``--resume`` an existing per-target file
is replaced, as it always was, by the run's own from the moment the evaluation starts.

Where things can go wrong, they do so before the model runs: :func:`check_outputs` refuses
output paths that cannot be written (a folder given as a file, a parent that is a file, a
read-only place), that name an input, or that lie in a folder of the dataset's files (see
:func:`protected_folders`), and ``strict`` refuses samples with reader warnings. A query
holding a chain or image token has them removed, with a warning (by the registry). A
sample whose image turns out unreadable while evaluating is left out of the metrics and
reported as an ``unreadable_image`` warning; ``strict`` then fails after the results are
printed and written. A write that still fails after evaluating is reported per path
(:class:`OutputWriteError`), after every other output was attempted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .. import __version__
from ..bundled import EMBEDDED_SOURCE, synthetic_only_warning
from ..data.records import ReaderWarning, warning_kind
from ..data.registry import dataset_folders, load_samples, protocol
from ..errors import CoresError
from ..fileio import atomic_open, atomic_write_bytes, atomic_write_json, probe_writable, save_image_atomic
from ..model.mllm import LlavaLoading
from ..processing.transform import SampleTransform, sample_pixels
from ..visualize import comparison
from .evaluate import EvalResult, Mode, complete_samples, evaluate, pending
from .image_pipeline import PrefetchedSamples, default_workers
from .loading import LoadedModel, exemplar_sampler


@dataclass
class EvalRequest:
    dataset: str
    data_root: Path | None
    reader_options: dict[str, Any]
    batch_size: int = 8
    mode: Mode = "teacher"
    seed: int = 0
    limit: int | None = None
    output: Path | None = None
    per_sample: Path | None = None
    save_vis: int = 0
    vis_dir: Path | None = None
    context_library: Path | None = None
    strict: bool = False
    """Refuse to evaluate when any sample has a reader warning."""
    checkpoint: Path | None = None
    """A cores checkpoint; None: the shipped tiny model (or ``preset`` with random weights)."""
    preset: str | None = None
    model_overrides: list[str] = field(default_factory=list)
    """``key=value`` model settings (``--set``)."""
    device: str = "auto"
    dtype: str = "auto"
    processes: int = 1
    """Processes to evaluate in; more than 1 launches them (unless already launched)."""
    save_masks: bool = False
    """Each per-target record holds its predicted mask as COCO RLE."""
    resume: bool = False
    """Continue from the per-target file of an interrupted run of the same evaluation."""
    quantize: str | None = None
    """``8bit``/``4bit``: the LLaVA loaded through bitsandbytes (CUDA)."""
    device_map: str | None = None
    """``auto``: the LLaVA spread over the visible GPUs (one process)."""
    workers: int | None = None
    """Processes that read the images ahead of the model (``--workers``), in each evaluating
    process; 0: read in this process, one batch at a time; None:
    :func:`~cores_cli.engine.image_pipeline.default_workers`."""


@dataclass
class EvalRun:
    """What one evaluation computed, the same on every rank (``worst``: the N lowest-IoU
    targets of all ranks, with their predicted masks)."""

    result: EvalResult
    protocol: dict[str, Any]
    warnings: dict[str, Any]
    samples: list
    worst: list[tuple[float, str, np.ndarray]]
    summary: WarningSummary | None = None
    """What ``warnings`` holds, unreadable images included (set by :func:`compute_eval`)."""

    @property
    def left_out(self) -> dict[str, str]:
        """Samples left out of the metrics (id → why): their image could not be read."""
        return self.result.left_out


class OutputWriteError(CoresError):
    """Outputs that could not be written after the evaluation ran; ``failed`` lists them."""

    def __init__(self, failed: list[tuple[Path, OSError]]) -> None:
        first, err = failed[0]
        more = f" (and {len(failed) - 1} more file(s))" if len(failed) > 1 else ""
        super().__init__(f"could not write {first}: {err.strerror or err}{more}")
        self.failed = failed


def read_samples(req: EvalRequest) -> list:
    """Every sample the reader gives for ``req``, before ``--limit`` (queries cleaned of
    special tokens by :func:`~cores_cli.data.registry.load_samples`)."""
    samples = load_samples(req.dataset, req.data_root, **req.reader_options)
    if not samples:
        raise CoresError(f"{req.dataset}: no samples to evaluate")
    return samples


def limit_samples(req: EvalRequest, samples: list) -> list:
    """The samples ``--limit`` keeps."""
    return samples[: req.limit] if req.limit else samples


def load_eval_samples(req: EvalRequest) -> list:
    """The samples to evaluate: :func:`read_samples`, cut by ``--limit``."""
    return limit_samples(req, read_samples(req))


def read_and_check(req: EvalRequest) -> tuple[list, WarningSummary]:
    """The samples to evaluate and their warning summary, after the checks that need them: no
    output may be an input or lie in a folder of the dataset (:func:`check_outputs`)."""
    # inputs are listed from every sample read, before --limit cuts the list
    everything = read_samples(req)
    samples = limit_samples(req, everything)
    check_outputs(req, input_files(req, everything, req.checkpoint), protected_folders(req, everything))
    return samples, WarningSummary.of(samples)


# ------------------------------------------------------------------------- reader warnings


@dataclass
class WarningSummary:
    """The reader warnings of the evaluated samples, counted once per sample and kind."""

    n_samples: int
    sample_ids: dict[str, list[str]]
    """kind → ids of the samples with a warning of that kind, most frequent kind first."""
    examples: dict[str, str]
    """kind → its first message."""
    messages: dict[str, list[str]]
    """sample id → all its warnings."""

    @classmethod
    def of(cls, samples: list, left_out: dict[str, str] | None = None) -> WarningSummary:
        """``left_out``: samples whose image could not be read while evaluating (id → why),
        counted as ``unreadable_image``."""
        ids_by_kind: dict[str, list[str]] = {}
        examples: dict[str, str] = {}
        messages: dict[str, list[str]] = {}
        left_out = left_out or {}
        for s in samples:
            found = list(s.meta.get("warnings", ()))
            if s.sample_id in left_out:
                found.append(ReaderWarning("unreadable_image", f"{left_out[s.sample_id]}; left out of the metrics"))
            if not found:
                continue
            messages[s.sample_id] = [str(w) for w in found]
            for w in found:
                kind = warning_kind(w)
                ids = ids_by_kind.setdefault(kind, [])
                if not ids or ids[-1] != s.sample_id:
                    ids.append(s.sample_id)
                examples.setdefault(kind, str(w))
        kinds = sorted(ids_by_kind, key=lambda k: (-len(ids_by_kind[k]), k))
        return cls(len(samples), {k: ids_by_kind[k] for k in kinds}, examples, messages)

    @property
    def affected(self) -> int:
        """How many samples have at least one warning."""
        return len(self.messages)

    def counts(self) -> dict[str, int]:
        return {k: len(ids) for k, ids in self.sample_ids.items()}

    def to_json(self) -> dict[str, Any]:
        """The results JSON's ``warnings`` section."""
        return {"samples": self.affected, "counts": self.counts(), "sample_ids": self.sample_ids, "messages": self.messages}

    def headline(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.counts().items())
        return f"{self.affected} of {self.n_samples} samples have reader warnings ({kinds})"

    def lines(self, strict: bool = False, shown: int = 3, kinds: tuple[str, ...] | None = None) -> list[str]:
        """A terminal report: the headline, then per kind its first ``shown`` sample ids and
        its first message (only ``kinds``, when given). Empty when there is nothing to report."""
        if not self.affected:
            return []
        fate = "--strict refuses them" if strict else "they are scored as read (--strict would refuse them)"
        if "unreadable_image" in self.sample_ids:
            fate = "those with an unreadable image are left out of the metrics" + (", which --strict refuses" if strict else "") + "; any others are scored as read"
        out = [f"{self.headline()}; {fate}"]
        for kind, ids in self.sample_ids.items():
            if kinds is not None and kind not in kinds:
                continue
            listed = ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
            out.append(f"  {kind}: {listed} (e.g. {self.examples[kind]})")
        return out


def refuse_warnings(summary: WarningSummary) -> None:
    """``strict``: any reader warning stops the run before the model is loaded (the warnings
    are known from reading alone, and results over doubtful targets would mislead)."""
    if summary.affected:
        raise CoresError(f"--strict: {summary.headline()}; nothing was evaluated")


# --------------------------------------------------------------------------------- outputs


def per_sample_path(req: EvalRequest) -> Path | None:
    if req.per_sample is not None:
        return req.per_sample
    if req.output is not None:
        return req.output.with_name(req.output.stem + ".samples.jsonl")
    return None


def vis_path(req: EvalRequest) -> Path | None:
    """The folder of ``--save-vis`` overlays (None when none are asked for)."""
    if not req.save_vis:
        return None
    if req.vis_dir is not None:
        return req.vis_dir
    return req.output.parent / (req.output.stem + "_worst") if req.output else Path("cores_eval_worst")


def check_outputs(req: EvalRequest, inputs: list[Path] | None = None, folders: list[Path] | None = None) -> None:
    """Refuse, before any work, outputs that could not be written or would overwrite an input.

    A file output must not be a folder (or a device), its folder must be creatable and
    writable (the nearest existing ancestor is a folder where a file can be made), no two
    outputs may share a path, none may be one of ``inputs`` (see :func:`input_files`), and no
    output (the overlays' folder included) may lie in one of ``folders`` (see
    :func:`protected_folders`).
    """
    files = [(flag, path) for flag, path in (("--output", req.output), ("--per-sample", per_sample_path(req))) if path is not None]
    for flag, path in files:
        if path.is_dir():
            raise CoresError(f"{flag} {path} is a folder; give the path of a file to write")
        if path.exists() and not path.is_file():
            raise CoresError(f"{flag} {path} exists and is not a regular file; give the path of a file to write")
        _check_writable_folder(flag, path, path.parent)
    if len(files) == 2 and os.path.abspath(files[0][1]) == os.path.abspath(files[1][1]):
        raise CoresError(f"--output and --per-sample are the same file ({files[0][1]}); give them different names")
    vis = vis_path(req)
    if vis is not None:
        if vis.exists() and not vis.is_dir():
            raise CoresError(f"--vis-dir {vis} is a file; --save-vis needs a folder")
        _check_writable_folder("--vis-dir", vis, vis)
    for flag, path in files:
        clash = _same_file(path, inputs or [])
        if clash is not None:
            raise CoresError(f"{flag} {path} is one of the inputs ({clash}); write the results elsewhere")
    for flag, path in [*files, *([("--vis-dir", vis)] if vis is not None else [])]:
        folder = _inside(path, folders or [])
        if folder is not None:
            raise CoresError(f"{flag} {path} lies in {folder}, a folder of the dataset's files; write the results elsewhere")


def _check_writable_folder(flag: str, path: Path, folder: Path) -> None:
    """``folder`` exists and takes a new file, or can be created: checked in its nearest existing
    ancestor (:func:`~cores_cli.fileio.probe_writable`), creating nothing."""
    ancestor = Path(os.path.abspath(folder))
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CoresError(f"cannot write {flag} {path}: {ancestor} is a file, not a folder")
    try:
        probe_writable(ancestor)
    except OSError as e:
        raise CoresError(f"cannot write {flag} {path}: {ancestor}: {e.strerror or e}") from None


def protected_folders(req: EvalRequest, samples: list) -> list[Path]:
    """The folders no output may be written into: the dataset's folders in its layout
    (:func:`~cores_cli.data.registry.dataset_folders`) and every folder holding a sample's
    image or annotation file.

    Folders, not files: ``--limit``, ``subset`` and ``skip_missing`` leave some of a split's
    files out of the sample list (an annotation whose image is missing is in no sample), but
    they lie beside the files of the samples that are kept. A file written there would replace
    a dataset file, or be read as one by the next run (a JSON in a ReasonSeg split folder)."""
    found = {Path(f) for f in dataset_folders(req.dataset, req.data_root)}
    found.update(f.parent for f in _sample_files(samples))
    return sorted(found)


def _inside(path: Path, folders: list[Path]) -> Path | None:
    """The folder of ``folders`` that ``path`` is, or lies in (links followed), if any."""
    real = Path(os.path.realpath(path))
    for folder in folders:
        home = Path(os.path.realpath(folder))
        if real == home or home in real.parents:
            return folder
    return None


def input_files(req: EvalRequest, samples: list, checkpoint: Path | None = None) -> list[Path]:
    """The files an evaluation reads that an output must never replace: every sample's image
    and annotation file, a reader's class list, the exemplar library, and the checkpoint's own
    files."""
    found: list[Path] = [Path(req.context_library)] if req.context_library is not None else []
    if isinstance(req.reader_options.get("classes_file"), (str, os.PathLike)):
        found.append(Path(req.reader_options["classes_file"]))
    found += _sample_files(samples)
    if checkpoint is not None and Path(checkpoint).is_dir():
        ckpt = Path(checkpoint)
        found += [ckpt / "config.json", ckpt / "weights.safetensors"]
        for sub in ("tokenizer", "adapter"):
            if (ckpt / sub).is_dir():
                found += [p for p in (ckpt / sub).rglob("*") if p.is_file()]
    return found


def _sample_files(samples: list) -> list[Path]:
    """The files the samples were read from: each image (unless held in memory) and each
    annotation JSON. A generated sequence says it has none (reading every record to find out
    would render every synthetic scene)."""
    if getattr(samples, "reads_no_files", False):
        return []
    found = []
    for s in samples:
        if s.image_array is None:
            found.append(Path(s.image_path))
        if isinstance(s.meta.get("json"), str):
            found.append(Path(s.meta["json"]))
    return found


def _same_file(path: Path, candidates: list[Path]) -> Path | None:
    """The candidate that ``path`` already is (same file on disk), if any. Only names that
    match are compared on disk, so a long list of sample files costs no system calls."""
    try:
        real = Path(os.path.realpath(path))
        if not real.is_file():
            return None
    except OSError:
        return None
    names = {path.name, real.name}
    for c in candidates:
        if c.name in names:
            try:
                if os.path.samefile(c, real):
                    return c
            except OSError:
                continue
    return None


# ------------------------------------------------------------------------------ evaluation


def describe(req: EvalRequest, loaded: LoadedModel, n_samples: int, n_targets: int, world: int, left_out: int = 0) -> dict[str, Any]:
    cfg = loaded.model.cfg
    return {
        "dataset": req.dataset,
        "what": protocol(req.dataset, **req.reader_options),
        "mode": "teacher-forced (fixed answer template, one pass)" if req.mode == "teacher" else "generate (template fallback when no chain)",
        "samples": n_samples,
        "left_out": left_out,
        "targets": n_targets,
        "in_context_k": cfg.prompt.in_context_k,
        "chain": " → ".join(cfg.chain.tokens) + ("" if cfg.chain.segmenting else " (one pass)"),
        "threshold": "logits > 0 at the original image size",
        "processes": world,
        "seed": req.seed,
    }


def compute_eval(
    req: EvalRequest,
    loaded: LoadedModel,
    samples: list | None = None,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
    resume: ResumeState | None = None,
) -> EvalRun:
    """Evaluate (every rank takes its share) and gather what the outputs need. ``samples``
    defaults to :func:`load_eval_samples`; with ``req.strict``, reader warnings stop the run
    first. ``progress_factory`` gets the number of samples this process evaluates (its share
    under ``torch.distributed``, less those ``resume`` holds). With ``resume`` (see
    :func:`prepare_resume`) the per-target file is started and grows while evaluating; nothing
    else is written."""
    from .distributed import gather_objects, rank_info, shard

    samples = load_eval_samples(req) if samples is None else samples
    if req.strict:
        refuse_warnings(WarningSummary.of(samples))
    sampler = exemplar_sampler(loaded.model, req.context_library, req.seed)
    ranks = rank_info()
    world = ranks.world
    done, log = None, None
    if resume is not None:
        failed = None
        if ranks.is_main:
            try:
                TargetLog.start(resume, samples)
            except CoresError as e:
                failed = str(e)  # raised below, on every rank alike
        # a barrier (no rank appends before the file is started) that also hands every rank
        # the main process's view of what is done
        failed, done = gather_objects((failed, resume.done) if ranks.is_main else None)[0]
        if failed:
            raise CoresError(failed)
        log = TargetLog(partial_path(resume.path))
    todo = pending(samples, done)
    order = [todo[k] for k in shard(len(todo), ranks)]  # what evaluate() will ask for, in turn
    progress = progress_factory(len(order)) if progress_factory else None
    # the CPUs are shared by this machine's evaluating processes (torchrun sets LOCAL_WORLD_SIZE)
    inputs = _prefetched(req, loaded, samples, order, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    try:
        result = evaluate(
            loaded.model, inputs, batch_size=req.batch_size, mode=req.mode, exemplars=sampler, seed=req.seed,
            progress=progress, keep_worst=req.save_vis, log_left_out=False, save_masks=req.save_masks,
            done=done, on_records=log.append if log is not None else None,
        )
    finally:
        if isinstance(inputs, PrefetchedSamples):
            inputs.close()
    summary = WarningSummary.of(samples, result.left_out)
    proto = describe(req, loaded, len(samples), int(result.metrics["n"]), world, len(result.left_out))
    worst = result.worst
    if world > 1 and req.save_vis:
        # each rank kept its own N worst; rank 0 draws the N worst of them all
        parts = gather_objects(result.worst)
        worst = sorted((w for part in parts for w in (part or [])), key=lambda w: w[0])
    # every rank read the whole sample list, so the warnings are counted once, from it alone
    return EvalRun(result, proto, summary.to_json(), samples, worst[: req.save_vis], summary)


def _prefetched(req: EvalRequest, loaded: LoadedModel, samples: list, order: list[int], processes: int):
    """``samples`` with the images of ``order`` read ahead by worker processes (``req.workers``,
    default :func:`~cores_cli.engine.image_pipeline.default_workers`), or ``samples`` itself
    when there are none. The masks and scores are the same either way."""
    on_gpu = next(loaded.model.parameters()).device.type == "cuda"
    workers = min(req.workers if req.workers is not None else default_workers(on_gpu, processes), len(order) - 1)
    if workers <= 0:  # also one sample or none: nothing to overlap with
        return samples
    step = req.batch_size if req.mode == "teacher" else 1
    # a whole batch is asked for before it runs: read the next one while this one does
    transform = SampleTransform.for_model(loaded.model, with_targets=False)  # the Predictor's image(), in the workers
    return PrefetchedSamples(samples, order, workers, ahead=2 * step + workers, transform=transform)


def results_document(req: EvalRequest, loaded: LoadedModel, run: EvalRun, per_sample_file: Path | None) -> dict[str, Any]:
    """What ``--output`` holds."""
    return {
        "cores_version": __version__,
        "dataset": req.dataset,
        "protocol": run.protocol,
        "metrics": run.result.metrics,
        "warnings": run.warnings,
        "model": {"source": loaded.source, "preset": loaded.model.cfg.preset, "random_weights": loaded.random_weights},
        "per_sample": str(per_sample_file) if per_sample_file else None,
        "seconds": round(run.result.seconds, 3),
    }


def write_outputs(req: EvalRequest, loaded: LoadedModel, run: EvalRun) -> list[Path]:
    """Write every output the request names (call on the main process); returns what was
    written. A failed write does not stop the others: all are attempted, then
    :class:`OutputWriteError` lists the failures."""
    failed: list[tuple[Path, OSError]] = []
    written: list[Path] = []
    samples_file = per_sample_path(req)
    if samples_file is not None:
        try:
            with atomic_open(samples_file) as fh:
                for r in run.result.records:
                    fh.write(_jsonl(r))
            written.append(samples_file)
            # the run's own growing copy is complete in the file now (the fingerprint stays, for --resume)
            partial_path(samples_file).unlink(missing_ok=True)
        except OSError as e:
            failed.append((samples_file, e))
            samples_file = None
    if req.output is not None:
        try:
            atomic_write_json(req.output, results_document(req, loaded, run, samples_file))
            written.append(req.output)
        except OSError as e:
            failed.append((req.output, e))
    vis = vis_path(req)
    if vis is not None:
        done, errors = _draw(vis, run.samples, run.worst)
        written += done
        failed += errors
    if failed:
        raise OutputWriteError(failed)
    return written


def refuse_left_out(run: EvalRun) -> None:
    """``strict`` after evaluating: samples left out for an unreadable image fail the run (they
    are only found by decoding the images, which is the evaluation's own work)."""
    if run.left_out:
        first, why = next(iter(run.left_out.items()))
        raise CoresError(
            f"--strict: {len(run.left_out)} of {len(run.samples)} samples were left out of the metrics, "
            f"their image could not be read (the first: {first}: {why})"
        )


def _draw(out_dir: Path, samples: list, worst: list[tuple[float, str, np.ndarray]]) -> tuple[list[Path], list[tuple[Path, OSError]]]:
    """One overlay per target of ``worst``; a file that cannot be written is reported, not fatal."""
    by_id = {s.sample_id: s for s in samples}
    done: list[Path] = []
    failed: list[tuple[Path, OSError]] = []
    for rank, (iou, tid, pred) in enumerate(worst, 1):
        sample_id, _, r = tid.rpartition("#")
        sample = by_id[sample_id]
        rnd = sample.rounds[int(r)]
        pixels = sample_pixels(sample)
        target = rnd.target.rasterize(*pixels.shape[:2])
        img = comparison(pixels, pred, target, f"{tid}  IoU {iou:.3f}: {rnd.query}")
        path = out_dir / f"{rank:03d}_iou{iou:.3f}_{_safe(tid)}.png"
        try:
            save_image_atomic(Image.fromarray(img), path)
            done.append(path)
        except OSError as e:
            failed.append((path, e))
    return done, failed


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-80:]


# ------------------------------------------------------------------------------- resuming

RESUME_KEY = "cores_eval_resume"
"""The key that marks a ``.NAME.resume.json`` as ours; its value is the format's version."""
_RECORD_FIELDS = ("id", "sample_id", "intersection", "union", "iou", "area_fraction")


def resume_path(samples_file: Path) -> Path:
    """Where the fingerprint of the evaluation writing ``samples_file`` is kept."""
    return samples_file.with_name(f".{samples_file.name}.resume.json")


def partial_path(samples_file: Path) -> Path:
    """Where the per-target records grow while evaluating; ``samples_file`` itself is written
    once, atomically, at the end (a killed run leaves the earlier file as it was)."""
    return samples_file.with_name(f".{samples_file.name}.partial")


def run_fingerprint(req: EvalRequest, device: Any) -> dict[str, Any]:
    """What decides the per-target results of ``req`` (on ``device``): two runs with the same
    fingerprint score every target alike. The model is identified by its resolved checkpoint
    path and each of its files' size and modification time (a retrained ``best`` differs)."""
    from ..runtime import resolve_dtype

    return {
        "cores_version": __version__,
        "dataset": req.dataset,
        "data_root": os.path.abspath(req.data_root) if req.data_root is not None else None,
        "reader_options": json.loads(json.dumps(req.reader_options, default=str)),
        "limit": req.limit,
        "mode": req.mode,
        "seed": req.seed,
        "model": _model_identity(req),
        "overrides": list(req.model_overrides),
        "context_library": _file_identity(req.context_library) if req.context_library is not None else None,
        "device": getattr(device, "type", str(device)),
        "dtype": str(resolve_dtype(req.dtype, device)),
        "quantize": req.quantize,
        "device_map": req.device_map,
        "save_masks": req.save_masks,
    }


def _model_identity(req: EvalRequest) -> dict[str, Any]:
    from ..bundled import embedded_checkpoint
    from .loading import resolve_checkpoint

    if req.preset is not None:
        return {"preset": req.preset}
    ref = req.checkpoint if req.checkpoint is not None else embedded_checkpoint()
    if ref is None:
        return {"checkpoint": None}
    path = Path(resolve_checkpoint(ref))
    if not path.is_dir():
        return {"checkpoint": str(ref)}  # the loader names what is wrong with it
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"checkpoint": os.path.abspath(path), "files": [[p.relative_to(path).as_posix(), *_stat(p)] for p in files]}


def _stat(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _file_identity(path: Path) -> dict[str, Any]:
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        digest = None  # the loader reports it
    return {"path": os.path.abspath(path), "sha256": digest}


@dataclass
class ResumeState:
    """The per-target file of this run, what identifies the run, and the samples an earlier run
    of it already scored (sample id → its records)."""

    path: Path
    fingerprint: dict[str, Any]
    done: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def targets(self) -> int:
        return sum(len(rs) for rs in self.done.values())


def prepare_resume(req: EvalRequest, samples: list, device: Any) -> ResumeState | None:
    """This run's :class:`ResumeState` (None without a per-target file), read before the model
    loads: with ``req.resume``, the samples the file already holds, after checking that it was
    written for this very evaluation. Raises CoresError when it cannot be resumed; writes
    nothing."""
    path = per_sample_path(req)
    if path is None:
        if req.resume:
            raise CoresError("--resume continues from the per-target file: give --output or --per-sample, as in the interrupted run")
        return None
    state = ResumeState(path, run_fingerprint(req, device))
    marker = resume_path(path)
    earlier = _read_marker(marker)
    if req.resume:
        if earlier is None:
            if path.exists():
                raise CoresError(f"--resume: {path} has no record of the evaluation that wrote it ({marker.name} is missing or not cores eval's); run without --resume to start again")
            return state  # nothing was written yet: this run starts from the beginning
        if earlier != state.fingerprint:
            differ = sorted(k for k in {*earlier, *state.fingerprint} if earlier.get(k) != state.fingerprint.get(k))
            raise CoresError(
                f"--resume: {path} belongs to another evaluation (it differs in: {', '.join(differ)}); "
                "run the interrupted command again with --resume, or without --resume to start again"
            )
        # an interrupted run's records grow in the partial file; a finished run's are in the file
        source = partial_path(path) if partial_path(path).exists() else path
        state.done = complete_samples(samples, _read_records(source)) if source.exists() else {}
    elif earlier is None and (marker.exists() or partial_path(path).exists()):
        in_the_way = marker if marker.exists() else partial_path(path)
        raise CoresError(f"{in_the_way} is in the way and cores eval did not write it; move it away or choose another --output")
    return state


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """The fingerprint in ``marker``, or None when it is missing or not ours."""
    try:
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get(RESUME_KEY) != 1 or not isinstance(data.get("fingerprint"), dict):
        return None
    return data["fingerprint"]


def _read_records(path: Path) -> list[dict]:
    """The per-target records of ``path``; a line cut short by the kill (the last, usually) or
    otherwise unreadable is skipped, so its target is scored again."""
    records = []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CoresError(f"--resume: cannot read {path}: {e.strerror or e}") from None
    for line in data.split(b"\n"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and all(k in r for k in _RECORD_FIELDS):
            records.append(r)
    return records


class TargetLog:
    """The per-target records while evaluating, in the partial file beside the per-target file
    (:func:`partial_path`): every process appends its batches' records as they are scored (one
    locked write per batch, so lines from several processes never mix)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed: OSError | None = None
        """The first append that failed (a full disk): the evaluation goes on without the file,
        whose final write then reports the failure with the metrics kept."""

    @staticmethod
    def start(state: ResumeState, samples: list) -> None:
        """On the main process, before any record is appended: the fingerprint beside the file,
        then the partial file holding exactly the earlier run's complete samples (none when
        starting again), in order, with no line cut short. Raises CoresError when they cannot be
        written."""
        kept = [r for s in samples for r in state.done.get(s.sample_id, ())]
        marker = resume_path(state.path)
        try:
            atomic_write_bytes(marker, json.dumps({RESUME_KEY: 1, "fingerprint": state.fingerprint}, indent=2).encode("utf-8"))
            atomic_write_bytes(partial_path(state.path), b"".join(_jsonl(r) for r in kept))
        except OSError as e:
            raise CoresError(f"cannot write {e.filename or state.path}: {e.strerror or e}; nothing was evaluated") from None

    def append(self, records: list[dict]) -> None:
        if self.failed is not None:
            return
        data = b"".join(_jsonl(r) for r in records)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)  # closing drops the lock
        except OSError as e:
            self.failed = e


def _jsonl(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------ the command


class EvalView(Protocol):
    """What the user sees of :func:`run_eval`; only the main process's view is called."""

    def warnings(self, summary: WarningSummary, strict: bool) -> None:
        """The reader warnings, before the model loads (``strict``: they will be refused)."""

    def random_weights(self, source: str) -> None:
        """The model has random weights: the numbers only exercise the protocol."""

    def caution(self, message: str) -> None:
        """A one-line caution about the model (the shipped one on data it never learned)."""

    def resuming(self, path: Path, targets: int, samples: int, total: int) -> None:
        """``--resume``: ``path`` already holds ``targets`` targets of ``samples`` of the
        ``total`` samples; those are not evaluated again."""

    def evaluating(self, total: int, world: int) -> Callable[[int], None]:
        """Evaluation starts: ``total`` samples in this process (its share of ``world``);
        returns what to call with each batch's sample count."""

    def evaluated(self) -> None:
        """Evaluation ended (or stopped): close the progress display."""

    def results(self, req: EvalRequest, run: EvalRun, source: str) -> None:
        """The numbers, the protocol and the samples left out, before any file is written."""

    def unsaved(self, document: dict[str, Any]) -> None:
        """No file holds the results: show ``document`` (the results JSON) where it is kept."""

    def written(self, paths: list[Path]) -> None:
        """The outputs that were written."""

    def error(self, message: str) -> None:
        """An error the main process of a launched run reports itself (see :func:`run_eval`)."""


class NullEvalView:
    """Shows nothing: other ranks', and library callers' by default."""

    def warnings(self, summary: WarningSummary, strict: bool) -> None: pass
    def random_weights(self, source: str) -> None: pass
    def caution(self, message: str) -> None: pass
    def resuming(self, path: Path, targets: int, samples: int, total: int) -> None: pass
    def evaluating(self, total: int, world: int) -> Callable[[int], None]: return _no_progress
    def evaluated(self) -> None: pass
    def results(self, req: EvalRequest, run: EvalRun, source: str) -> None: pass
    def unsaved(self, document: dict[str, Any]) -> None: pass
    def written(self, paths: list[Path]) -> None: pass
    def error(self, message: str) -> None: pass


def _no_progress(_n: int) -> None:
    pass


@dataclass
class EvalOutcome:
    exit_code: int = 0
    """0, or the launched processes' exit status."""
    run: EvalRun | None = None
    """What this process evaluated; None in a process that launched others."""


def run_eval(req: EvalRequest, view: EvalView | None = None, *, command: Sequence[str] = ()) -> EvalOutcome:
    """Evaluate as ``req`` says, in this process or in the processes it launches.

    Mistakes stop the run before the model loads where they can be known then: outputs that
    cannot be written or would replace an input, unreadable annotations, ``strict`` with reader
    warnings. With ``req.processes`` > 1 (and not already launched) the samples are read and
    checked once here, then ``command`` (this command's arguments, ``eval --dataset ...``) runs
    in every process through :func:`~cores_cli.engine.launch.run_launched`, whose status is the
    outcome's. A launched process joins the group, evaluates its share, and rank 0 shows and
    writes the results; an error it meets after evaluating is reported through ``view.error``
    and its status left for the launching process (a worker's exit 1 would make torchrun print a
    traceback of its own).
    """
    from ..runtime import resolve_device, resolve_dtype
    from .distributed import init_distributed, launched_world, shutdown
    from .launch import eval_launch, launch_command, leave_status, run_launched
    from .loading import load_for_inference

    view = view or NullEvalView()
    loading = LlavaLoading(req.quantize, req.device_map)  # unknown values refused first
    if loading.device_map is not None and req.processes > 1:
        raise CoresError("--device-map spreads one model over the GPUs of one process; it cannot be combined with --gpus N")
    # before any process, sample or model is started: a place that cannot take the results
    check_outputs(req)
    device = resolve_device(req.device)
    if req.processes > 1 and launched_world() <= 1:
        if not command:
            raise ValueError("run_eval with processes > 1 needs the command each process runs")
        # read and check here first, so bad input stops with one line, not one per process
        samples, summary = read_and_check(req)
        if req.strict:
            view.warnings(summary, True)
            refuse_warnings(summary)
        prepare_resume(req, samples, device)
        return EvalOutcome(run_launched(launch_command(eval_launch(req.processes, command))))

    proc = init_distributed(device)
    if not proc.is_main:
        view = NullEvalView()
    try:
        samples, summary = read_and_check(req)
        view.warnings(summary, req.strict)
        if req.strict:
            refuse_warnings(summary)
        resume = prepare_resume(req, samples, proc.device)
        if resume is not None and resume.done:
            view.resuming(resume.path, resume.targets, len(resume.done), len(samples))
        loaded = load_for_inference(req.checkpoint, req.preset, list(req.model_overrides), proc.device, resolve_dtype(req.dtype, proc.device), req.seed, loading)
        if loaded.random_weights:
            view.random_weights(loaded.source)
        if loaded.source == EMBEDDED_SOURCE and not req.dataset.startswith("synthetic:"):
            view.caution(synthetic_only_warning(f"{req.dataset} (not the synthetic benchmark)"))
        try:
            run = compute_eval(req, loaded, samples, lambda total: view.evaluating(total, proc.world), resume)
        finally:
            view.evaluated()
    finally:
        if proc.started:
            shutdown()
    if proc.is_main:
        try:
            _show_and_write(req, loaded, run, view)
        except CoresError as e:
            if not leave_status(1):
                raise
            view.error(str(e))
    return EvalOutcome(0, run)


def _show_and_write(req: EvalRequest, loaded: LoadedModel, run: EvalRun, view: EvalView) -> None:
    """The main process after evaluating: the numbers, then the files; errors last."""
    if len(run.left_out) == len(run.samples):
        first, why = next(iter(run.left_out.items()))
        raise CoresError(f"none of the {len(run.samples)} samples could be evaluated, no image could be read (the first: {first}: {why})")
    # the numbers are shown before any file is written, so a failed write loses nothing
    view.results(req, run, loaded.source)
    written = _write_or_keep(req, loaded, run, view)
    if written:
        view.written(written)
    if req.strict:
        refuse_left_out(run)


def _write_or_keep(req: EvalRequest, loaded: LoadedModel, run: EvalRun, view: EvalView) -> list[Path]:
    """Write the outputs; if one fails, say where the computed metrics still are (the view is
    given the results JSON when no file holds it) and stop with a CoresError."""
    try:
        return write_outputs(req, loaded, run)
    except OutputWriteError as e:
        if req.output is not None and all(path != req.output for path, _ in e.failed):
            raise CoresError(f"{e}; the metrics were written to {req.output}") from None
        view.unsaved(results_document(req, loaded, run, None))
        raise CoresError(f"{e}; the metrics were computed and are in the JSON printed on stdout") from None

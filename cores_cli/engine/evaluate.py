"""Evaluation with LISA's ``validate()`` protocol (docs/EVAL.md): the library API behind
``cores eval`` and training's periodic validation.

Every round (query) of a sample is its own single-question conversation, as in LISA's
``ValDataset``; the queries of one image share one SAM encoder pass. The masks come from the
:class:`~cores_cli.engine.predictor.Predictor` (the same path as ``cores predict``), teacher-forced
by default (the fixed answer template in the input, one forward pass per batch);
``mode="generate"`` lets the model write each answer and falls back to the template when it
holds no chain. This module only scores.

Predictions are compared with the target at the image's original size: logits are
post-processed as SAM does and thresholded at 0; target pixels of 255 are left out of both
intersection and union.

Under ``torch.distributed`` each rank takes every ``world``-th sample (no padding, so nothing
is counted twice), and the per-target records are gathered so every rank returns the same
metrics.

Resuming (``cores eval --resume``): ``done`` holds the records of the samples an earlier run of
the same evaluation scored (every round of each); those samples are not predicted again, their
records take their place in the result, and the metrics are those of one uninterrupted run.
``on_records`` is given each batch's new records as soon as they are scored, for a file that
an interrupted run can be resumed from.

A sample whose image cannot be decoded (corrupt, truncated, gone since it was read) is that
sample's problem, not the run's: its targets are left out of the metrics and it is listed in
:attr:`EvalResult.left_out` with the reason, on every rank.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..contexts import ExemplarSampler
from ..data.records import SegSample, warning_kind
from ..errors import InputImageError
from ..metrics import IoUAccumulator, area_fraction, intersection_union, size_bucket, target_iou
from ..model.cores import CoresModel
from ..processing.transform import ImageInputs, sample_pixels
from ..rle import decode as rle_decode
from ..rle import encode as rle_encode
from .distributed import gather_objects, rank_info, shard
from .predictor import Prediction, Predictor, Query

Mode = Literal["teacher", "generate"]
log = logging.getLogger("cores.eval")


@dataclass
class EvalResult:
    metrics: dict[str, float | int | None]
    """giou, ciou, ciou_s/m/l, miou (None when no target has a class), n (targets), samples."""
    records: list[dict]
    """One per target: id, sample_id, query, class_name, intersection, union, iou, size,
    area_fraction, fallback (generate mode), warnings (the kinds of the sample's reader
    warnings, only when it has some), mask_rle (the predicted mask as COCO RLE, with
    ``save_masks``), in the samples' order."""
    worst: list[tuple[float, str, np.ndarray]] = field(default_factory=list)
    """Up to ``keep_worst`` (iou, target id, predicted mask) with the lowest IoU, this rank's."""
    seconds: float = 0.0
    left_out: dict[str, str] = field(default_factory=dict)
    """Samples left out of the metrics (all ranks'), id → why: their image could not be read."""


def complete_samples(samples: Sequence[SegSample], records: Sequence[dict]) -> dict[str, list[dict]]:
    """sample id → its records, in round order, for the samples of ``samples`` whose every round
    has a record in ``records`` (an earlier run's per-target file); the first record of a target
    counts, a sample with some rounds missing is not done."""
    by_target: dict[str, dict] = {}
    for r in records:
        by_target.setdefault(r.get("id"), r)
    done = {}
    for s in samples:
        keys = _round_keys(s)
        if keys and all(k in by_target for k in keys):
            done[s.sample_id] = [by_target[k] for k in keys]
    return done


def pending(samples: Sequence[SegSample], done: dict[str, list[dict]] | None) -> list[int]:
    """Indices of the samples still to evaluate: those not in ``done``."""
    return [i for i, s in enumerate(samples) if not done or s.sample_id not in done]


def metrics_from_records(records: Sequence[dict]) -> dict[str, float | int | None]:
    """The aggregate metrics of per-target records (what the per-sample JSONL holds)."""
    acc = IoUAccumulator()
    for r in records:
        acc.add(r["intersection"], r["union"], r["area_fraction"], r.get("class_name"))
    out = acc.compute()
    return {k: v for k, v in out.items() if not isinstance(v, dict)}


@torch.no_grad()
def evaluate(
    model: CoresModel,
    samples: Sequence[SegSample],
    *,
    batch_size: int = 4,
    mode: Mode = "teacher",
    exemplars: ExemplarSampler | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    keep_worst: int = 0,
    log_left_out: bool = True,
    save_masks: bool = False,
    done: dict[str, list[dict]] | None = None,
    on_records: Callable[[list[dict]], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``samples``; ``progress(n)`` is called with each batch's sample count.
    Samples left out for an unreadable image are logged (``log_left_out``: a caller that
    reports :attr:`EvalResult.left_out` itself turns that off). ``save_masks``: each record
    holds its predicted mask as COCO RLE. ``done`` and ``on_records``: see the module's
    docstring (resuming)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        ranks = rank_info()
        todo = pending(samples, done)
        indices = [todo[k] for k in shard(len(todo), ranks)]
        runner = _Runner(model, exemplars, seed, keep_worst, save_masks, getattr(samples, "prepared_inputs", None))
        step = batch_size if mode == "teacher" else 1  # generation runs one sample at a time
        for i in range(0, len(indices), step):
            positions = indices[i : i + step]
            new = runner.run([samples[j] for j in positions], positions, mode)
            if on_records and new:
                on_records([{k: v for k, v in r.items() if k != "order"} for r in new])
            if progress:
                progress(len(positions))
        if done and ranks.is_main:
            # the earlier run's targets, where an uninterrupted run would have scored them
            position = {s.sample_id: i for i, s in enumerate(samples)}
            for sample_id, earlier in done.items():
                if sample_id in position:
                    runner.records += [{**r, "order": (position[sample_id], n)} for n, r in enumerate(earlier)]
            runner.add_earlier_worst(samples, done, mode)
        records, left_out = runner.records, runner.left_out
        if ranks.world > 1:
            gathered = gather_objects((records, left_out))
            records = [r for part in gathered for r in part[0]]
            left_out = {k: v for part in gathered for k, v in part[1].items()}
        records.sort(key=lambda r: r["order"])  # the samples' order, whoever scored them when
        for r in records:
            r.pop("order", None)
        metrics = metrics_from_records(records)
        metrics["samples"] = len(samples)
        if left_out and log_left_out and ranks.is_main:
            # library callers (training's validation) have no summary of their own to show it
            log.warning("left %d sample(s) out of the metrics, their image could not be read; the first: %s", len(left_out), next(iter(left_out.values())))
        worst = sorted(((-key, tid, mask) for key, tid, mask in runner.worst), key=lambda w: (w[0], w[1]))
        ordered = {s.sample_id: left_out[s.sample_id] for s in samples if s.sample_id in left_out}
        return EvalResult(metrics, records, worst, time.perf_counter() - start, ordered)
    finally:
        model.train(was_training)


class _Runner:
    """Predicts each batch through the :class:`Predictor` and scores every round."""

    def __init__(
        self,
        model: CoresModel,
        exemplars: ExemplarSampler | None,
        seed: int,
        keep_worst: int,
        save_masks: bool = False,
        prepared: Callable[[SegSample], ImageInputs | None] | None = None,
    ) -> None:
        """``prepared(sample)``: the towers' inputs of a sample's image made ready elsewhere
        (:class:`~cores_cli.engine.image_pipeline.PrefetchedSamples`), or None."""
        self.prepared = prepared
        if exemplars is not None:
            exemplars = ExemplarSampler(exemplars.library, seed)
        self.predictor = Predictor(model, exemplars, seed=seed)
        self.records: list[dict] = []
        self.worst: list[tuple[float, str, np.ndarray]] = []
        self.keep_worst = keep_worst
        self.save_masks = save_masks
        self.left_out: dict[str, str] = {}

    def _pixels(self, sample: SegSample) -> np.ndarray | None:
        """The sample's pixels, or None (and the sample noted as left out) when its image
        cannot be read: readers only look at headers, so a corrupt body shows up here."""
        try:
            return sample_pixels(sample)
        except InputImageError as e:
            self.left_out[sample.sample_id] = str(e)
            return None

    def run(self, chunk: list[SegSample], positions: list[int], mode: Mode) -> list[dict]:
        """Predict every round of every readable sample of ``chunk`` (each its own query, named
        ``{sample_id}#{round}``) and score it; ``positions``: the samples' indices in the whole
        list. Returns the new records."""
        first = len(self.records)
        readable = [(s, px, pos) for s, pos in zip(chunk, positions) if (px := self._pixels(s)) is not None]
        if not readable:
            return []
        predictions = self._predict([(s, px) for s, px, _ in readable], mode)
        for (sample, pixels, pos), preds in zip(readable, predictions):
            for r_index, (rnd, pred) in enumerate(zip(sample.rounds, preds)):
                self._score(sample, pos, r_index, rnd, pred, pixels.shape[:2], mode == "generate")
        return self.records[first:]

    def _predict(self, readable: list[tuple[SegSample, np.ndarray]], mode: Mode) -> list[list[Prediction]]:
        items = [(self._inputs(s, px), [Query(r.query, r.style, key, key) for r, key in zip(s.rounds, _round_keys(s))]) for s, px in readable]
        return self.predictor.predict_images(items, mode, final_only=True)

    def _inputs(self, sample: SegSample, pixels: np.ndarray) -> np.ndarray | ImageInputs:
        inputs = self.prepared(sample) if self.prepared is not None else None
        return pixels if inputs is None else inputs

    def add_earlier_worst(self, samples: Sequence[SegSample], done: dict[str, list[dict]], mode: Mode) -> None:
        """Let the targets an earlier run scored compete for the ``keep_worst`` lowest IoUs. Only
        the few that would enter are given masks: from their ``mask_rle`` when saved, else
        predicted again (the same query names, so the same masks)."""
        if not self.keep_worst:
            return
        earlier = sorted(((-r["iou"], r["id"], r) for rs in done.values() for r in rs), reverse=True)[: self.keep_worst]
        if len(self.worst) >= self.keep_worst:
            earlier = [e for e in earlier if (e[0], e[1]) > (self.worst[0][0], self.worst[0][1])]
        by_id = {s.sample_id: s for s in samples}
        masks: dict[str, np.ndarray] = {}
        for _, tid, r in earlier:
            if isinstance(r.get("mask_rle"), dict):
                masks[tid] = rle_decode(r["mask_rle"])
                continue
            sample = by_id[r["sample_id"]]
            pixels = self._pixels(sample)
            if pixels is None:
                continue
            for key, pred in zip(_round_keys(sample), self._predict([(sample, pixels)], mode)[0]):
                masks[key] = pred.mask
        for key, tid, _ in earlier:
            if tid in masks:
                self._keep(key, tid, masks[tid])

    def _keep(self, key: float, tid: str, mask: np.ndarray) -> None:
        # a min-heap on (-iou, id) keeps the N lowest IoUs (ties: the larger id), whatever the
        # order targets come in: an interrupted and resumed run keeps the same ones
        item = (key, tid, mask)
        if len(self.worst) < self.keep_worst:
            heapq.heappush(self.worst, item)
        elif (key, tid) > (self.worst[0][0], self.worst[0][1]):
            heapq.heapreplace(self.worst, item)

    def _score(self, sample: SegSample, position: int, r_index: int, rnd, pred: Prediction, size: tuple[int, int], with_fallback: bool) -> None:
        target = rnd.target.rasterize(*size)
        inter, union = intersection_union(pred.mask, target)
        frac = area_fraction(target)
        tid = f"{sample.sample_id}#{r_index}"
        record = {
            "id": tid,
            "sample_id": sample.sample_id,
            "query": rnd.query,
            "class_name": rnd.class_name,
            "intersection": int(inter),
            "union": int(union),
            "iou": target_iou(inter, union),
            "size": size_bucket(frac),
            "area_fraction": frac,
            "order": (position, r_index),
        }
        if with_fallback:
            record["fallback"] = pred.fallback
        kinds = sorted({warning_kind(w) for w in sample.meta.get("warnings", ())})
        if kinds:
            # so a reader of the per-target file can leave out targets read from a doubtful annotation
            record["warnings"] = kinds
        if self.save_masks:
            # the mask itself, so that any metric can be recomputed from the file alone
            record["mask_rle"] = rle_encode(pred.mask)
        self.records.append(record)
        if self.keep_worst:
            self._keep(-record["iou"], tid, pred.mask)


def _round_keys(sample: SegSample) -> list[str]:
    return [f"{sample.sample_id}#{i}" for i in range(len(sample.rounds))]

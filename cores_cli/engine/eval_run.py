"""A whole ``cores eval`` run as a plain function: load, evaluate, write the results.

Outputs (all atomic):

- ``--output results.json``: ``{"dataset", "protocol", "metrics", "model", "seconds", ...}``;
- beside it (or at ``--per-sample``) a JSONL with one line per target: id, sample_id, query,
  class_name, intersection, union, iou, size bucket, area_fraction; the aggregate metrics
  can be recomputed from it alone (:func:`metrics_from_records`);
- ``--save-vis N``: PNGs of the N lowest-IoU targets, prediction filled and ground truth
  outlined.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .. import __version__
from ..data.registry import load_samples, protocol
from ..data.transform import sample_pixels
from ..errors import CoresError
from ..fileio import atomic_open, atomic_write_json, save_image_atomic
from ..visualize import comparison
from .evaluate import EvalResult, Mode, evaluate
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


def load_eval_samples(req: EvalRequest) -> list:
    samples = load_samples(req.dataset, req.data_root, **req.reader_options)
    if not samples:
        raise CoresError(f"{req.dataset}: no samples to evaluate")
    return samples[: req.limit] if req.limit else samples


def describe(req: EvalRequest, loaded: LoadedModel, n_samples: int, n_targets: int, world: int) -> dict[str, Any]:
    cfg = loaded.model.cfg
    return {
        "dataset": req.dataset,
        "what": protocol(req.dataset, **req.reader_options),
        "mode": "teacher-forced (fixed answer template, one pass)" if req.mode == "teacher" else "generate (template fallback when no chain)",
        "samples": n_samples,
        "targets": n_targets,
        "in_context_k": cfg.prompt.in_context_k,
        "chain": " → ".join(cfg.chain.tokens) + ("" if cfg.chain.segmenting else " (one pass)"),
        "threshold": "logits > 0 at the original image size",
        "processes": world,
        "seed": req.seed,
    }


def run_eval(req: EvalRequest, loaded: LoadedModel, progress_factory: Callable[[int], Callable[[int], None]] | None = None) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate and write the outputs (rank 0 writes). Returns the result and the protocol."""
    samples = load_eval_samples(req)
    sampler = exemplar_sampler(loaded.model, req.context_library, req.seed)
    progress = progress_factory(len(samples)) if progress_factory else None
    result = evaluate(
        loaded.model, samples, batch_size=req.batch_size, mode=req.mode, exemplars=sampler, seed=req.seed,
        progress=progress, keep_worst=req.save_vis,
    )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    proto = describe(req, loaded, len(samples), int(result.metrics["n"]), world)
    worst = result.worst
    if world > 1 and req.save_vis:
        # each rank kept its own N worst; rank 0 draws the N worst of them all
        parts: list[list | None] = [None] * world
        dist.all_gather_object(parts, result.worst)
        worst = sorted((w for part in parts for w in (part or [])), key=lambda w: w[0])
    if _is_main():
        _write_outputs(req, loaded, result, proto)
        if req.save_vis:
            _draw(req, samples, worst[: req.save_vis])
    return result, proto


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def per_sample_path(req: EvalRequest) -> Path | None:
    if req.per_sample is not None:
        return req.per_sample
    if req.output is not None:
        return req.output.with_name(req.output.stem + ".samples.jsonl")
    return None


def _write_outputs(req: EvalRequest, loaded: LoadedModel, result: EvalResult, proto: dict[str, Any]) -> None:
    samples_file = per_sample_path(req)
    if samples_file is not None:
        with atomic_open(samples_file) as fh:
            for r in result.records:
                fh.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    if req.output is not None:
        atomic_write_json(
            req.output,
            {
                "cores_version": __version__,
                "dataset": req.dataset,
                "protocol": proto,
                "metrics": result.metrics,
                "model": {"source": loaded.source, "preset": loaded.model.cfg.preset, "random_weights": loaded.random_weights},
                "per_sample": str(samples_file) if samples_file else None,
                "seconds": round(result.seconds, 3),
            },
        )


def _draw(req: EvalRequest, samples: list, worst: list[tuple[float, str, np.ndarray]]) -> None:
    out_dir = req.vis_dir or (req.output.parent / (req.output.stem + "_worst") if req.output else Path("cores_eval_worst"))
    by_id = {s.sample_id: s for s in samples}
    for rank, (iou, tid, pred) in enumerate(worst, 1):
        sample_id, _, r = tid.rpartition("#")
        sample = by_id[sample_id]
        rnd = sample.rounds[int(r)]
        pixels = sample_pixels(sample)
        target = rnd.target.rasterize(*pixels.shape[:2])
        img = comparison(pixels, pred, target, f"IoU {iou:.3f}: {rnd.query[:80]}")
        name = f"{rank:03d}_iou{iou:.3f}_{_safe(tid)}.png"
        save_image_atomic(Image.fromarray(img), out_dir / name)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-80:]


def init_distributed_from_env(device_name: str) -> torch.device | None:
    """Join the process group a launcher (torchrun, deepspeed) described in the environment.

    Returns this rank's device, or None when not launched for several processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")

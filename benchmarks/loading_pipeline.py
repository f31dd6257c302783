"""Image preparation beside the model: real photos read and resized in worker processes while a
model runs, against the same work done one image at a time.

    python benchmarks/loading_pipeline.py --repeats 3 --markdown
    python benchmarks/loading_pipeline.py --model-ms 50 --workers 1      # a cheaper model
    python benchmarks/loading_pipeline.py --model-wait                   # a model step that waits, as on a GPU
    python benchmarks/loading_pipeline.py --photos DIR --photos DIR2     # other photos

Photos: ``../shared/realdata`` (``lisa_demo/imgs``: 0.7-28.5 MP, ``quirks/exif_orientation``:
2.2 MP, EXIF-rotated), read in place. Preparation is what ``cores predict`` and ``cores eval`` do
to each image at real size: ``images.load_image`` (decode, EXIF upright, RGB), then
``SampleTransform.image`` with the ``llava-1.5-7b`` preset's settings (SAM 1024 padded square,
CLIP 336). The model is a stand-in, not a network: a CPU-bound loop of 128×128 matrix products
on one thread (no sleep), calibrated to ``--model-ms`` per image, by default the mean measured
preparation time (CPU seconds), so that model ≈ preparation and the overlap shows.
``--model-wait`` makes the step wait that long instead: the host's view of a GPU step. One torch thread in this
process and one per worker, so that on 2 cores the model and one worker each have a core.

Four timings over the whole folder, each the median of ``--repeats``: preparation only, model
only (on prepared inputs), serial (each image prepared, then its model step: ``--workers 0``),
pipelined (``image_pipeline.prefetch`` with ``--workers`` processes, pool start included). The
pipeline works when pipelined ≈ max(preparation, model), not their sum; that needs a free core
per worker beside the model's, so the report also gives the cores the run kept busy (CPU
seconds of this process and its workers over the wall time): near 1 for the pipelined run means
other jobs held the other cores, and the wall times say nothing about overlap.

GPU projection: the mean preparation time per image on one core, p, against a floor of
``--gpu-ms`` per sample (16 ms: SAM ViT-H ≈ 6 TFLOP + 2 × 7 B parameters × ~670 prompt tokens
≈ 15 TFLOP at an H100/H200's ~990 dense bf16 TFLOP/s). Serial: p + floor per image; with W
workers on W free cores: max(p / W, floor) + the main process's own cost per image (measured
here as pipelined - max(preparation, model), per image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cores_cli.config import preset  # noqa: E402
from cores_cli.engine.image_pipeline import prefetch, prepare_image, prepare_path  # noqa: E402
from cores_cli.images import DEFAULT_MAX_PIXELS  # noqa: E402
from cores_cli.processing.transform import SampleTransform  # noqa: E402
from cores_cli.threads import default_threads  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
DEFAULT_FOLDERS = ("lisa_demo/imgs", "quirks/exif_orientation")
SUFFIXES = {".jpg", ".jpeg", ".png"}
CLIP_SIZE = 336
"""The CLIP tower's input of LLaVA-1.5 (ViT-L/14-336)."""


def real_size_transform() -> SampleTransform:
    """The processor's image half for the real-size preset (no tokenizer: only ``image`` is used)."""
    return SampleTransform(preset("llava-1.5-7b"), None, None, CLIP_SIZE, with_targets=False)


class StandIn:
    """A model step that costs ``ms`` of one CPU core per image, whatever the image; with
    ``wait``, ``ms`` of waiting instead (the host's view of a GPU step: the device is busy, the
    CPU is not), which shows the overlap even when other jobs leave this run a single core."""

    def __init__(self, ms: float, wait: bool = False) -> None:
        self.a = torch.randn(128, 128)
        self.reps = 1
        self.wait_s = ms / 1000 if wait else None
        unit = min(self._time(200) for _ in range(3)) / 200
        self.reps = max(1, round(ms / 1000 / unit))

    def _time(self, reps: int) -> float:
        start = time.perf_counter()
        self._work(reps)
        return time.perf_counter() - start

    def _work(self, reps: int) -> None:
        x = self.a
        for _ in range(reps):
            x = torch.tanh(x @ self.a)

    def __call__(self, inputs) -> float:
        if self.wait_s is not None:
            time.sleep(self.wait_s)
        else:
            self._work(self.reps)
        return float(inputs.sam_image[0, 0, 0])  # touches the prepared tensor, as a model would


def photos(folders: list[Path]) -> list[str]:
    found = sorted(str(p) for folder in folders for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not found:
        raise SystemExit(f"no photos in {', '.join(map(str, folders))}")
    return found


def _timed(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process (all its threads), CPU seconds of the workers
    (children, counted once the pool has reaped them: it has when ``prefetch`` ends))."""
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu, _children_cpu() - children


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare_only(transform, paths) -> tuple[float, float, float]:
    return _timed(lambda: [prepare_image(transform, p) for p in paths])


def run_model_only(model, prepared) -> tuple[float, float, float]:
    return _timed(lambda: [model(inputs) for inputs in prepared])


def run_through(model, transform, paths, workers: int) -> tuple[float, float, float]:
    """Every photo through the pipeline with ``workers`` (0: serial) and the model step."""

    def go() -> None:
        for outcome in prefetch([(p, DEFAULT_MAX_PIXELS) for p in paths], prepare_path, {"transform": transform}, workers):
            model(outcome.get().inputs)

    return _timed(go)


def measure(paths: list[str], workers: int, repeats: int, model_ms: float | None, gpu_ms: float, wait: bool = False) -> dict:
    torch.set_num_threads(1)
    idle = default_threads()  # CPUs idle before the run: overlap needs one for the model and one per worker
    transform = real_size_transform()
    prepared = [prepare_image(transform, p) for p in paths]  # warm-up, and the model-only inputs
    per_image = {Path(p).name: {"megapixels": round(x.image.pixels.shape[0] * x.image.pixels.shape[1] / 1e6, 1), "load_ms": round(1000 * x.load_s), "preprocess_ms": round(1000 * x.preprocess_s)} for p, x in zip(paths, prepared)}
    wall: dict[str, list[float]] = {"prepare": [], "model": [], "serial": [], "pipelined": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    cores: dict[str, list[float]] = {k: [] for k in wall}
    model = None
    for _ in range(repeats):
        for name in ("prepare", "model", "serial", "pipelined"):
            if name == "prepare":
                w, c, k = run_prepare_only(transform, paths)
            elif name == "model":
                if model is None:
                    ms = model_ms if model_ms is not None else 1000 * statistics.median(cpu["prepare"]) / len(paths)
                    model = StandIn(ms, wait)
                w, c, k = run_model_only(model, [x.inputs for x in prepared])
            else:
                w, c, k = run_through(model, transform, paths, 0 if name == "serial" else workers)
            wall[name].append(w)
            cpu[name].append(c)
            cores[name].append((c + k) / w)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    pre, mod, piped = med["prepare"], med["model"], med["pipelined"]
    n = len(paths)
    # the GPU case from costs, not from this machine's wall times (other jobs share its cores)
    p_ms = 1000 * med_cpu["prepare"] / n
    main_ms = max(0.0, 1000 * (med_cpu["pipelined"] - med_cpu["model"]) / n)
    step_ms = lambda w: max(p_ms / w, gpu_ms + main_ms)  # noqa: E731
    return {
        "photos": n,
        "megapixels": round(sum(v["megapixels"] for v in per_image.values()), 1),
        "workers": workers,
        "repeats": repeats,
        "idle_cpus_at_start": idle,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "model_stand_in": "wait" if wait else "cpu",
        "model_stand_in_ms_per_image": round(1000 * mod / n, 1),
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "cpu_seconds_main_process": {k: round(v, 3) for k, v in med_cpu.items()},
        "cores_busy": {k: round(statistics.median(v), 2) for k, v in cores.items()},
        "pipelined_over_max": round(piped / max(pre, mod), 2),
        "pipelined_over_sum": round(piped / (pre + mod), 2),
        "serial_over_sum": round(med["serial"] / (pre + mod), 2),
        "gpu_projection": {
            "floor_ms_per_sample": gpu_ms,
            "prepare_cpu_ms_per_image": round(p_ms, 1),
            "main_process_cpu_ms_per_image": round(main_ms, 1),
            "serial_ms_per_image": round(p_ms + gpu_ms, 1),
            "workers_to_reach_floor": math.ceil(p_ms / (gpu_ms + main_ms)),
            "with_workers": {str(w): {"ms_per_image": round(step_ms(w), 1), "images_per_s": round(1000 / step_ms(w), 1)} for w in (1, 2, 4, 8, 16)},
        },
        "per_image": per_image,
    }


def markdown(r: dict) -> str:
    s = r["seconds"]
    g = r["gpu_projection"]
    lines = [
        f"{r['photos']} photos, {r['megapixels']} MP in all; model stand-in ({r['model_stand_in']}) {r['model_stand_in_ms_per_image']} ms/image; {r['workers']} worker(s); median of {r['repeats']}",
        "",
        "| preparation only | model only | serial | pipelined | pipelined / max | pipelined / sum |",
        "|---|---|---|---|---|---|",
        f"| {s['prepare']:.2f} s | {s['model']:.2f} s | {s['serial']:.2f} s | {s['pipelined']:.2f} s | {r['pipelined_over_max']} | {r['pipelined_over_sum']} |",
        "",
        f"idle CPUs at start: {r['idle_cpus_at_start']}; load average {r['load_average']}; cores kept busy (CPU seconds of this process and its workers / wall): "
        f"serial {r['cores_busy']['serial']}, pipelined {r['cores_busy']['pipelined']} (the overlap needs {r['workers'] + 1})",
        "",
        f"GPU projection at {g['floor_ms_per_sample']} ms/sample: preparation {g['prepare_cpu_ms_per_image']} CPU ms/image, "
        f"the main process's share of the pipeline {g['main_process_cpu_ms_per_image']} CPU ms/image; serial {g['serial_ms_per_image']} ms/image; "
        f"{g['workers_to_reach_floor']} workers keep up with the GPU",
        "",
        "| workers | " + " | ".join(g["with_workers"]) + " |",
        "|---|" + "---|" * len(g["with_workers"]),
        "| ms/image | " + " | ".join(str(v["ms_per_image"]) for v in g["with_workers"].values()) + " |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, action="append", help=f"a folder of photos (repeatable); default: {', '.join(DEFAULT_FOLDERS)} under {REALDATA}")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of the pipelined run (1 on 2 cores: the model has the other)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-ms", type=float, default=None, help="the stand-in's cost per image (default: the measured mean preparation time)")
    ap.add_argument("--model-wait", action="store_true", help="the stand-in waits instead of computing: a GPU step as the host sees it")
    ap.add_argument("--gpu-ms", type=float, default=16.0, help="the GPU floor per sample for the projection")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    folders = args.photos or [REALDATA / f for f in DEFAULT_FOLDERS]
    result = measure(photos(folders), args.workers, args.repeats, args.model_ms, args.gpu_ms, args.model_wait)
    print(json.dumps(result))
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()

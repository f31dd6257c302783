"""Whole-process time of the model-loading commands on the shipped model, and where it goes.

    python benchmarks/model_startup.py --runs 5 --markdown

Timed, each ``--runs`` times in a fresh process from start to exit (the median and the range):

- ``cores predict --example`` (one image, one query; outputs to a temporary folder),
- ``cores eval --dataset synthetic:val --limit 8`` (metrics to a temporary file),
- the import floor: a process that only imports what any LLaVA model code must (torch,
  transformers' LLaVA, segment_anything, peft) and exits as the commands do, without teardown.

The runs are interleaved (one of each per round), so a machine that speeds up or slows down
during the benchmark moves all three alike, and each command's median is also given above the
floor's.

Then one more process splits ``cores predict --example`` into its phases, in order: starting
and ending Python (the command skips the teardown), the command line, importing torch, importing the rest of the model code
(transformers, peft, segment_anything, cores), loading the shipped model, the prediction and
the writing of its files; and ``python -X importtime`` of the model code groups the import time
by top-level package (self time), largest first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = r"""
import time, sys
t0 = time.perf_counter()
import cores_cli.cli.app
t1 = time.perf_counter()
import torch
t2 = time.perf_counter()
import cores_cli.engine.loading, cores_cli.engine.batch_predict, cores_cli.engine.predictor
t3 = time.perf_counter()
from cores_cli.engine.loading import load_for_inference
from cores_cli.threads import apply_threads
apply_threads(None)
loaded = load_for_inference(None, None, [], torch.device("cpu"), torch.float32)
t4 = time.perf_counter()
from cores_cli.engine.predictor import Predictor
from cores_cli.images import load_image
from cores_cli.bundled import EXAMPLE_QUERY, example_image
pred = Predictor(loaded.model).predict(load_image(example_image()).pixels, EXAMPLE_QUERY)
t5 = time.perf_counter()
import json
print(json.dumps({"command line": t1 - t0, "torch": t2 - t1, "model code": t3 - t2, "model load": t4 - t3, "prediction": t5 - t4}), flush=True)
import os
os._exit(0)  # as the command ends (cores_cli.cli.app.exit_without_teardown)
"""


FLOOR = "import os, torch, transformers.models.llava.modeling_llava, segment_anything, peft; os._exit(0)"
FLOOR_NAME = "import floor: torch, transformers' LLaVA, segment_anything, peft"


def run_once(argv: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        return time.perf_counter() - start


def run_times(argvs: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """``runs`` fresh processes of each command, interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(runs):
        for name, argv in argvs.items():
            times[name].append(run_once(argv))
    return times


def commands() -> dict[str, list[str]]:
    cores = [sys.executable, "-m", "cores_cli"]
    return {
        "cores predict --example": [*cores, "predict", "--example", "--out", "out"],
        "cores eval --dataset synthetic:val --limit 8": [*cores, "eval", "--dataset", "synthetic:val", "--limit", "8", "--output", "metrics.json"],
        FLOOR_NAME: [sys.executable, "-c", FLOOR],
    }


def phases() -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True, check=True, cwd=ROOT)
    total = time.perf_counter() - start
    parts = json.loads(out.stdout.strip().splitlines()[-1])
    return {"python start and exit": total - sum(parts.values()), **parts}


def import_groups(top: int) -> list[tuple[str, float]]:
    """Self import time of the model code by top-level package (torch split one level down)."""
    code = "import cores_cli.engine.loading, cores_cli.engine.batch_predict, cores_cli.engine.predictor"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    groups: Counter[str] = Counter()
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line.split(":", 1)[1].split("|")
        if own.strip().isdigit():
            parts = name.strip().split(".")
            groups[".".join(parts[:2]) if parts[0] in ("torch", "transformers") else parts[0]] += int(own) / 1e6
    return groups.most_common(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="import groups to list")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    env_note = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else "threads: the default policy"
    timings = run_times(commands(), args.runs)
    medians = {name: statistics.median(t) for name, t in timings.items()}
    floor = medians[FLOOR_NAME]
    split = phases()
    groups = import_groups(args.top)
    result = {
        "runs": args.runs,
        "commands": {n: {"median_s": medians[n], "min_s": min(t), "max_s": max(t), "above_floor_s": medians[n] - floor} for n, t in timings.items() if n != FLOOR_NAME},
        "floor": {"median_s": floor, "min_s": min(timings[FLOOR_NAME]), "max_s": max(timings[FLOOR_NAME])},
        "phases_s": split,
        "import_self_s": dict(groups),
    }
    if not args.markdown:
        print(json.dumps(result, indent=2))
        return 0
    print(f"| command | median of {args.runs} | range | median above the floor |\n|---|---:|---:|---:|")
    for name, t in timings.items():
        above, shown = ("–", name) if name == FLOOR_NAME else (f"{medians[name] - floor:+.2f} s", f"`{name}`")
        print(f"| {shown} | {medians[name]:.2f} s | {min(t):.2f}–{max(t):.2f} s | {above} |")
    print(f"\nPhases of one `cores predict --example`-like process ({env_note}):\n\n| phase | seconds |\n|---|---:|")
    for name, seconds in split.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"| total | {sum(split.values()):.2f} |")
    print("\nImport self time of the model code by package (`-X importtime`):\n\n| package | seconds |\n|---|---:|")
    for name, seconds in groups:
        print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

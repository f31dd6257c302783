"""CPU threads: the default of ``--threads`` against every fixed count, idle and with one core busy.

    python benchmarks/threads.py --samples 32 --repeats 3 --markdown

Evaluates the shipped tiny model on ``synthetic:val`` (teacher-forced, batch 8) in this process
with torch set to each thread count in turn (1 .. the CPUs of this process) and to the default
that :func:`cores_cli.threads.default_threads` picks at that moment, alternating over
``--repeats`` rounds so that drifting load hits all alike; medians reported. "busy" runs the
same with ``yes > /dev/null`` occupying one core, as another user's job would. The target: the
default never more than 1.2× slower than the best fixed count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import cores_cli  # noqa: E402
from cores_cli.data.registry import load_samples  # noqa: E402
from cores_cli.engine.evaluate import evaluate  # noqa: E402
from cores_cli.threads import default_threads  # noqa: E402


def rate(model, samples, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    evaluate(model, samples, batch_size=8)
    return len(samples) / (time.perf_counter() - start)


def measure(model, samples, repeats: int) -> dict:
    default = default_threads()
    counts = sorted(set(range(1, len(os.sched_getaffinity(0)) + 1)))
    rates: dict[str, list[float]] = {str(c): [] for c in counts} | {"default": []}
    for _ in range(repeats):
        for c in counts:
            rates[str(c)].append(rate(model, samples, c))
        rates["default"].append(rate(model, samples, default))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    best = max(v for k, v in medians.items() if k != "default")
    return {"default_threads": default, "samples_per_s": {k: round(v, 1) for k, v in medians.items()}, "best_over_default": round(best / medians["default"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    model = cores_cli.load(device="cpu").model
    samples = load_samples("synthetic:val", n=args.samples)
    evaluate(model, samples[:8], batch_size=8)  # warm-up
    results = {"idle": measure(model, samples, args.repeats)}
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        results["one core busy"] = measure(model, samples, args.repeats)
    finally:
        hog.kill()
        hog.wait()
    print(json.dumps(results))
    if args.markdown:
        for name, r in results.items():
            fixed = ", ".join(f"{k} thread{'s' if k != '1' else ''}: {v}" for k, v in r["samples_per_s"].items() if k != "default")
            print(f"| {name} | {fixed} | default ({r['default_threads']}): {r['samples_per_s']['default']} | {r['best_over_default']}× |")


if __name__ == "__main__":
    main()

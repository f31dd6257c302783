"""Evaluation throughput: batched teacher-forced vs one-at-a-time generate, in one run.

    python benchmarks/eval_throughput.py --samples 64 --batch-size 8

Both modes evaluate the same synthetic split with the same tiny model (random weights, fixed
seed) after a warm-up, alternating over ``--repeats`` rounds so that background load hits both
alike; the result is the ratio of their median samples/second. The tiny model writes
no chain, so generate mode runs to ``--max-new-tokens`` and then falls back to the template: the
cost of a model that answers at length. Prints a JSON line and, with ``--markdown``, a table row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores_cli.configio import apply_overrides  # noqa: E402
from cores_cli.config import tiny  # noqa: E402
from cores_cli.data.registry import load_samples  # noqa: E402
from cores_cli.engine import evaluate as ev  # noqa: E402
from cores_cli.model.builder import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model(apply_overrides(tiny(), ["prompt.in_context_k=0"])).eval()
    samples = load_samples("synthetic:val", n=args.samples)
    ev.evaluate(model, samples[:4], batch_size=args.batch_size)  # warm-up: kernels, allocator
    original = model.generate_answers
    decoded: list[int] = []

    def counting(batch, *_):
        # the Predictor passes its own max_new_tokens (64): this run's length must win over it
        rows = original(batch, args.max_new_tokens)
        decoded.extend(len(r) for r in rows)
        return rows

    model.generate_answers = counting

    teacher_rates, generate_rates = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        teacher = ev.evaluate(model, samples, batch_size=args.batch_size)
        t1 = time.perf_counter()
        generate = ev.evaluate(model, samples, mode="generate")
        t2 = time.perf_counter()
        teacher_rates.append(len(samples) / (t1 - t0))
        generate_rates.append(len(samples) / (t2 - t1))

    teacher_rate, generate_rate = statistics.median(teacher_rates), statistics.median(generate_rates)
    result = {
        "samples": len(samples),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "teacher_samples_per_s": round(teacher_rate, 2),
        "generate_samples_per_s": round(generate_rate, 2),
        "speedup": round(teacher_rate / generate_rate, 1),
        "repeats": args.repeats,
        "teacher_rates": [round(r, 2) for r in teacher_rates],
        "generate_rates": [round(r, 2) for r in generate_rates],
        "same_masks": [r["intersection"] for r in teacher.records] == [r["intersection"] for r in generate.records],
        "decoded_tokens_per_answer": statistics.median(decoded) if decoded else 0,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    print(json.dumps(result))
    if args.markdown:
        print(f"| {result['samples']} | {result['batch_size']} | {result['teacher_samples_per_s']} | {result['generate_samples_per_s']} | {result['speedup']}× |")


if __name__ == "__main__":
    main()

"""Generate mode in one LLM pass against the former two passes (generation, then prompt and
answer rerun teacher-forced for the chain's hidden states), in one run.

    python benchmarks/generate_speed.py --queries 16 --repeats 3 --markdown

The shipped model answers the first ``--queries`` scenes of synthetic:val (each scene's first
question, with the shipped exemplar library, seed 0) in generate mode, after a warm-up. Each
query is answered both ways back to back, in alternating order, so that background load hits
both alike; a round's time per query is its summed time over the queries, and the medians of
``--repeats`` rounds are compared (``speedup``), and so is each query's pair of times
(``paired_speedup_median``). The masks of both ways are compared too (bool equality).
Prints a JSON line and, with ``--markdown``, a table row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cores_cli  # noqa: E402
from cores_cli.data.registry import load_samples  # noqa: E402
from cores_cli.engine.predictor import Prediction, Predictor, Query  # noqa: E402


def answer(predictor: Predictor, item: tuple[np.ndarray, list[Query]], one_pass: bool) -> tuple[float, Prediction]:
    """Seconds for one query in generate mode, and its prediction."""
    predictor._one_pass = one_pass
    start = time.perf_counter()
    prediction = predictor.predict_images([item], mode="generate")[0][0]
    return time.perf_counter() - start, prediction


def round_trip(predictor: Predictor, items: list[tuple[np.ndarray, list[Query]]]) -> tuple[dict[bool, tuple[float, list[Prediction]]], list[float]]:
    """Every query both ways (one pass: True): seconds per query and the predictions of each
    way, and each query's two-pass time over its one-pass time."""
    spent = {True: 0.0, False: 0.0}
    predictions: dict[bool, list[Prediction]] = {True: [], False: []}
    ratios = []
    for i, item in enumerate(items):
        seconds = {}
        for one_pass in (True, False) if i % 2 else (False, True):
            seconds[one_pass], prediction = answer(predictor, item, one_pass)
            spent[one_pass] += seconds[one_pass]
            predictions[one_pass].append(prediction)
        ratios.append(seconds[False] / seconds[True])
    return {k: (spent[k] / len(items), predictions[k]) for k in spent}, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    predictor = cores_cli.load(device=args.device, max_new_tokens=args.max_new_tokens).predictor
    samples = load_samples("synthetic:val", n=args.queries)
    items = [(s.image_array, [Query(s.rounds[0].query, s.rounds[0].style)]) for s in samples]
    round_trip(predictor, items[:2])  # warm-up: kernels, allocator

    times: dict[str, list[float]] = {"two_pass": [], "one_pass": []}
    ratios: list[float] = []
    for _ in range(args.repeats):
        ways, query_ratios = round_trip(predictor, items)
        ratios.extend(query_ratios)
        (one_s, one), (two_s, two) = ways[True], ways[False]
        times["two_pass"].append(two_s)
        times["one_pass"].append(one_s)

    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "queries": len(items),
        "device": str(predictor.param.device),
        "dtype": str(predictor.param.dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "two_pass_ms_per_query": round(1000 * medians["two_pass"], 1),
        "one_pass_ms_per_query": round(1000 * medians["one_pass"], 1),
        "speedup": round(medians["two_pass"] / medians["one_pass"], 2),
        # the same query both ways back to back: the least exposed to load that comes and goes
        "paired_speedup_median": round(statistics.median(ratios), 2),
        "repeats": args.repeats,
        "ms_per_query": {k: [round(1000 * t, 1) for t in v] for k, v in times.items()},
        "same_answers": [p.generated_text for p in one] == [p.generated_text for p in two],
        "same_masks": all(len(a.level_masks) == len(b.level_masks) and all(np.array_equal(x, y) for x, y in zip(a.level_masks, b.level_masks)) for a, b in zip(one, two)),
        "fallbacks": sum(p.fallback for p in one),
        "answer_tokens_median": statistics.median(len(predictor.model.tokenizer.encode(p.generated_text, add_special_tokens=False)) for p in one),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    print(json.dumps(result))
    if args.markdown:
        print(f"| {result['queries']} | {result['device']} | {result['two_pass_ms_per_query']} | {result['one_pass_ms_per_query']} | {result['speedup']}× |")


if __name__ == "__main__":
    main()

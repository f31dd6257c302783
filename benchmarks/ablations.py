"""The paper's Tables 3, 4 and 5 in miniature, on the synthetic benchmark.

    python benchmarks/ablations.py --out runs/ablations --steps 2000 --seeds 0 1 2 --jobs 2
    python benchmarks/ablations.py --out runs/ablations --report     # the table from what is done

Every configuration trains the tiny model from scratch with the shipped ``tiny-synthetic``
recipe and the same budget (``--steps`` optimizer steps of the same batch size), through
``cores train``; each run is then scored by ``cores eval`` on ``synthetic:val`` and
``synthetic:test``. A finished run (its ``scores.json``) is never trained again, so the script
resumes after an interruption and ``--report`` can be run at any time. ``--jobs N`` trains N runs
at once, each on one thread (on a 2-core CPU, two one-thread runs get more done than one
two-thread run).

Configurations (the CoReS default is depth 2, one in-context exemplar, refiner on):

- Table 5 (logical levels): ``depth1`` = ``[SEG]`` only (LISA), ``cores`` = ``[LOC] → [SEG]``,
  ``depth3`` = ``[LOC] → [POS] → [SEG]``;
- Table 3 (refiner, CoS-R): ``cores`` against ``no_refiner``;
- Table 4 (in-context exemplars): ``k0``, ``cores`` (k = 1), ``k2``, ``k4``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores_cli.engine.train_state import find_resume_checkpoint  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "depth1": ["model.chain.depth=1"],
    "cores": [],
    "depth3": ["model.chain.depth=3"],
    "no_refiner": ["model.chain.refiner=false"],
    "k0": ["model.prompt.in_context_k=0"],
    "k2": ["model.prompt.in_context_k=2"],
    "k4": ["model.prompt.in_context_k=4"],
}

TABLES = [
    ("Table 5 in miniature: logical levels", [("depth1", "[SEG] (depth 1, LISA-like)"), ("cores", "[LOC] → [SEG] (depth 2, CoReS)"), ("depth3", "[LOC] → [POS] → [SEG] (depth 3)")]),
    ("Table 3 in miniature: the token refiner (CoS-R)", [("no_refiner", "CoReS without the refiner"), ("cores", "CoReS")]),
    ("Table 4 in miniature: in-context exemplars", [("k0", "k = 0"), ("cores", "k = 1 (CoReS)"), ("k2", "k = 2"), ("k4", "k = 4")]),
]

SPLITS = ("val", "test")


def cores(*args: str) -> list[str]:
    return [sys.executable, "-m", "cores_cli", *args]


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_one(out: Path, name: str, seed: int, args: argparse.Namespace, threads: int | None = None) -> dict:
    run_dir = out / f"{name}-s{seed}"
    done = run_dir / "scores.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [
        f"train.run_dir={run_dir}",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"train.save_every={args.steps}",
        "train.eval_every=0",
        f"data.mixture.synthetic.options={{n: {args.train_n}}}",
        f"data.val.options={{n: {args.val_n}}}",
        *CONFIGS[name],
    ]
    cmd = cores("train", "--gpus", "0", "--recipe", "tiny-synthetic", *[x for o in overrides for x in ("--set", o)])
    if (run_dir / "checkpoints" / "latest").is_file():
        cmd.append("--resume")
    elif run_dir.exists():  # killed before its only checkpoint: start this run again
        cmd.append("--overwrite")
    t0 = time.perf_counter()
    _check(subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(threads)), f"training {name} seed {seed}")
    train_s = time.perf_counter() - t0
    ckpt = find_resume_checkpoint(run_dir / "checkpoints")
    scores = {"config": name, "seed": seed, "steps": args.steps, "train_seconds": round(train_s, 1)}
    for split in SPLITS:
        res = subprocess.run(
            cores("eval", "--dataset", f"synthetic:{split}", "--opt", f"n={args.eval_n}", "-c", str(ckpt), "--json", "--batch-size", "16"),
            capture_output=True, text=True, env=_env(threads),
        )
        _check(res, f"evaluating {name} seed {seed} on {split}")
        metrics = json.loads(res.stdout)["metrics"]
        scores[split] = {"giou": metrics["giou"], "ciou": metrics["ciou"], "n": metrics["n"]}
    done.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def _check(res: subprocess.CompletedProcess, what: str) -> None:
    if res.returncode != 0:
        tail = "\n".join((res.stderr or "").strip().splitlines()[-5:])
        raise SystemExit(f"{what} failed (exit {res.returncode}):\n{tail}")


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def report(out: Path) -> str:
    runs: dict[str, list[dict]] = {}
    for f in sorted(out.glob("*/scores.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["config"], []).append(r)
    lines = []
    for title, rows in TABLES:
        lines += [f"**{title}**", "", "| configuration | seeds | val gIoU | val cIoU | test gIoU | test cIoU |", "|---|---|---|---|---|---|"]
        for name, label in rows:
            rs = runs.get(name, [])
            cells = [mean_std([r[s][m] for r in rs]) for s in SPLITS for m in ("giou", "ciou")]
            lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    lines += ["**Every run** (val / test gIoU; a mean over seeds hides whether a run left the early plateau)", "",
              "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name in CONFIGS:
        by_seed = {r["seed"]: r for r in runs.get(name, [])}
        if by_seed:
            cells = [f"{100 * by_seed[s]['val']['giou']:.1f} / {100 * by_seed[s]['test']['giou']:.1f}" if s in by_seed else "—" for s in seeds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    steps = {r["steps"] for rs in runs.values() for r in rs}
    secs = [r["train_seconds"] for rs in runs.values() for r in rs]
    if secs:
        lines.append(f"Budget: {', '.join(map(str, sorted(steps)))} steps per run; training took {min(secs):.0f}–{max(secs):.0f} s per run.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ablations"))
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (the same budget for all)")
    ap.add_argument("--train-n", type=int, default=10000, help="synthetic training scenes")
    ap.add_argument("--val-n", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=200, help="scenes of synthetic:val and :test scored per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each when > 1")
    ap.add_argument("--report", action="store_true", help="only print the tables of the finished runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        todo = [(c, s) for s in args.seeds for c in args.configs]
        threads = 1 if args.jobs > 1 else None
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_one, args.out, name, seed, args, threads): (name, seed) for name, seed in todo}
            for i, future in enumerate(as_completed(futures), 1):
                name, seed = futures[future]
                future.result()
                print(f"[{i}/{len(todo)}] {name} seed {seed} done", file=sys.stderr, flush=True)
    table = report(args.out)
    (args.out / "tables.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

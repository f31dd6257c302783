"""Time from `cores train` to its first optimizer step, on the CPU.

    python benchmarks/train_start.py                      # 5 runs of the tiny-synthetic recipe
    python benchmarks/train_start.py --runs 3 --json
    python benchmarks/train_start.py --set data.num_workers=0
    python benchmarks/train_start.py --fresh-ops --runs 1     # a first run: no compiled op cached

Each run is a fresh process, `python -m cores_cli train --gpus 0 --recipe tiny-synthetic`
(what the `cores` script runs), writing into its own temporary run directory. The run counts as
having reached step 1 when its ``metrics.jsonl`` holds the first ``"kind": "train"`` record
(written right after the step's update, before anything else); the process is then stopped and
its folder removed. Reported: median and range of the seconds from starting the process to that
record.

``--fresh-ops`` gives each run an empty ``TORCH_EXTENSIONS_DIR`` (where PyTorch builds and caches
the C++ ops DeepSpeed compiles on first use), so the time is a first run's on this machine, and
lists whatever was built there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.02
"""How often the metrics file is looked at: the resolution of the measurement."""


def first_step_record(metrics: Path) -> dict | None:
    """The first training record of ``metrics`` (a complete line only), or None."""
    try:
        text = metrics.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # being written
        record = json.loads(line)
        if record.get("kind") == "train":
            return record
    return None


def one_run(recipe: str, overrides: list[str], timeout: float, fresh_ops: bool = False) -> tuple[float, list[str]]:
    """Seconds from starting `cores train` to its first step's record, and (``fresh_ops``) the
    ops built into the run's own empty TORCH_EXTENSIONS_DIR by then."""
    with tempfile.TemporaryDirectory(prefix="cores-train-start-") as tmp:
        run_dir = Path(tmp) / "run"
        log = Path(tmp) / "output.log"
        ops = Path(tmp) / "torch_extensions"
        argv = [sys.executable, "-m", "cores_cli", "train", "--gpus", "0", "--recipe", recipe, "--run-dir", str(run_dir)]
        for item in overrides:
            argv += ["--set", item]
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ops)} if fresh_ops else None
        with open(log, "wb") as out:
            start = time.perf_counter()
            # its own process group, so that DataLoader workers go with it
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            try:
                while True:
                    if first_step_record(run_dir / "metrics.jsonl") is not None:
                        seconds = time.perf_counter() - start
                        built = sorted({p.parent.name for p in ops.rglob("build.ninja")}) if fresh_ops else []
                        return seconds, built
                    if proc.poll() is not None:
                        raise SystemExit(f"`cores train` ended (status {proc.returncode}) before its first step:\n{log.read_text(errors='replace')[-3000:]}")
                    if time.perf_counter() - start > timeout:
                        raise SystemExit(f"no first step after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
                    time.sleep(POLL_S)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Fresh processes to time (median and range reported).")
    parser.add_argument("--recipe", default="tiny-synthetic", help="Recipe name or file (default tiny-synthetic).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="A recipe override passed on as `--set` (repeatable).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up on a run after this many seconds.")
    parser.add_argument("--fresh-ops", action="store_true", help="Each run with an empty TORCH_EXTENSIONS_DIR (a first run's compiled-op cost); lists the ops built.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    times, built = [], set()
    for i in range(args.runs):
        seconds, ops = one_run(args.recipe, args.overrides, args.timeout, args.fresh_ops)
        times.append(seconds)
        built.update(ops)
        if not args.json:
            extra = f"; ops built: {', '.join(ops) or 'none'}" if args.fresh_ops else ""
            print(f"run {i + 1}: {seconds:.2f} s to step 1{extra}", flush=True)
    summary = {"recipe": args.recipe, "overrides": args.overrides, "runs": args.runs, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    if args.fresh_ops:
        summary["ops_built"] = sorted(built)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.recipe}: median {summary['median_s']:.2f} s to step 1 over {args.runs} runs (range {summary['min_s']:.2f}-{summary['max_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

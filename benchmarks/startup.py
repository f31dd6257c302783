"""Start-up time of the `cores` command: `cores --help` and every `cores CMD --help`.

    python benchmarks/startup.py            # median of 5 runs each, and what the import costs
    python benchmarks/startup.py --runs 9 --json

Each run is a fresh process (`python -m cores_cli ... --help`, what the `cores` script runs), timed
from start to exit. `python -X importtime` then shows where the import time of the command
line goes and confirms that torch, transformers and deepspeed are not among it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = ["", "predict", "eval", "train", "export", "build-context", "make-reasonpart"]
HEAVY = ("torch", "transformers", "deepspeed", "peft", "segment_anything", "openai")


def time_help(command: str, runs: int) -> list[float]:
    argv = [sys.executable, "-m", "cores_cli", *([command] if command else []), "--help"]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def import_profile(top: int = 8) -> tuple[float, list[tuple[str, float]], list[str]]:
    """Total import time of the command line, its most expensive imports (cumulative seconds,
    top-level packages only) and the heavy packages it imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import cores_cli.cli.app"], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        if cumulative.strip().isdigit():
            rows.append((name[1:].rstrip(), int(cumulative) / 1e6))  # nesting shows as indentation
    total = next(seconds for name, seconds in rows if name == "cores_cli.cli.app")
    # what cores_cli.cli.app imports directly: one level of indentation below it
    top_level = [(name.strip(), s) for name, s in rows if name.startswith("  ") and not name.startswith("   ")]
    heavy = sorted({name.strip().split(".")[0] for name, _ in rows} & set(HEAVY))
    return total, sorted(top_level, key=lambda r: -r[1])[:top], heavy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Runs per command (the median is reported).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args(argv)
    medians = {f"cores {c} --help".replace("  ", " "): statistics.median(time_help(c, args.runs)) for c in COMMANDS}
    total, top, heavy = import_profile()
    if args.json:
        print(json.dumps({"runs": args.runs, "median_s": medians, "import_s": total, "top_imports_s": dict(top), "heavy_imported": heavy}))
        return 0
    print(f"median of {args.runs} runs, seconds")
    for name, seconds in medians.items():
        print(f"  {name:<32} {seconds:6.2f}")
    print(f"import cores_cli.cli.app: {total:.2f} s; heavy packages imported: {', '.join(heavy) or 'none'}")
    for name, seconds in top:
        print(f"  {name:<32} {seconds:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

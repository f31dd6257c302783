"""The ablation script (docs/RESULTS.md's tables) end to end in a smoke setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "ablations.py"


def run(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["--out", str(out), "--steps", "2", "--train-n", "16", "--val-n", "4", "--eval-n", "4", "--seeds", "0", *extra]
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


def test_the_ablation_script_trains_scores_and_tabulates(tmp_path):
    res = run(tmp_path, "--configs", "depth1", "no_refiner", "--jobs", "2")
    assert res.returncode == 0, res.stderr
    for name in ("depth1-s0", "no_refiner-s0"):
        scores = json.loads((tmp_path / name / "scores.json").read_text())
        assert scores["steps"] == 2 and scores["val"]["n"] == 4 and scores["test"]["n"] == 4
        assert 0.0 <= scores["val"]["giou"] <= 1.0
    table = (tmp_path / "tables.md").read_text()
    assert table == res.stdout.rstrip("\n") + "\n"
    assert "| [SEG] (depth 1, LISA-like) | 1 |" in table
    assert "| CoReS without the refiner | 1 |" in table
    assert "| [LOC] → [SEG] (depth 2, CoReS) | 0 | — |" in table  # not run: shown as missing

    # finished runs are not trained again
    before = (tmp_path / "depth1-s0" / "scores.json").stat().st_mtime_ns
    res = run(tmp_path, "--configs", "depth1")
    assert res.returncode == 0
    assert (tmp_path / "depth1-s0" / "scores.json").stat().st_mtime_ns == before

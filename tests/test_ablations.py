"""The ablation script (docs/RESULTS.md's tables) end to end in a smoke setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "ablations.py"


def run(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["--out", str(out), "--steps", "2", "--train-n", "16", "--val-n", "4", "--eval-n", "4", "--seeds", "0", *extra]
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
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


def test_the_tables_give_mean_and_sample_std_over_seeds(tmp_path):
    ablations = load_benchmark("ablations")
    for seed, (v, t) in enumerate([(0.5, 0.2), (0.6, 0.4), (0.7, 0.6)]):
        run_dir = tmp_path / f"cores-s{seed}"
        run_dir.mkdir()
        scores = {"config": "cores", "seed": seed, "steps": 10, "train_seconds": 5.0 + seed,
                  "val": {"giou": v, "ciou": v, "n": 4}, "test": {"giou": t, "ciou": 0.3, "n": 4}}
        (run_dir / "scores.json").write_text(json.dumps(scores))
    table = ablations.report(tmp_path)
    # val 0.5/0.6/0.7: mean 60.0, sample std 10.0; test 0.2/0.4/0.6: 40.0 ± 20.0; cIoU constant
    assert "| [LOC] → [SEG] (depth 2, CoReS) | 3 | 60.0 ± 10.0 | 60.0 ± 10.0 | 40.0 ± 20.0 | 30.0 ± 0.0 |" in table
    assert "Budget: 10 steps per run; training took 5–7 s per run." in table


def test_the_figure_script_draws_one_row_per_scene(tmp_path):
    from PIL import Image

    from cores_cli.engine.loading import embedded_checkpoint

    ckpt = str(embedded_checkpoint())
    out = tmp_path / "fig.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "figure_examples.py"), "--lisa", ckpt, "--cores", ckpt, "--out", str(out), "--n", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    width, height = Image.open(out).size
    # five 128-px panels at 2x with 4-px gaps; per row a 24-px caption, a 22-px title, 6 px of space
    assert width == 5 * (2 * 128 + 4)
    assert height == 2 * (24 + 22 + 2 * 128 + 6)

"""The tiny checkpoint shipped in the package: it loads, it is the default of predict and eval,
and it still reaches the gIoU recorded in docs/RESULTS.md (a regression test)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO
from typer.testing import CliRunner

from cores_cli.cli.app import app
from cores_cli.data.registry import load_samples
from cores_cli.engine.checkpoint import load_checkpoint
from cores_cli.engine.evaluate import evaluate
from cores_cli.engine.loading import EMBEDDED_SOURCE, embedded_checkpoint, exemplar_sampler

# synthetic:val, first 50 scenes, teacher-forced, seed 0: the number docs/RESULTS.md records.
RECORDED_VAL50_GIOU = 0.6537
TOLERANCE = 0.005  # float differences across CPUs and BLAS builds, not a regression

runner = CliRunner()


def test_the_shipped_checkpoint_is_small_and_loads_cleanly():
    path = embedded_checkpoint()
    assert path is not None, "the package ships no checkpoint in cores_cli/assets/demo"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 8_000_000
    model, report = load_checkpoint(path)
    assert not report.missing and not report.unexpected
    assert model.cfg.preset == "tiny" and model.cfg.chain.depth == 2


def test_it_still_reaches_the_recorded_giou():
    model, _ = load_checkpoint(embedded_checkpoint())
    result = evaluate(model, load_samples("synthetic:val", n=50), batch_size=16, exemplars=exemplar_sampler(model, None, 0), seed=0)
    assert result.metrics["giou"] >= RECORDED_VAL50_GIOU - TOLERANCE, result.metrics


def test_the_docs_record_the_same_number():
    text = (REPO / "docs" / "RESULTS.md").read_text()
    # the row "| first 50 scenes of synthetic:val ... | 50 | 65.4 | ..." of its table
    match = re.search(r"^\| first 50 scenes of synthetic:val[^|\n]*\|\s*50\s*\|\s*([0-9.]+)\s*\|", text, re.M)
    assert match, "docs/RESULTS.md must state the shipped model's gIoU on the first 50 val scenes"
    assert float(match.group(1)) == pytest.approx(100 * RECORDED_VAL50_GIOU, abs=0.05)


def test_predict_and_eval_need_no_model_argument(tmp_path):
    result = runner.invoke(app, ["predict", "--example", "-o", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["model"]["source"] == EMBEDDED_SOURCE
    assert record["mask_area"] > 0
    result = runner.invoke(app, ["eval", "--dataset", "synthetic:val", "--opt", "n=8", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metrics"]["n"] == 8


def test_without_the_embedded_model_the_error_says_what_to_pass(monkeypatch, tmp_path):
    import cores_cli.engine.loading as loading

    monkeypatch.setattr(loading, "embedded_checkpoint", lambda: None)
    result = runner.invoke(app, ["predict", "--example", "-o", str(tmp_path)])
    assert result.exit_code != 0
    assert "no embedded default" in result.stderr and "--checkpoint" in result.stderr
    assert not list(tmp_path.iterdir())


def test_checkpoint_and_preset_together_are_refused(tmp_path):
    result = runner.invoke(app, ["predict", "--example", "-c", str(embedded_checkpoint()), "--preset", "tiny", "-o", str(tmp_path)])
    assert result.exit_code != 0
    assert "either --checkpoint or --preset" in result.stderr

"""`cores eval --resume`: an evaluation killed part way and restarted with the same command
continues from its per-target file, scores no target twice, and ends with the metrics of an
uninterrupted run; a file written for another evaluation is refused (issue 15, item 6)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, error_lines, invoke_cli
from proc_helpers import kill_after_lines

from cores_cli.engine import evaluate as evaluate_module
from cores_cli.engine.eval_run import partial_path

N = 8
COMMON = ["--dataset", "synthetic:val", "--opt", f"n={N}", "--device", "cpu", "--batch-size", "1", "--set", "prompt.in_context_k=0"]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def counted_queries(monkeypatch):
    """How many queries the evaluation asks the model, in this process."""
    asked = []
    original = evaluate_module.Predictor.predict_images

    def counting(self, items, *args, **kwargs):
        asked.extend(q.name for _, queries in items for q in queries)
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(evaluate_module.Predictor, "predict_images", counting)
    return asked


def killed_run(ckpt: Path, out: Path, after: int, *extra: str) -> list[dict]:
    """``cores eval`` in a process SIGKILLed once its per-target file holds ``after`` lines;
    returns what the file held then."""
    cmd = [sys.executable, "-m", "cores_cli", "eval", *COMMON, "-c", str(ckpt), "-o", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    samples_file = out.with_name(out.stem + ".samples.jsonl")
    growing = partial_path(samples_file)
    kill_after_lines(cmd, growing, after, env, out.parent)
    assert not out.exists() and not samples_file.exists()  # killed before the end: no results, no final file
    return [json.loads(line) for line in growing.read_bytes().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_killed_evaluation_resumes_to_the_uninterrupted_metrics(tiny_checkpoint, tmp_path, counted_queries):
    whole = tmp_path / "whole.json"
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", whole, "--save-masks")
    assert result.exit_code == 0, result.stderr
    counted_queries.clear()

    out = tmp_path / "part.json"
    before = killed_run(tiny_checkpoint, out, 3, "--save-masks")
    assert 3 <= len(before) < N
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--save-masks", "--resume")
    assert result.exit_code == 0, result.stderr
    assert f"resuming from {out.with_name('part.samples.jsonl')}: {len(before)} targets" in result.stderr
    # only the targets the killed run had not written were scored again
    assert sorted(counted_queries) == sorted({r["id"] for r in lines(out.with_name("whole.samples.jsonl"))} - {r["id"] for r in before})

    resumed, uninterrupted = json.loads(out.read_text()), json.loads(whole.read_text())
    assert resumed["metrics"] == uninterrupted["metrics"] and resumed["metrics"]["n"] == N
    assert resumed["protocol"] == uninterrupted["protocol"]
    records = lines(out.with_name("part.samples.jsonl"))
    assert len({r["id"] for r in records}) == len(records) == N  # no target twice
    assert records == lines(tmp_path / "whole.samples.jsonl")  # the same lines, in the same order
    assert not partial_path(out.with_name("part.samples.jsonl")).exists()  # the growing copy is gone


def test_resume_continues_from_a_file_cut_mid_line_and_skips_what_is_done(tiny_checkpoint, tmp_path, counted_queries):
    """The same as a kill, without a process: the file of a finished run, cut in the middle of
    a line as a kill during a write would leave it."""
    out = tmp_path / "r.json"
    args = ["eval", *COMMON, "-c", tiny_checkpoint, "-o", out]
    assert invoke_cli(*args).exit_code == 0
    full = (tmp_path / "r.samples.jsonl").read_bytes()
    metrics = json.loads(out.read_text())["metrics"]
    cut = full.split(b"\n")
    (tmp_path / "r.samples.jsonl").write_bytes(b"\n".join(cut[:3]) + b"\n" + cut[3][: len(cut[3]) // 2])
    out.unlink()
    counted_queries.clear()
    result = invoke_cli(*args, "--resume")
    assert result.exit_code == 0, result.stderr
    assert len(counted_queries) == N - 3  # the cut line's target is scored again, no other
    assert json.loads(out.read_text())["metrics"] == metrics
    assert (tmp_path / "r.samples.jsonl").read_bytes() == full


def test_resume_of_a_finished_run_scores_nothing(tiny_checkpoint, tmp_path, counted_queries):
    out = tmp_path / "r.json"
    args = ["eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "3"]
    assert invoke_cli(*args).exit_code == 0
    first = json.loads(out.read_text())
    counted_queries.clear()
    assert invoke_cli(*args, "--resume").exit_code == 0
    assert counted_queries == [] and json.loads(out.read_text())["metrics"] == first["metrics"]


def test_resume_with_nothing_written_yet_starts_from_the_beginning(tiny_checkpoint, tmp_path):
    out = tmp_path / "r.json"
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "2", "--resume")
    assert result.exit_code == 0, result.stderr
    assert len(lines(tmp_path / "r.samples.jsonl")) == 2


@pytest.mark.parametrize(
    "changed,differs",
    [
        (["--seed", "1"], "seed"),
        (["--limit", "2"], "limit"),
        (["--opt", "n=9"], "reader_options"),
        (["--set", "prompt.in_context_k=1"], "overrides"),
        (["--save-masks"], "save_masks"),
        (["--preset", "tiny"], "model"),
    ],
)
def test_resume_refuses_a_file_of_another_evaluation(tiny_checkpoint, tmp_path, changed, differs, monkeypatch):
    out = tmp_path / "r.json"
    assert invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "3").exit_code == 0
    before = (tmp_path / "r.samples.jsonl").read_bytes()
    from cores_cli.engine import loading

    monkeypatch.setattr(loading, "load_for_inference", lambda *a, **k: pytest.fail("the model loaded"))
    model = [] if "--preset" in changed else ["-c", tiny_checkpoint]
    result = invoke_cli("eval", *COMMON, *model, "-o", out, "--limit", "3", *changed, "--resume")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "belongs to another evaluation" in line and differs in line.split("differs in:")[1]
    assert (tmp_path / "r.samples.jsonl").read_bytes() == before  # untouched


def test_resume_refuses_a_file_it_cannot_tell_was_written_by_this_evaluation(tiny_checkpoint, tmp_path):
    mine = tmp_path / "r.samples.jsonl"
    mine.write_text('{"id": "x#0"}\n')
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", tmp_path / "r.json", "--resume")
    assert result.exit_code == 1
    assert "has no record of the evaluation that wrote it" in error_lines(result)[0]
    assert mine.read_text() == '{"id": "x#0"}\n'
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "--resume")
    assert result.exit_code == 1 and "give --output or --per-sample" in error_lines(result)[0]


def test_an_interrupted_run_leaves_the_earlier_per_target_file_as_it_was(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    assert invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "3").exit_code == 0
    before = (tmp_path / "r.samples.jsonl").read_bytes()
    from cores_cli.engine import eval_run

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_run, "write_outputs", stop)  # as a kill before the final write
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "2")
    assert result.exit_code != 0
    assert (tmp_path / "r.samples.jsonl").read_bytes() == before
    assert len(lines(partial_path(tmp_path / "r.samples.jsonl"))) == 2  # what the stopped run had scored


def test_without_resume_an_existing_file_is_replaced_as_before(tiny_checkpoint, tmp_path):
    out = tmp_path / "r.json"
    (tmp_path / "r.samples.jsonl").write_text("an older file\n")
    assert invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "2").exit_code == 0
    assert len(lines(tmp_path / "r.samples.jsonl")) == 2
    # and the same command again starts from scratch, whatever the file holds
    assert invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", out, "--limit", "2").exit_code == 0
    assert len(lines(tmp_path / "r.samples.jsonl")) == 2


def test_a_foreign_file_at_the_fingerprint_name_is_never_overwritten(tiny_checkpoint, tmp_path):
    foreign = tmp_path / ".r.samples.jsonl.resume.json"
    foreign.write_text("not ours")
    result = invoke_cli("eval", *COMMON, "-c", tiny_checkpoint, "-o", tmp_path / "r.json", "--limit", "1")
    assert result.exit_code == 1 and "did not write it" in error_lines(result)[0]
    assert foreign.read_text() == "not ours"

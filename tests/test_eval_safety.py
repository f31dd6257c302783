"""`cores eval` says what it read and never loses what it computed (issue 11, items 6, 10, 13).

- Reader warnings (shapes outside the image or drawn for a larger one, shapes given as a dict
  or string, a blank query, no target polygon) are summarised on stderr, stored in the results
  JSON and in the per-target records; ``--strict`` refuses them before the model loads.
- Output paths that cannot be written, or that name an input, fail in one line before the model
  loads; a write that fails after the evaluation leaves the metrics printed and exits 1.
- The missing-image hint names the command-line option.

Names from the modules under test are imported inside the tests that need them, so each test
fails on its own account against code that lacks them.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_data import reasonseg_shape, write_reasonseg
from typer.testing import CliRunner

from cores_cli.cli.app import app

runner = CliRunner()

SPLIT = Path("reason_seg") / "ReasonSeg" / "val"


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def warned_dataset(root: Path) -> dict[str, list[str]]:
    """A ReasonSeg val split of 32×32 images: one clean sample and one per kind of bad
    annotation. Returns the expected sample ids per warning kind."""
    d = root / SPLIT
    target = [reasonseg_shape("target", _square(4, 4, 20, 20))]
    write_reasonseg(d, "clean", ["the thing"], False, target, (32, 32))
    write_reasonseg(d, "outside", ["the thing"], False, [reasonseg_shape("target", _square(40, 40, 60, 60))], (32, 32))
    write_reasonseg(d, "larger", ["the thing"], False, [reasonseg_shape("target", _square(10, 10, 60, 60))], (32, 32))
    write_reasonseg(d, "dict_shapes", ["the thing"], False, {"target": _square(4, 4, 20, 20)}, (32, 32))
    write_reasonseg(d, "str_shapes", ["the thing"], False, "target", (32, 32))
    write_reasonseg(d, "blank", ["   "], False, target, (32, 32))
    write_reasonseg(d, "no_target", ["the thing"], False, [reasonseg_shape("ignore", _square(4, 4, 20, 20))], (32, 32))
    sid = lambda stem: f"reasonseg/val/{stem}"  # noqa: E731
    return {
        "no_target": [sid("dict_shapes"), sid("no_target"), sid("str_shapes")],
        "shapes_not_list": [sid("dict_shapes"), sid("str_shapes")],
        "blank_query": [sid("blank")],
        "shape_beyond_image": [sid("larger")],
        "shape_outside_image": [sid("outside")],
    }


def cli(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def clean_exit(result) -> bool:
    """The command ended through its own exit, not an escaped exception (a traceback)."""
    return result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def no_model(monkeypatch):
    """Make loading the model fail loudly: a check that must come first is then provably first."""
    import cores_cli.engine.loading as loading

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_for_inference", refuse)


# ------------------------------------------------------------------------- item 6: warnings


def test_reader_warnings_are_summarised_and_stored(tmp_path):
    expected = warned_dataset(tmp_path)
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "6 of 7 samples have reader warnings" in result.stderr
    for kind, ids in expected.items():
        line = next(li for li in result.stderr.splitlines() if li.strip().startswith(f"{kind}:"))
        assert all(i in line for i in ids)
    stored = json.loads(out.read_text())["warnings"]
    assert stored["samples"] == 6
    assert stored["counts"] == {k: len(v) for k, v in expected.items()}
    assert stored["sample_ids"] == expected
    assert "reasonseg/val/clean" not in stored["messages"]
    assert "wholly outside the 32×32 image" in stored["messages"]["reasonseg/val/outside"][0]
    # the --json line carries them too, and each target record names its sample's kinds
    assert json.loads(result.stdout)["warnings"] == stored
    records = {r["sample_id"]: r for r in map(json.loads, (tmp_path / "res.samples.jsonl").read_text().splitlines())}
    assert "warnings" not in records["reasonseg/val/clean"]
    assert records["reasonseg/val/dict_shapes"]["warnings"] == ["no_target", "shapes_not_list"]
    assert records["reasonseg/val/blank"]["warnings"] == ["blank_query"]


def test_strict_refuses_warned_samples_before_the_model_loads(tmp_path, no_model):
    warned_dataset(tmp_path)
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "-o", out, "--strict")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --strict: 6 of 7 samples have reader warnings") and "nothing was evaluated" in last
    assert "shape_outside_image: reasonseg/val/outside" in result.stderr  # the summary came first
    assert not out.exists() and not (tmp_path / "res.samples.jsonl").exists()


def test_strict_with_several_processes_refuses_once_before_launching_them(tmp_path, no_model, monkeypatch):
    import subprocess as sp

    def no_launch(*_a, **_k):
        raise AssertionError("processes were launched")

    monkeypatch.setattr(sp, "call", no_launch)
    warned_dataset(tmp_path)
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--gpus", "2", "--strict")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    assert result.stderr.count("--strict: 6 of 7 samples have reader warnings") == 1
    assert result.stderr.count("shape_outside_image: reasonseg/val/outside") == 1


def test_strict_evaluates_clean_data(tmp_path):
    out = tmp_path / "res.json"
    result = cli("--dataset", "synthetic:val", "--opt", "n=2", "--preset", "tiny", "--device", "cpu", "-o", out, "--strict")
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["warnings"] == {"samples": 0, "counts": {}, "sample_ids": {}, "messages": {}}
    assert "reader warnings" not in result.stderr


def test_every_reader_warning_has_a_kind(tmp_path):
    from cores_cli.data.masks import parse_coco_segmentation, parse_labelme_shapes
    from cores_cli.data.reasonseg import read_split_dir
    from cores_cli.data.records import WARNING_KINDS, warning_kind

    _, labelme = parse_labelme_shapes(
        [
            "not a shape",
            {"label": 3, "points": _square(0, 0, 2, 2)},
            {"label": "a", "points": [1, 2]},
            {"label": "b", "points": []},
            {"label": "c", "points": [[float("inf"), 0], [1, 1], [2, 2]]},
            {"label": "d", "points": [[0, 0], [1, 1]]},
        ]
    )
    assert [warning_kind(w) for w in labelme] == ["shape_without_points", "label_not_string", "bad_points", "no_points", "bad_coordinate", "few_points"]
    _, _, coco = parse_coco_segmentation([[0, 0, 1], {"counts": "abc", "size": [3, 3]}])
    assert [warning_kind(w) for w in coco] == ["bad_polygon", "bad_rle"]
    assert warning_kind(parse_coco_segmentation(7)[2][0]) == "unsupported_segmentation"
    warned_dataset(tmp_path)
    samples = read_split_dir(tmp_path / SPLIT)
    for s in samples:
        assert all(warning_kind(w) in WARNING_KINDS and warning_kind(w) != "other" for w in s.meta.get("warnings", []))
    # kinds survive the trip to another process, and a warning still reads as its message
    (copy,) = pickle.loads(pickle.dumps([s for s in samples if s.sample_id.endswith("/larger")]))
    (w,) = copy.meta["warnings"]
    assert warning_kind(w) == "shape_beyond_image" and json.loads(json.dumps(w)) == str(w) and "beyond the 32×32 image" in w


def test_shapes_reaching_past_the_image_are_reported_but_border_points_are_not(tmp_path):
    from cores_cli.data.reasonseg import read_split_dir
    from cores_cli.data.records import warning_kind

    d = tmp_path / "split"
    write_reasonseg(d, "border", ["q"], False, [reasonseg_shape("target", _square(0, 0, 100, 50))], (50, 100))
    write_reasonseg(d, "just_past", ["q"], False, [reasonseg_shape("target", _square(-1.5, 0, 101.5, 51))], (50, 100))
    write_reasonseg(d, "twice", ["q"], False, [reasonseg_shape("target", _square(20, 10, 200, 100))], (50, 100))
    by_stem = {s.sample_id.rsplit("/", 1)[1]: s for s in read_split_dir(d)}
    assert "warnings" not in by_stem["border"].meta and "warnings" not in by_stem["just_past"].meta
    (w,) = by_stem["twice"].meta["warnings"]
    assert warning_kind(w) == "shape_beyond_image" and "x 20..200, y 10..100, beyond the 100×50 image" in w


@pytest.mark.slow
def test_two_processes_count_each_warning_once(tmp_path):
    """Every rank reads all samples; only rank 0 reports, so counts are not multiplied."""
    expected = warned_dataset(tmp_path)
    out = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cores_cli", "eval", "--dataset", "reasonseg:val", "--data-root", str(tmp_path), "--preset", "tiny", "--device", "cpu", "--gpus", "2", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["protocol"]["processes"] == 2
    assert data["warnings"]["counts"] == {k: len(v) for k, v in expected.items()}
    assert data["warnings"]["sample_ids"] == expected
    assert done.stderr.count("warning: 6 of 7 samples have reader warnings") == 1  # rank 0 alone reports


# ------------------------------------------------------------------------ item 10: outputs


@pytest.mark.parametrize(
    "args,message",
    [
        (["-o", "{file}/res.json"], "cannot write --output {file}/res.json: {file} is a file, not a folder"),
        (["-o", "{dir}"], "--output {dir} is a folder"),
        (["--per-sample", "{file}/deeper/s.jsonl"], "cannot write --per-sample {file}/deeper/s.jsonl: {file} is a file"),
        (["-o", "{tmp}/r.json", "--save-vis", "2", "--vis-dir", "{file}"], "--vis-dir {file} is a file"),
        (["-o", "{tmp}/r.json", "--per-sample", "{tmp}/r.json"], "--output and --per-sample are the same file"),
    ],
)
def test_unwritable_outputs_fail_before_the_model_loads(tmp_path, no_model, args, message):
    a_file = tmp_path / "notes.txt"
    a_file.write_bytes(b"the user's notes\n")
    (tmp_path / "a_dir").mkdir()
    fill = lambda s: s.format(file=a_file, dir=tmp_path / "a_dir", tmp=tmp_path)  # noqa: E731
    result = cli("--dataset", "synthetic:val", "--opt", "n=2", "--preset", "tiny", *map(fill, args))
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fill(message) in lines[0]
    assert a_file.read_bytes() == b"the user's notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "notes.txt"]


def test_an_output_naming_an_input_file_is_refused(tmp_path):
    warned_dataset(tmp_path)
    annotation = tmp_path / SPLIT / "clean.json"
    before = annotation.read_bytes()
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "-o", annotation)
    assert annotation.read_bytes() == before  # the user's annotation, byte for byte
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    assert "is one of the inputs" in result.stderr.strip().splitlines()[-1]
    assert "gIoU" not in result.stderr  # refused before evaluating


def test_a_failed_write_after_the_evaluation_keeps_the_metrics(tmp_path, monkeypatch):
    import cores_cli.engine.eval_run as eval_run

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(eval_run, "atomic_write_json", disk_full)
    out = tmp_path / "res.json"
    result = cli("--dataset", "synthetic:val", "--opt", "n=3", "--preset", "tiny", "--device", "cpu", "-o", out)
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"could not write {out}: No space left on device" in last and "printed on stdout" in last
    assert "gIoU" in result.stderr  # the table came before the write
    printed = json.loads(result.stdout)
    assert printed["metrics"]["n"] == 3 and printed["dataset"] == "synthetic:val"
    # the other output was still written, and agrees with the printed metrics
    from cores_cli.engine.evaluate import metrics_from_records

    records = [json.loads(li) for li in (tmp_path / "res.samples.jsonl").read_text().splitlines()]
    assert metrics_from_records(records)["giou"] == printed["metrics"]["giou"]
    assert not out.exists()


def test_a_failed_overlay_is_reported_after_the_metrics_are_written(tmp_path, monkeypatch):
    import cores_cli.engine.eval_run as eval_run

    real_save = eval_run.save_image_atomic

    def first_fails(image, path, *a, **k):
        if Path(path).name.startswith("001_"):
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        real_save(image, path, *a, **k)

    monkeypatch.setattr(eval_run, "save_image_atomic", first_fails)
    out = tmp_path / "res.json"
    result = cli("--dataset", "synthetic:val", "--opt", "n=3", "--preset", "tiny", "--device", "cpu", "-o", out, "--save-vis", "3")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    assert f"the metrics were written to {out}" in result.stderr.strip().splitlines()[-1]
    assert json.loads(out.read_text())["metrics"]["n"] == 3
    assert sorted(p.name[:3] for p in (tmp_path / "res_worst").glob("*.png")) == ["002", "003"]


# ----------------------------------------------------------------- item 13: the missing hint


def test_missing_image_hint_names_the_command_line_option(tmp_path):
    d = tmp_path / SPLIT
    write_reasonseg(d, "here", ["q"], False, [reasonseg_shape("target", _square(0, 0, 4, 4))], (8, 8))
    write_reasonseg(d, "gone", ["q"], False, [reasonseg_shape("target", _square(0, 0, 4, 4))])
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu")
    assert result.exit_code == 1 and clean_exit(result)
    last = result.stderr.strip().splitlines()[-1]
    assert "1 of 2 images are missing" in last and "--opt skip_missing=true" in last
    assert "skip_missing=True in Python" in last  # still right for library callers
    # and the option it names does what it says
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "--opt", "skip_missing=true", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["protocol"]["samples"] == 1

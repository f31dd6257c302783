"""`cores eval` says what it read and never loses what it computed (issue 11, items 6, 10, 13).

- Reader warnings (shapes outside the image or drawn for a larger one, shapes given as a dict
  or string, a blank query, no target polygon) are summarised on stderr, stored in the results
  JSON and in the per-target records; ``--strict`` refuses them before the model loads.
- Output paths that cannot be written, or that name an input, fail in one line before the model
  loads; a write that fails after the evaluation leaves the metrics printed and exits 1.
- The missing-image hint names the command-line option.
- Re-test: no output lands in a folder of the dataset's files, whatever --limit, subset or
  skip_missing leave out; chain and image tokens in a query are removed with a warning; an
  unreadable image leaves its sample out of the metrics with a warning (--strict: exit 1 after
  the results are kept); a dataset name is printed as written (no Rich markup); reader option
  values are checked (types, ranges, allowed words) in one line.

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


# ------------------------------------------------- re-test: outputs inside the dataset (B2)


def three_samples(root: Path) -> Path:
    """A ReasonSeg val split of three clean 32×32 samples a, b, c; returns the split folder."""
    d = root / SPLIT
    for stem in ("a", "b", "c"):
        write_reasonseg(d, stem, ["the thing"], False, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    return d


def test_limit_does_not_let_an_output_replace_an_annotation_it_left_out(tmp_path):
    d = three_samples(tmp_path)
    annotation = d / "c.json"
    before = annotation.read_bytes()
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "--limit", "1", "-o", annotation)
    assert annotation.read_bytes() == before  # the user's annotation, byte for byte
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    assert str(annotation) in result.stderr.strip().splitlines()[-1]
    assert "gIoU" not in result.stderr  # refused before evaluating


def test_an_output_over_an_annotation_that_skip_missing_leaves_out_is_refused(tmp_path):
    d = three_samples(tmp_path)
    orphan = write_reasonseg(d, "orphan", ["no image for this one"], False, [reasonseg_shape("target", _square(4, 4, 20, 20))])
    before = orphan.read_bytes()
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "--opt", "skip_missing=true", "-o", orphan)
    assert orphan.read_bytes() == before
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"--output {orphan} lies in" in last and "a folder of the dataset's files" in last


@pytest.mark.parametrize(
    "args,flag",
    [
        (["-o", "{split}/results.json"], "--output"),
        (["-o", "{tmp}/r.json", "--per-sample", "{split}/per_target.jsonl"], "--per-sample"),
        (["-o", "{tmp}/r.json", "--save-vis", "1", "--vis-dir", "{split}"], "--vis-dir"),
        (["-o", "{tmp}/r.json", "--save-vis", "1", "--vis-dir", "{tmp}/reason_seg/worst"], "--vis-dir"),
    ],
)
def test_no_output_may_be_written_into_a_dataset_folder(tmp_path, no_model, args, flag):
    """A new file there could replace a dataset file, or be read as an annotation next time."""
    d = three_samples(tmp_path)
    before = sorted(p.name for p in d.iterdir())
    fill = lambda s: s.format(split=d, tmp=tmp_path)  # noqa: E731
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", *map(fill, args))
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {flag} ") and "a folder of the dataset's files; write the results elsewhere" in last
    assert sorted(p.name for p in d.iterdir()) == before


def test_a_reasonpart_folder_takes_no_output(tmp_path, no_model):
    # a JSON beside the split folders would make the next `cores eval reasonpart:DIR` read DIR as a split
    out_dir = tmp_path / "rp"
    write_reasonseg(out_dir / "pascalpart", "x", ["Which part is it?"], True, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    result = cli("--dataset", f"reasonpart:{out_dir}", "--preset", "tiny", "-o", out_dir / "results.json")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    assert "a folder of the dataset's files" in result.stderr
    assert not (out_dir / "results.json").exists()


def test_results_beside_the_dataset_in_the_data_root_are_still_written(tmp_path, monkeypatch):
    three_samples(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = cli("--dataset", "reasonseg:val", "--data-root", ".", "--preset", "tiny", "--device", "cpu", "-o", "results.json", "--save-vis", "1")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "results.json").read_text())["protocol"]["samples"] == 3
    assert len(list((tmp_path / "results_worst").glob("*.png"))) == 1


# ---------------------------------------------------- re-test: special tokens in queries (B3)


def test_special_tokens_in_a_query_are_removed_warned_and_the_sample_scored(tmp_path):
    d = three_samples(tmp_path)
    write_reasonseg(d, "z_chain", ["x [SEG] y"], False, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    write_reasonseg(d, "z_image", ["<image> the [LOC] thing </s>"], True, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "--batch-size", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["metrics"]["n"] == 5  # every sample scored
    assert data["warnings"]["sample_ids"] == {"special_token_in_query": ["reasonseg/val/z_chain", "reasonseg/val/z_image"]}
    assert "special_token_in_query: reasonseg/val/z_chain, reasonseg/val/z_image" in result.stderr
    queries = {r["sample_id"]: r for r in map(json.loads, (tmp_path / "res.samples.jsonl").read_text().splitlines())}
    assert queries["reasonseg/val/z_chain"]["query"] == "x y"
    assert queries["reasonseg/val/z_image"]["query"] == "the thing"
    assert queries["reasonseg/val/z_image"]["warnings"] == ["special_token_in_query"]


def test_strict_refuses_a_query_with_special_tokens(tmp_path, no_model):
    d = three_samples(tmp_path)
    write_reasonseg(d, "z_chain", ["[SEG]"], False, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--strict")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    assert "special_token_in_query 1" in result.stderr.strip().splitlines()[-1]
    assert "blank_query: reasonseg/val/z_chain" in result.stderr  # nothing is left of that query


def test_every_special_token_is_removed_from_queries_of_any_reader():
    from cores_cli.data.records import QARound, SegSample, warning_kind
    from cores_cli.data.registry import QUERY_SPECIAL_TOKENS, without_special_tokens
    from cores_cli.model.mllm import TINY_SPECIAL_TOKENS

    assert {"[LOC]", "[POS]", "[SEG]", *TINY_SPECIAL_TOKENS} <= set(QUERY_SPECIAL_TOKENS)
    text = "a " + " b ".join(QUERY_SPECIAL_TOKENS) + " c"
    sample = SegSample("refcoco/x", "x.jpg", (QARound("clean", None), QARound(text, None, "phrase", "cat")), "refcoco", {"warnings": []})
    cleaned = without_special_tokens(sample)
    assert [r.query for r in cleaned.rounds] == ["clean", "a" + " b" * (len(QUERY_SPECIAL_TOKENS) - 1) + " c"]
    assert cleaned.rounds[1].class_name == "cat" and cleaned.rounds[1].style == "phrase"
    assert [warning_kind(w) for w in cleaned.meta["warnings"]] == ["special_token_in_query"]
    assert "query 1" in cleaned.meta["warnings"][0]
    assert sample.rounds[1].query == text  # the reader's record is left as it was


# -------------------------------------------------------- re-test: unreadable images (B4)


def truncate(path: Path) -> None:
    """Keep the header and cut the body: readers, which look at headers, still see an image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("mode", [[], ["--generate"]], ids=["teacher", "generate"])
def test_an_unreadable_image_is_left_out_and_reported(tmp_path, mode):
    d = three_samples(tmp_path)
    truncate(d / "c.jpg")
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "-o", out, "--json", *mode)
    assert result.exit_code == 0 and clean_exit(result), result.stderr
    data = json.loads(out.read_text())
    assert data["metrics"]["n"] == 2 and data["protocol"]["left_out"] == 1 and data["protocol"]["samples"] == 3
    assert data["warnings"]["sample_ids"] == {"unreadable_image": ["reasonseg/val/c"]}
    (message,) = data["warnings"]["messages"]["reasonseg/val/c"]
    assert "c.jpg" in message and "truncated" in message and "left out of the metrics" in message
    assert json.loads(result.stdout)["warnings"] == data["warnings"]
    records = [json.loads(li) for li in (tmp_path / "res.samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in records] == ["reasonseg/val/a", "reasonseg/val/b"]
    assert "gIoU" in result.stderr and "1 of 3 samples left out of the metrics" in result.stderr
    assert "unreadable_image: reasonseg/val/c" in result.stderr


def test_strict_fails_on_an_unreadable_image_after_keeping_the_results(tmp_path):
    d = three_samples(tmp_path)
    truncate(d / "a.jpg")
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "-o", out, "--strict")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --strict: 1 of 3 samples were left out of the metrics") and "reasonseg/val/a" in last
    assert "gIoU" in result.stderr  # the metrics came first
    data = json.loads(out.read_text())  # and were written, the left-out sample named
    assert data["metrics"]["n"] == 2 and data["warnings"]["counts"] == {"unreadable_image": 1}


# ------------------------------------------------- re-test: Rich markup in the dataset (B5)


@pytest.mark.parametrize("folder", ["[/x]", ":train:[bold]"])
def test_a_dataset_name_with_markup_is_printed_as_written(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(tmp_path)
    write_reasonseg(tmp_path / "rp" / folder, "x", ["Which part is it?"], True, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    name = f"reasonpart:rp/{folder}"
    result = cli("--dataset", name, "--preset", "tiny", "--device", "cpu", "-o", "res.json")
    assert result.exit_code == 0 and clean_exit(result), result.stderr
    assert f"evaluating {name}" in result.stderr
    assert json.loads((tmp_path / "res.json").read_text())["metrics"]["n"] == 1


# ------------------------------------------------- re-test: reader option values (B7)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"n": "abc"}, "option n must be an integer ≥ 1; got 'abc'"),
        ({"n": [1]}, "option n must be an integer ≥ 1; got [1]"),
        ({"n": 2.9}, "option n must be an integer ≥ 1; got 2.9"),
        ({"n": True}, "option n must be an integer ≥ 1; got True"),
        ({"queries": "bogus"}, "option queries must be one of first, all; got 'bogus'"),
        ({"subset": "bogus"}, "option subset must be one of short, long; got 'bogus'"),
        ({"rounds_per_sample": -1}, "option rounds_per_sample must be an integer ≥ 1; got -1"),
        ({"n_texts": 9}, "option n_texts must be an integer from 1 to 3; got 9"),
        ({"seed": -1}, "option seed must be an integer ≥ 0; got -1"),
    ],
)
def test_synthetic_option_values_are_checked(options, message):
    from cores_cli.data.registry import load_samples
    from cores_cli.errors import CoresError

    with pytest.raises(CoresError) as e:
        load_samples("synthetic:val", None, **options)
    assert str(e.value) == f"synthetic:val: {message}"


@pytest.mark.parametrize("options", [{"skip_missing": "maybe"}, {"skip_missing": 1}, {"rounds_per_sample": 0}, {"queries": ["first"]}])
def test_reasonseg_and_reasonpart_option_values_are_checked(tmp_path, options):
    from cores_cli.data.reasonseg import read_split_dir
    from cores_cli.data.registry import load_samples
    from cores_cli.errors import CoresError

    d = three_samples(tmp_path)
    key = next(iter(options))
    for call in (lambda: load_samples("reasonseg:val", tmp_path, **options), lambda: load_samples(f"reasonpart:{d}", **options), lambda: read_split_dir(d, **options)):
        with pytest.raises(CoresError, match=f"{key} must be "):
            call()


def test_synthetic_reader_checks_its_own_arguments():
    from cores_cli.data.synthetic import load_synthetic
    from cores_cli.errors import CoresError

    for bad, word in (({"n": "abc"}, "n must be an integer"), ({"n": 2.9}, "n must be an integer"), ({"subset": "bogus"}, "subset must be"), ({"queries": "x"}, "queries must be")):
        with pytest.raises(CoresError, match=word):
            load_synthetic("val", **bad)


@pytest.mark.parametrize("opt", ["n=abc", "n=[1]", "n=2.9", "subset=bogus"])
def test_bad_option_values_on_the_command_line_are_one_line(no_model, opt):
    result = cli("--dataset", "synthetic:val", "--opt", opt, "--preset", "tiny")
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: synthetic:val: option {opt.split('=')[0]} must be ")


def test_valid_option_values_still_work():
    from cores_cli.data.registry import load_samples

    assert len(load_samples("synthetic:val", None, n=4, seed=3, n_texts=2, queries="all", rounds_per_sample=1)) == 8


# ------------------------------------------------------------------ re-test: minor


def test_a_text_that_is_one_string_is_warned_and_used_as_the_query(tmp_path):
    from cores_cli.data.reasonseg import read_split_dir
    from cores_cli.data.records import warning_kind

    d = tmp_path / "split"
    p = write_reasonseg(d, "s", ["placeholder"], False, [reasonseg_shape("target", _square(0, 0, 4, 4))], (8, 8))
    anno = json.loads(p.read_text())
    anno["text"] = "the red cup"
    p.write_text(json.dumps(anno))
    (s,) = read_split_dir(d)
    assert s.rounds[0].query == "the red cup"
    assert [warning_kind(w) for w in s.meta["warnings"]] == ["text_not_list"]


@pytest.mark.slow
def test_two_processes_gather_unreadable_images_and_strict_exits_1_without_a_traceback(tmp_path):
    d = three_samples(tmp_path)
    write_reasonseg(d, "d", ["the thing"], False, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    truncate(d / "b.jpg")  # sample 1 of 4: the second process's
    out = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cores_cli", "eval", "--dataset", "reasonseg:val", "--data-root", str(tmp_path), "--preset", "tiny", "--device", "cpu", "--gpus", "2", "--batch-size", "1", "--strict", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    errors = [li for li in done.stderr.splitlines() if li.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --strict: 1 of 4 samples were left out of the metrics") and "reasonseg/val/b" in errors[0]
    data = json.loads(out.read_text())
    assert data["protocol"]["processes"] == 2 and data["metrics"]["n"] == 3 and data["protocol"]["left_out"] == 1
    assert data["warnings"]["sample_ids"] == {"unreadable_image": ["reasonseg/val/b"]}
    # rank 0's bar counts its own share, and says so
    assert "evaluating reasonseg:val (process 1 of 2, its share)" in done.stderr


def test_nothing_readable_is_an_error_not_empty_metrics(tmp_path):
    d = tmp_path / SPLIT
    write_reasonseg(d, "only", ["the thing"], False, [reasonseg_shape("target", _square(4, 4, 20, 20))], (32, 32))
    truncate(d / "only.jpg")
    out = tmp_path / "res.json"
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "--preset", "tiny", "--device", "cpu", "-o", out)
    assert result.exit_code == 1 and clean_exit(result), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 1 samples could be evaluated") and "only.jpg" in last
    assert not out.exists()

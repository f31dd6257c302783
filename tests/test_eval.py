"""`cores eval` and the evaluation engine on the tiny preset: the files it writes, metrics that
the per-target file reproduces, agreement with one-at-a-time prediction, ignore pixels,
multi-process evaluation without double counting, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_tiny, scene_sample
from fixtures_data import blank_image, coco_json, square_poly
from typer.testing import CliRunner

from cores_cli.cli.app import app
from cores_cli.data.records import ArrayMask, QARound, SegSample
from cores_cli.data.registry import load_samples
from cores_cli.engine.evaluate import evaluate, metrics_from_records
from cores_cli.engine.predictor import Predictor
from cores_cli.metrics import intersection_union

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, ["eval", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_end_to_end_on_a_small_synthetic_split(tiny_checkpoint, tmp_path):
    out = tmp_path / "res.json"
    result = cli("--dataset", "synthetic:val", "--opt", "n=10", "-c", tiny_checkpoint, "-o", out, "--batch-size", "4", "--save-vis", "3")
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["dataset"] == "synthetic:val"
    assert data["protocol"]["samples"] == 10 and data["protocol"]["targets"] == 10
    assert "first query of each image" in data["protocol"]["what"]
    records = [json.loads(line) for line in (tmp_path / "res.samples.jsonl").read_text().splitlines()]
    assert len(records) == 10
    assert set(records[0]) >= {"id", "query", "intersection", "union", "iou", "size"}
    # the aggregate metrics, recomputed from the per-target file by hand
    giou = np.mean([1.0 if r["union"] == 0 else r["intersection"] / (r["union"] + 1e-5) for r in records])
    ciou = sum(r["intersection"] for r in records) / (sum(r["union"] for r in records) + 1e-10)
    assert data["metrics"]["giou"] == pytest.approx(giou, abs=1e-12)
    assert data["metrics"]["ciou"] == pytest.approx(ciou, abs=1e-12)
    assert metrics_from_records(records)["giou"] == data["metrics"]["giou"]
    for r in records:
        assert r["size"] == ("s" if r["area_fraction"] < 0.028 else "l" if r["area_fraction"] > 0.115 else "m")
    # the table and the protocol are printed beside the numbers
    assert "gIoU" in result.stderr and "teacher-forced" in result.stderr
    worst = sorted((tmp_path / "res_worst").glob("*.png"))
    assert len(worst) == 3
    ious = sorted(r["iou"] for r in records)
    assert [float(p.name.split("_iou")[1][:5]) for p in worst] == pytest.approx([round(i, 3) for i in ious[:3]], abs=1e-3)


def test_batched_eval_equals_one_query_at_a_time():
    model = build_tiny("prompt.in_context_k=1")
    from cores_cli.contexts import ExemplarSampler, make_exemplar

    lib = [make_exemplar(f"part {i}", "a machine", "in the middle", f"shape number {i}", "manual") for i in range(6)]
    samples = [scene_sample(f"s{i}", i, rounds=1 + i % 3) for i in range(5)]
    result = evaluate(model, samples, batch_size=3, exemplars=ExemplarSampler(lib, 7), seed=7)
    predictor = Predictor(model, ExemplarSampler(lib, 7))
    expected = []
    for s in samples:
        for r, rnd in enumerate(s.rounds):
            pred = predictor.predict(s.image_array, rnd.query, style=rnd.style, exemplar_key=f"{s.sample_id}#{r}")
            expected.append(intersection_union(pred.mask, rnd.target.rasterize(*s.image_array.shape[:2])))
    assert [(r["intersection"], r["union"]) for r in result.records] == expected
    assert result.metrics["n"] == sum(len(s.rounds) for s in samples) == 9


def test_queries_of_one_image_share_one_encoder_pass():
    model = build_tiny()
    seen = []
    handle = model.sam.image_encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    evaluate(model, [scene_sample("a", 0, rounds=3), scene_sample("b", 1, rounds=2)], batch_size=2)
    handle.remove()
    assert seen == [2]


def test_ignore_pixels_are_left_out():
    model = build_tiny()
    img = scene_sample().image_array
    target = np.zeros(img.shape[:2], np.uint8)
    target[10:40, 10:60] = 1
    target[50:, :] = 255
    sample = SegSample("ig", "ig.png", (QARound("the red part", ArrayMask(target), "phrase"),), image_array=img)
    rec = evaluate(model, [sample]).records[0]
    pred = Predictor(model).predict(img, "the red part", style="phrase", exemplar_key="ig#0").mask
    valid = target != 255
    assert rec["intersection"] == int((pred & (target == 1)).sum())
    assert rec["union"] == int(((pred & valid) | (target == 1)).sum())


def test_part_sets_report_miou(tmp_path):
    base = tmp_path / "vlpart" / "partimagenet"
    cats = [{"id": 0, "name": "Car Tier", "supercategory": "Car"}, {"id": 1, "name": "Car Side Mirror", "supercategory": "Car"}]
    images = [{"id": i, "file_name": f"n02814533_{i}.JPEG", "height": 40, "width": 40} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 0, "segmentation": [square_poly(0, 20, 16, 40)]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [square_poly(20, 2, 30, 10)]},
        {"id": 3, "image_id": 2, "category_id": 0, "segmentation": [square_poly(4, 4, 20, 20)]},
    ]
    coco_json(base / "val.json", images, anns, cats)
    for i in (1, 2):
        blank_image(base / f"val/n02814533/n02814533_{i}.JPEG", 40, 40, fmt="JPEG")
    result = cli("--dataset", "partimagenet:val", "--data-root", tmp_path, "--preset", "tiny", "--json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["n"] == 3 and metrics["miou"] is not None
    assert "mIoU" in result.stderr


def test_generate_mode(tiny_checkpoint, tmp_path):
    result = cli("--dataset", "synthetic:val", "--opt", "n=3", "-c", tiny_checkpoint, "--generate", "--per-sample", tmp_path / "s.jsonl")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["fallback"] for r in records)  # random weights write no chain
    assert "generate" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "coco:val"], "unknown dataset"),
        (["--dataset", "reasonseg:val"], "needs a data root"),
        (["--dataset", "synthetic:val", "--opt", "nn=3"], "unknown option 'nn'"),
        (["--dataset", "synthetic:val", "--opt", "broken"], "not of the form key=value"),
    ],
)
def test_bad_requests_fail_with_one_line(tiny_checkpoint, args, message):
    result = cli(*args, "-c", tiny_checkpoint)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_reasonseg_with_missing_files_names_them(tiny_checkpoint, tmp_path):
    (tmp_path / "reason_seg" / "ReasonSeg").mkdir(parents=True)
    result = cli("--dataset", "reasonseg:val", "--data-root", tmp_path, "-c", tiny_checkpoint)
    assert result.exit_code == 1
    assert "reason_seg/ReasonSeg/val" in result.stderr


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tiny_checkpoint, tmp_path):
    """5 samples over 2 ranks (3 + 2): no padding sample is counted twice."""
    common = ["--dataset", "synthetic:val", "--opt", "n=5", "-c", str(tiny_checkpoint), "--device", "cpu", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "cores_cli", "eval", *common, "-o", str(tmp_path / "one.json")], capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "cores_cli", "eval", *common, "--gpus", "2", "-o", str(tmp_path / "two.json")], capture_output=True, text=True, env=env, timeout=600)
    assert double.returncode == 0, double.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["protocol"]["processes"] == 2 and one["protocol"]["processes"] == 1
    assert two["metrics"] == one["metrics"] and two["metrics"]["n"] == 5
    lines = lambda n: (tmp_path / f"{n}.samples.jsonl").read_text()  # noqa: E731
    assert lines("two") == lines("one")


def test_samples_from_disk_and_memory_agree(tmp_path):
    """synthetic:val written to disk in ReasonSeg format evaluates like the in-memory split."""
    from cores_cli.data.synthetic import write_split

    write_split(tmp_path / "reason_seg" / "Synthetic", "val", n=4, seed=0, image_format="png")
    disk = load_samples("reasonseg:val", tmp_path, folder="Synthetic")
    memory = load_samples("synthetic:val", n=4)
    model = build_tiny()
    a, b = evaluate(model, disk), evaluate(model, memory)
    assert [(r["intersection"], r["union"]) for r in a.records] == [(r["intersection"], r["union"]) for r in b.records]


def test_each_rank_takes_every_world_th_sample_and_one_process_gathers_itself():
    from cores_cli.engine.distributed import RankInfo, gather_objects, shard

    shares = [shard(5, RankInfo(rank, 2, rank)) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]  # no padding: 3 + 2, each sample once
    assert shard(3, RankInfo(0, 1, 0)) == [0, 1, 2]
    assert gather_objects({"records": [1]}) == [{"records": [1]}]


def test_eval_runs_the_same_command_in_every_process_through_the_launcher():
    from cores_cli.engine.launch import eval_launch, launch_command

    spec = eval_launch(2, ["eval", "--dataset", "synthetic:val", "--gpus", "2", "-o", "r.json", "--gpus=2"])
    assert launch_command(spec, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--standalone",
        "-m", "cores_cli", "eval", "--dataset", "synthetic:val", "-o", "r.json",
    ]


def test_the_launcher_returns_the_status_the_main_process_left(monkeypatch):
    from cores_cli.engine.launch import STATUS_FILE_ENV, leave_status, run_launched

    monkeypatch.delenv(STATUS_FILE_ENV, raising=False)
    leaves_3 = "import sys; from cores_cli.engine.launch import leave_status; sys.exit(0 if leave_status(3) else 5)"
    assert run_launched([sys.executable, "-c", leaves_3]) == 3  # reported by the worker, which exited 0
    assert run_launched([sys.executable, "-c", "import sys; sys.exit(4)"]) == 4
    assert run_launched([sys.executable, "-c", "pass"]) == 0
    # a launcher killed by a signal: what a shell would say (128 + 9)
    assert run_launched([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]) == 137
    assert not leave_status(1)  # not started by run_launched: nothing to leave


def test_save_masks_lets_every_metric_be_recomputed_from_the_file(tiny_checkpoint, tmp_path):
    """--save-masks: each target's predicted mask as COCO RLE; its IoU against the ground truth,
    recomputed from the file, is the recorded one (issue 15, item 2)."""
    from cores_cli.metrics import target_iou
    from cores_cli.rle import decode

    out = tmp_path / "res.json"
    result = cli("--dataset", "synthetic:val", "--opt", "n=4", "-c", tiny_checkpoint, "-o", out, "--save-masks", "--save-vis", "1")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "res.samples.jsonl").read_text().splitlines()]
    by_id = {s.sample_id: s for s in load_samples("synthetic:val", n=4)}
    assert len(records) == 4
    for r in records:
        sample = by_id[r["sample_id"]]
        pred = decode(r["mask_rle"])
        assert list(pred.shape) == r["mask_rle"]["size"] == list(sample.image_array.shape[:2])
        target = sample.rounds[int(r["id"].rpartition("#")[2])].target.rasterize(*pred.shape)
        inter, union = intersection_union(pred, target)
        assert (inter, union) == (r["intersection"], r["union"])
        assert target_iou(inter, union) == r["iou"]
    # without the flag the file holds no masks
    cli("--dataset", "synthetic:val", "--opt", "n=1", "-c", tiny_checkpoint, "-o", tmp_path / "plain.json")
    assert "mask_rle" not in (tmp_path / "plain.samples.jsonl").read_text()

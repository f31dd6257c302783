"""The image pipeline (cores_cli.engine.image_pipeline): results in input order from worker
processes, a bad input's error in its place, a stream read as it comes, and `cores predict` /
`cores eval` giving the same files with --workers 2 as with --workers 0 on real photos (an
EXIF-rotated JPEG among them) and a bad file."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke_cli, invoke_predict

from cores_cli.engine.image_pipeline import PrefetchedSamples, WorkerDied, prefetch
from cores_cli.errors import CoresError, InputImageError
from cores_cli.fileio import exclusive_directory_lock


def _square(state, x):
    if x == "bad":
        raise InputImageError(f"cannot read image {x}: not a recognised image format")
    if x == "bug":
        raise ValueError("a bug, not an input problem")
    if x == "die":
        os._exit(3)
    return (state["offset"] + x) ** 2


def _pid(state, x):
    return os.getpid()


def test_results_come_in_input_order_with_each_error_in_its_place():
    items = [*range(12), "bad", *range(12, 20)]
    out = list(prefetch(items, _square, {"offset": 1}, workers=2))
    assert [o.item for o in out] == items
    assert [o.value for o in out if o.error is None] == [(i + 1) ** 2 for i in range(20)]
    bad = out[12]
    assert isinstance(bad.error, InputImageError) and str(bad.error) == "cannot read image bad: not a recognised image format"
    with pytest.raises(InputImageError):
        bad.get()


def test_work_runs_in_other_processes_and_serially_in_this_one():
    assert {o.value for o in prefetch(range(6), _pid, {}, workers=2)} - {os.getpid()} != set()
    assert {o.value for o in prefetch(range(3), _pid, {}, workers=0)} == {os.getpid()}


def test_items_without_work_are_passed_through_unread():
    out = list(prefetch([1, None, 3], _square, {"offset": 0}, workers=2, argument=lambda x: x))
    assert [(o.value, o.skipped) for o in out] == [(1, False), (None, True), (9, False)]


def test_a_bug_in_the_work_is_raised_not_reported_as_an_input_error():
    with pytest.raises(ValueError, match="a bug"):
        list(prefetch([1, "bug", 2], _square, {"offset": 0}, workers=2))


def test_a_dead_worker_is_one_clear_error():
    with pytest.raises(WorkerDied, match="worker process died"):
        list(prefetch([1, "die", 2], _square, {"offset": 0}, workers=1))
    assert issubclass(WorkerDied, CoresError)


def test_a_stream_is_handed_out_as_it_comes_not_after_reading_ahead():
    """stdin JSONL: an item is predicted while the next line has not arrived yet."""
    more = threading.Event()

    def stream():
        yield 1
        yield 2
        more.wait()  # the next line arrives only once the first two are out
        yield 3

    seen = []
    try:
        for o in prefetch(stream(), _square, {"offset": 0}, workers=2):
            seen.append((o.value, more.is_set()))
            if len(seen) == 2:
                more.set()
    finally:
        more.set()
    assert seen == [(1, False), (4, False), (9, True)]


def test_closing_early_stops_the_workers():
    it = prefetch(range(1000), _pid, {}, workers=2)
    pids = {next(it).value, next(it).value}
    it.close()  # shuts the pool down and joins its processes before returning
    assert list(it) == []
    assert not _alive(pids)


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.add(pid)
    return alive


# --------------------------------------------------------------------------- the commands


def _photos(realdata: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(realdata / "quirks" / "exif_orientation" / "Landscape_6.jpg", folder)  # EXIF: rotate 90°
    shutil.copy(realdata / "lisa_demo" / "imgs" / "example2.jpg", folder)
    shutil.copy(realdata / "lisa_demo" / "imgs" / "car_speed.jpg", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    return folder


def _record(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("timings_s")  # where the time went differs, nothing else
    record["outputs"] = {k: v and Path(v).name for k, v in record["outputs"].items()}
    return record


def test_predict_with_workers_writes_what_the_serial_path_writes(realdata, tmp_path, monkeypatch):
    from cores_cli.engine import predict_run

    photos = _photos(realdata, tmp_path / "in")
    prepared = []
    real_prepare_job = predict_run.prepare_job

    def spy(*args, **kwargs):
        prepared.append(kwargs.get("prepared") is not None)
        return real_prepare_job(*args, **kwargs)

    monkeypatch.setattr(predict_run, "prepare_job", spy)
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        result = invoke_predict(photos, "the car", "-o", out, "--workers", str(workers), "--json", "--no-overlay")
        assert result.exit_code == 1  # the broken file fails; the others are written
        runs[workers] = (out, result)
    (out0, r0), (out2, r2) = runs[0], runs[2]
    with exclusive_directory_lock(out2):  # no worker outlives the run holding the folder's lock
        pass
    # serially every item reads its image in prepare_job (the broken one fails there); with
    # workers the three photos came ready and the broken one failed before it
    assert prepared == [False] * 4 + [True] * 3
    assert sorted(p.name for p in out0.iterdir()) == sorted(p.name for p in out2.iterdir())
    assert len(list(out0.glob("*.mask.png"))) == 3
    for record in out0.glob("*.json"):
        assert _record(record) == _record(out2 / record.name)
        mask = record.name.replace(".json", ".mask.png")
        assert (out0 / mask).read_bytes() == (out2 / mask).read_bytes()
    assert _record(out0 / "Landscape_6.json")["exif_rotated"] is True
    line = "error: cannot read image " + str(photos / "broken.jpg") + ": not a recognised image format"
    assert line in r0.stderr.splitlines() and line in r2.stderr.splitlines()
    failed = lambda r: [json.loads(x) for x in r.stdout.splitlines() if '"error"' in x]  # noqa: E731
    assert failed(r0) == failed(r2) and len(failed(r0)) == 1


def _reasonseg_folder(realdata: Path, root: Path) -> Path:
    """ReasonSeg layout: two real photos (one EXIF-rotated), one image whose body is cut off
    (its header reads, so the reader takes it and the evaluation cannot decode it)."""
    split = root / "reason_seg" / "Photos" / "val"
    split.mkdir(parents=True)
    sources = {
        "rotated": realdata / "quirks" / "exif_orientation" / "Landscape_6.jpg",
        "car": realdata / "lisa_demo" / "imgs" / "car_speed.jpg",
        "dog": realdata / "lisa_demo" / "imgs" / "dog_with_horn.jpg",
    }
    for name, src in sources.items():
        shutil.copy(src, split / f"{name}.jpg")
        shape = {"label": "target", "labels": ["target"], "shape_type": "polygon", "image_name": f"{name}.jpg",
                 "points": [[100.0, 100.0], [600.0, 120.0], [500.0, 700.0], [90.0, 650.0]], "group_id": None, "group_ids": [None], "flags": {}}
        (split / f"{name}.json").write_text(json.dumps({"text": [f"the {name} thing"], "is_sentence": False, "shapes": [shape]}))
    data = (split / "dog.jpg").read_bytes()
    (split / "dog.jpg").write_bytes(data[: len(data) // 3])
    return root


def test_eval_with_workers_scores_what_the_serial_path_scores(realdata, tmp_path, monkeypatch):
    from cores_cli.engine import eval_run

    root = _reasonseg_folder(realdata, tmp_path / "data")
    handed = []

    prepared = []

    class Spy(PrefetchedSamples):
        def __getitem__(self, j):
            sample = super().__getitem__(j)
            handed.append((sample.sample_id.rsplit("/", 1)[-1], sample.image_array is not None))
            return sample

        def prepared_inputs(self, sample):
            inputs = super().prepared_inputs(sample)
            prepared.append((sample.sample_id.rsplit("/", 1)[-1], inputs is not None))
            return inputs

    monkeypatch.setattr(eval_run, "PrefetchedSamples", Spy)
    docs = {}
    for workers in (0, 2):
        out = tmp_path / f"res{workers}.json"
        result = invoke_cli("eval", "--dataset", "reasonseg:val", "--data-root", root, "--opt", "folder=Photos",
                            "--batch-size", "2", "--workers", str(workers), "--save-masks", "-o", out)
        assert result.exit_code == 0, result.stderr
        doc = json.loads(out.read_text())
        docs[workers] = (doc, (tmp_path / f"res{workers}.samples.jsonl").read_text())
    (doc0, lines0), (doc2, lines2) = docs[0], docs[2]
    # only the run with workers read ahead: the two readable photos came with their pixels
    assert sorted(handed) == [("car", True), ("dog", False), ("rotated", True)]
    # and the model got their towers' inputs as the workers made them (no resize in this process)
    assert sorted(prepared) == [("car", True), ("rotated", True)]
    assert doc0["metrics"] == doc2["metrics"] and doc0["metrics"]["n"] == 2
    assert lines0 == lines2
    assert json.dumps(doc0["warnings"]) == json.dumps(doc2["warnings"])
    assert "dog" in json.dumps(doc0["warnings"])  # the cut-off image is left out, and said so


def test_prefetched_samples_read_ahead_only_what_evaluate_asks_for_in_turn(tmp_path):
    from PIL import Image

    from cores_cli.data.records import SegSample
    from cores_cli.processing.transform import sample_pixels

    paths = []
    for i in range(4):
        arr = np.full((8 + i, 10, 3), 40 * i, np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    samples = [SegSample(f"s{i}", p, ()) for i, p in enumerate(paths)] + [SegSample("bad", str(tmp_path / "bad.png"), ())]
    in_memory = np.zeros((5, 5, 3), np.uint8)
    samples.append(SegSample("memory", "<scene>", (), image_array=in_memory))
    from conftest import build_tiny

    from cores_cli.processing.transform import SampleTransform

    transform = SampleTransform.for_model(build_tiny(), with_targets=False)
    wrapped = PrefetchedSamples(samples, [4, 5, 1, 3], workers=2, ahead=2, transform=transform)
    try:
        assert [s.sample_id for s in wrapped] == [s.sample_id for s in samples] and len(wrapped) == 6
        assert all(s.image_array is None for s in list(wrapped)[:5])  # iterating reads nothing
        bad = wrapped[4]
        assert bad.image_array is None  # the worker could not read it: read in place, same error
        with pytest.raises(InputImageError):
            sample_pixels(bad)
        assert wrapped[5].image_array is in_memory  # already in memory: passed through, not read
        one = wrapped[1]
        assert np.array_equal(one.image_array, sample_pixels(samples[1]))
        inputs = wrapped.prepared_inputs(one)
        assert inputs.pixels is one.image_array and wrapped.prepared_inputs(one) is None  # handed out once
        assert torch.equal(inputs.sam_image, transform.image(one.image_array).sam_image)
        assert torch.equal(inputs.clip_image, transform.image(one.image_array).clip_image)
        assert wrapped[0].image_array is None  # not in the order: as it is
        assert np.array_equal(wrapped[3].image_array, sample_pixels(samples[3]))
    finally:
        wrapped.close()

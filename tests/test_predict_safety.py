"""`cores predict` loses nothing and never reports a wrong file: distinct output names, any image
shape, a checked output folder, per-item write failures, items that appear whole or not at all
(also when a signal arrives), and leftovers of a killed run cleaned up (issue 11)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import error_lines, invoke_predict

from cores_cli.processing.transform import clip_image, longest_side_shape, sam_image, sam_target
from cores_cli.engine import batch_predict
from cores_cli.engine.batch_predict import Job, OutputNamer
from cores_cli.visualize import display_size

K0 = ["--set", "prompt.in_context_k=0"]
HANG_GUARD_S = 600.0
"""Only against a hung process; every wait below is for an event."""
OUTPUT_SUFFIXES = batch_predict.OUTPUT_SUFFIXES

run = invoke_predict


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def item_files(out: Path) -> dict[str, set[str]]:
    """NAME → the kinds of output present for it; and every temporary, under "tmp"."""
    found: dict[str, set[str]] = {"tmp": set()}
    for p in out.iterdir():
        if p.name.endswith(".tmp"):
            found["tmp"].add(p.name)
            continue
        for kind, suffix in OUTPUT_SUFFIXES.items():
            if p.name.endswith(suffix) and not p.name.startswith("."):
                found.setdefault(p.name[: -len(suffix)], set()).add(kind)
    return found


def assert_only_whole_items(out: Path) -> set[str]:
    """Every item in ``out`` has all three files and no temporary is left; returns the names."""
    found = item_files(out)
    assert found.pop("tmp") == set()
    assert all(kinds == {"mask", "overlay", "json"} for kinds in found.values()), found
    return set(found)


# --------------------------------------------------------------------------- item 2: names


def test_items_with_the_same_stem_get_their_own_files_stable_across_runs(tiny_checkpoint, tmp_path):
    # each image its own size, so that a mask shows which image it was made from
    sizes = {"a/photo.jpg": (61, 40), "b/photo.jpg": (47, 33), "photo-2.jpg": (52, 29)}
    for rel, (w, h) in sizes.items():
        write_image(tmp_path / "in" / rel, w, h)
    out = tmp_path / "out"
    pattern = str(tmp_path / "in" / "**" / "*.jpg")

    def one_run() -> dict[str, str]:
        result = run(pattern, "the red part", "-c", tiny_checkpoint, "-o", out, "--json", *K0)
        assert result.exit_code == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(records) == 3
        for r in records:
            rel = Path(r["image"]).relative_to(tmp_path / "in").as_posix()
            assert json.loads(Path(r["outputs"]["json"]).read_text())["image"] == r["image"]
            assert Image.open(r["outputs"]["mask"]).size == sizes[rel]
            shown = display_size(sizes[rel][1], sizes[rel][0])  # enlarged for display, legend below
            assert Image.open(r["outputs"]["overlay"]).size[0] == shown[1]
        return {Path(r["image"]).relative_to(tmp_path / "in").as_posix(): Path(r["outputs"]["json"]).name for r in records}

    first = one_run()
    assert first == {"a/photo.jpg": "a__photo.json", "b/photo.jpg": "b__photo.json", "photo-2.jpg": "photo-2.json"}
    assert assert_only_whole_items(out) == {"a__photo", "b__photo", "photo-2"}
    assert one_run() == first  # the same names on a second run
    assert assert_only_whole_items(out) == {"a__photo", "b__photo", "photo-2"}


def test_jsonl_ids_and_stems_that_collide_keep_every_item_apart(tiny_checkpoint, tmp_path):
    x = write_image(tmp_path / "x.png", 40, 30)
    y = write_image(tmp_path / "sub" / "x.png", 30, 40, seed=1)
    lines = [
        {"image": str(x), "query": "q1", "id": "x"},
        {"image": str(y), "query": "q2", "id": "x"},  # a repeated id: that item's error
        {"image": str(y), "query": "q3", "id": "X"},  # differs only in case
        {"image": str(y), "query": "q4"},  # stem x: taken by the id of line 1
        {"image": str(x), "query": "q5"},  # the same image again, another query
        {"image": str(x), "query": "q6", "id": "a/b"},
        {"image": str(x), "query": "q7", "id": "a_b"},  # a/b and a_b make the same safe name
    ]
    stdin = "\n".join(json.dumps(line) for line in lines) + "\n"
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0, input=stdin)
    assert result.exit_code == 1
    errors = error_lines(result)
    assert "stdin line 2: id 'x' was already used on line 1" in errors[0]
    assert errors[-1].startswith("error: 1 of 7 items failed; 6 written")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    good = [r for r in records if "error" not in r]
    assert [r["query"] for r in good] == ["q1", "q3", "q4", "q5", "q6", "q7"]
    names = [Path(r["outputs"]["json"]).name for r in good]
    assert len({n.casefold() for n in names}) == 6  # distinct, also on a case-insensitive disk
    for r in good:
        assert json.loads(Path(r["outputs"]["json"]).read_text())["query"] == r["query"]
        assert Image.open(r["outputs"]["mask"]).size == Image.open(r["image"]).size
    assert names[0] == "x.json" and good[0]["id"] == "x"
    assert len(assert_only_whole_items(tmp_path / "out")) == 6


def test_output_names_are_stable_distinct_and_short(tmp_path):
    def names(jobs):
        namer = OutputNamer(tmp_path / "out")
        return [namer.name_for(j) for j in jobs]

    jobs = [
        Job("in/a/photo.jpg", "q", name_parts=("a", "photo")),
        Job("in/a__photo.jpg", "q", name_parts=("a__photo",)),
        Job("in/Photo.jpg", "q", name_parts=("Photo",)),
        Job("in/photo.png", "q", name_parts=("photo",)),
        Job("in/.hidden.jpg", "q", name_parts=(".hidden",)),
        Job("x.jpg", "q", id="é" * 200, line=1),
        Job("x.jpg", "q", id="é" * 200 + "z", line=2),
    ]
    first = names(jobs)
    assert first == names(jobs)
    assert first[0] == "a__photo" and first[2] == "Photo" and first[4] == "hidden"
    assert first[1].startswith("a__photo-") and first[3].startswith("photo-")
    assert len({n.casefold() for n in first}) == len(first)
    for n in first:
        assert len(n.encode()) <= batch_predict.MAX_NAME_BYTES
        assert len(f".{n}.overlay.png.{batch_predict.TEMPORARY_TAG}.abcdefgh.tmp".encode()) < 255


def test_an_output_never_overwrites_an_input_image(tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "cat.png", 40, 30)
    hand_drawn = write_image(folder / "cat.mask.png", 40, 30, seed=3)  # the user's own mask
    before = hand_drawn.read_bytes()
    result = run(folder, "the cat", "-c", tiny_checkpoint, "-o", folder, *K0)
    assert result.exit_code == 1
    assert hand_drawn.read_bytes() == before
    assert any("would overwrite an input image" in line for line in error_lines(result))


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="file names there are always Unicode")
def test_a_file_name_that_is_not_utf8_gets_a_record(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    write_image(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9.png"))), 40, 30)
    result = run(folder, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record == json.loads((tmp_path / "out" / "caf_.json").read_text())
    assert os.fsencode(record["image"]).endswith(b"caf\xe9.png")


# --------------------------------------------------------------------------- item 9: any shape


@pytest.mark.parametrize(
    "h,w,target,expected",
    [
        (1, 1, 128, (128, 128)),
        (20, 20000, 128, (1, 128)),  # 20 * 128 / 20000 = 0.128 rounds to 0
        (20000, 20, 128, (128, 1)),
        (1, 5000, 1024, (1, 1024)),  # 1024 / 5000 = 0.2 rounds to 0
        (20, 20000, 1024, (1, 1024)),  # 1.024 + 0.5 → 1
        (600, 800, 1024, (768, 1024)),  # ordinary images as before
    ],
)
def test_the_resized_short_side_is_never_zero(h, w, target, expected):
    assert longest_side_shape(h, w, target) == expected
    pixels = np.full((h, w, 3), 200, np.uint8)
    x, input_size = sam_image(pixels, target)
    assert input_size == expected and tuple(x.shape) == (3, target, target)
    target_mask = sam_target(np.ones((h, w), np.uint8), input_size, target)
    assert int((target_mask == 1).sum()) == expected[0] * expected[1]


def test_clip_input_of_a_thin_strip_is_the_strip_on_the_pad_colour():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    strip = np.full((20, 20000, 3), 255, np.uint8)  # pad: the 32×32 square holds a 1×32 line
    x = clip_image(strip, 32, mean, std, "pad")
    white, fill = (1.0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25
    assert tuple(x.shape) == (3, 32, 32)
    assert torch.allclose(x[:, 15, :], torch.full((3, 32), white), atol=0.05)  # top = (32 - 1) // 2
    assert torch.allclose(x[:, 0, :], torch.full((3, 32), fill), atol=1e-4)
    # crop: the centre square of the strip, here a red band in the middle of a blue strip
    strip = np.zeros((1, 5000, 3), np.uint8)
    strip[..., 2] = 255
    strip[:, 2490:2510] = (255, 0, 0)
    x = clip_image(strip, 224, mean, std, "crop")
    assert tuple(x.shape) == (3, 224, 224)
    assert torch.allclose(x[0], torch.full((224, 224), white), atol=0.05) and float(x[2].max()) < 0
    one = clip_image(np.full((1, 1, 3), 255, np.uint8), 224, mean, std, "crop")
    assert torch.allclose(one, torch.full((3, 224, 224), white), atol=0.05)


def test_predict_runs_on_extreme_aspect_ratios_and_single_pixels(tiny_checkpoint, tmp_path):
    sizes = {"wide": (20000, 20), "tall": (20, 20000), "dot": (1, 1), "strip": (5000, 1)}
    for name, (w, h) in sizes.items():
        write_image(tmp_path / "in" / f"{name}.png", w, h)
    result = run(tmp_path / "in", "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0)
    assert result.exit_code == 0, result.stderr
    records = {Path(r["image"]).stem: r for r in map(json.loads, result.stdout.splitlines())}
    for name, (w, h) in sizes.items():
        assert records[name]["image_size"] == {"width": w, "height": h}
        assert Image.open(records[name]["outputs"]["mask"]).size == (w, h)


# --------------------------------------------------------------------------- item 10: I/O errors


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder that refuses new files: read-only bits, or for root (whom those do not stop)
    sysfs, which refuses new files even to root."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return Path("/sys")
    pytest.skip("running as root without a read-only folder to write into")


@pytest.mark.parametrize(
    "case,message",
    [
        ("file", "is a file, not a folder"),
        ("under_a_file", "cannot create the output folder"),
        ("unwritable", "cannot write in the output folder"),
    ],
)
def test_a_bad_output_folder_fails_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch, case, message):
    from cores_cli.engine import loading

    def load_checkpoint(*args, **kwargs):
        pytest.fail("the model loaded before the output folder was checked")

    monkeypatch.setattr(loading, "load_checkpoint", load_checkpoint)
    img = write_image(tmp_path / "photo.png", 40, 30)
    blocker = tmp_path / "results"
    blocker.write_bytes(b"the user's file\n")
    out = {"file": blocker, "under_a_file": blocker / "sub", "unwritable": None}[case] or _unwritable_folder(tmp_path)
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 1
    errors = error_lines(result)
    assert len(errors) == 1 and message in errors[0], errors
    assert blocker.read_bytes() == b"the user's file\n"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EIO])
def test_a_failed_write_is_that_items_error_and_the_batch_goes_on(tiny_checkpoint, tmp_path, monkeypatch, code):
    for i, (w, h) in enumerate([(40, 30), (41, 31), (42, 32)]):
        write_image(tmp_path / "in" / f"p{i}.png", w, h, seed=i)
    original = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        if self.mode == "RGB" and self.size[0] == display_size(31, 41)[1]:  # the second item's overlay
            original(self, fp, *args, **kwargs)  # part of it reached the disk
            raise OSError(code, os.strerror(code))
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    out = tmp_path / "out"
    result = run(tmp_path / "in", "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 1
    errors = error_lines(result)
    assert len(errors) == 2 and "p1.png: cannot write" in errors[0] and os.strerror(code) in errors[0]
    assert errors[1] == f"error: 1 of 3 items failed; 2 written to {out}"
    assert assert_only_whole_items(out) == {"p0", "p2"}  # nothing at all of p1


def test_a_failed_commit_leaves_no_record_and_no_stray_files(tiny_checkpoint, tmp_path, monkeypatch):
    img = write_image(tmp_path / "photo.png", 40, 30)
    out = tmp_path / "out"
    assert run(img, "the red part", "-c", tiny_checkpoint, "-o", out, *K0).exit_code == 0
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("photo.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    result = run(img, "another question", "-c", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 1 and "cannot write" in error_lines(result)[0]
    # the earlier record is gone with its files, rather than describing a newer mask
    assert item_files(out) == {"tmp": set()}


def test_ids_too_long_for_a_file_name_are_shortened(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "photo.png", 40, 30)
    ids = ["x" * 300, "x" * 300 + "y", "é" * 200]
    stdin = "".join(json.dumps({"image": str(img), "query": "the red part", "id": i}) + "\n" for i in ids)
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0, input=stdin)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ids  # the record keeps the id whole
    assert len({r["outputs"]["json"] for r in records}) == 3
    assert len(assert_only_whole_items(tmp_path / "out")) == 3


# --------------------------------------------------------------------------- item 13


def test_sixteen_bit_colour_images_are_reported_as_converted(tiny_checkpoint, tmp_path):
    import cv2

    from cores_cli.images import load_image

    rgb = np.full((30, 40, 3), 0x8080, np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb)
    cv2.imwrite(str(tmp_path / "rgb16.tif"), rgb)
    cv2.imwrite(str(tmp_path / "rgba16.png"), np.full((30, 40, 4), 0x8080, np.uint16))
    cv2.imwrite(str(tmp_path / "rgb8.png"), np.full((30, 40, 3), 128, np.uint8))
    assert load_image(tmp_path / "rgb16.png").converted_from == "RGB;16"
    assert load_image(tmp_path / "rgb16.tif").converted_from == "RGB;16"
    assert load_image(tmp_path / "rgba16.png").converted_from == "RGBA;16"
    assert load_image(tmp_path / "rgb8.png").converted_from is None
    assert int(load_image(tmp_path / "rgb16.png").pixels[0, 0, 0]) == 128
    result = run(tmp_path / "rgb16.png", "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0)
    assert json.loads(result.stdout)["converted_from"] == "RGB;16"


@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_pixels_below_one_is_a_usage_error(tmp_path, value):
    img = write_image(tmp_path / "photo.png", 40, 30)
    result = run(img, "the red part", "--max-pixels", value, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--max-pixels" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sigint_mid_item_discards_that_item_and_keeps_the_finished_ones(tiny_checkpoint, tmp_path, monkeypatch):
    for i, (w, h) in enumerate([(40, 30), (41, 31), (42, 32)]):
        write_image(tmp_path / "in" / f"p{i}.png", w, h, seed=i)
    original = Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        if self.mode == "RGB" and self.size[0] == display_size(31, 41)[1]:  # while writing the second overlay
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    result = run(tmp_path / "in", "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    assert assert_only_whole_items(out) == {"p0"}
    assert result.exit_code == 130
    assert error_lines(result) == [f"error: stopped by SIGINT: 1 item written to {out}; no item was left half written"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


def test_sigterm_stops_a_stdin_stream_cleanly(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "photo.png", 40, 30)
    out, stdout_file = tmp_path / "out", tmp_path / "stdout.jsonl"
    cmd = [sys.executable, "-m", "cores_cli", "predict", "-", "-c", str(tiny_checkpoint), "-o", str(out), "--json", *K0]
    with open(stdout_file, "wb") as stdout:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE)
        for i in range(2):
            proc.stdin.write((json.dumps({"image": str(img), "query": "the red part", "id": f"job{i}"}) + "\n").encode())
        proc.stdin.flush()  # stdin stays open: the run cannot end before the signal
        deadline = time.monotonic() + HANG_GUARD_S
        while stdout_file.read_bytes().count(b"\n") < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGTERM)  # during the second item, or while waiting for a third
        _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143, stderr.decode()
    assert "error: stopped by SIGTERM: " in stderr.decode() and "Traceback" not in stderr.decode()
    names = assert_only_whole_items(out)
    assert "job0" in names and names <= {"job0", "job1"}
    printed = [json.loads(line)["id"] for line in stdout_file.read_text().splitlines()]
    assert set(printed) == names  # what stdout reported is exactly what is on disk


def test_the_next_run_removes_only_cores_own_leftover_temporaries(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = [
        ".photo.mask.png.cores-predict.k3j_9x2a.tmp",
        ".a__b.overlay.png.cores-predict.abcdefgh.tmp",
        ".job7.json.cores-predict.0123abcd.tmp",
    ]
    kept = {
        "notes.txt": b"mine",
        "photo.tmp": b"mine too",
        ".photo.mask.png.cores-predict.tmp": b"no random part",
        ".photo.mask.png.cores-predict.abc.tmp": b"random part too short",
        ".thesis.docx.abcdefgh.tmp": b"another program's temporary",
        "x.json.cores-predict.abcdefgh.tmp": b"not hidden",
        # untagged: the atomic writes of other programs, and of other cores commands
        ".keep.json.abcdefgh.tmp": b"a user's file",
        ".res.json.k3j_9x2a.tmp": b"a cores eval -o res.json writing right now",
        ".photo.mask.png.k3j_9x2a.tmp": b"not ours either",
    }
    for name in stale:
        (out / name).write_bytes(b"half a file")
    for name, data in kept.items():
        (out / name).write_bytes(data)
    (out / ".dir.json.cores-predict.abcdefgh.tmp").mkdir()  # a folder is never removed
    img = write_image(tmp_path / "photo.png", 40, 30)
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 0, result.stderr
    assert "removed 3 unfinished files" in result.stderr
    assert not any((out / name).exists() for name in stale)
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert (out / ".dir.json.cores-predict.abcdefgh.tmp").is_dir()


def test_a_second_run_into_a_folder_in_use_is_refused(tiny_checkpoint, tmp_path):
    import fcntl

    img = write_image(tmp_path / "photo.png", 40, 30)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running cores predict holds it
        result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert f"{out} is in use by another cores predict" in error_lines(result)[0]
    assert list(out.iterdir()) == []
    assert run(img, "the red part", "-c", tiny_checkpoint, "-o", out, *K0).exit_code == 0  # once it is free


# --------------------------------------------------------------------------- only our own files


def user_png(path: Path, seed: int, text: dict[str, str] | None = None) -> bytes:
    """A PNG of the user's (maybe with text chunks of its own); returns its bytes."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    write_image(path, 40, 30, seed=seed)
    Image.open(path).save(path, pnginfo=info)
    return path.read_bytes()


REASONSEG_ANNOTATION = b'{"text": ["q"], "is_sentence": false, "shapes": []}\n'


def test_predict_never_replaces_a_file_it_did_not_write(tiny_checkpoint, tmp_path):
    for i, name in enumerate("abcd"):
        write_image(tmp_path / "in" / f"{name}.png", 40 + i, 30, seed=i)
    out = tmp_path / "out"
    out.mkdir()
    users = {
        "a.mask.png": user_png(out / "a.mask.png", 7),  # a hand-drawn mask
        "b.overlay.png": user_png(out / "b.overlay.png", 8, {"Comment": "overlay"}),
        "c.json": REASONSEG_ANNOTATION,  # a ReasonSeg / LabelMe annotation
    }
    (out / "c.json").write_bytes(users["c.json"])
    result = run(tmp_path / "in", "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 1
    errors = error_lines(result)
    for name, file in zip("abc", users):
        assert f"error: {tmp_path / 'in' / name}.png: would overwrite {out / file}, which cores predict did not write; move it away or choose another --out" in errors
    assert errors[-1] == f"error: 3 of 4 items failed; 1 written to {out}"
    assert {name: (out / name).read_bytes() for name in users} == users  # byte for byte
    # nothing of a, b or c was written beside the user's files; d is whole
    assert item_files(out) == {"tmp": set(), "a": {"mask"}, "b": {"overlay"}, "c": {"json"}, "d": {"mask", "overlay", "json"}}


def test_a_reasonseg_annotation_beside_its_image_survives_predict_into_its_folder(tiny_checkpoint, tmp_path):
    rs = tmp_path / "rs"
    write_image(rs / "img1.jpg", 40, 30)
    (rs / "img1.json").write_bytes(REASONSEG_ANNOTATION)
    result = run(rs, "q", "-c", tiny_checkpoint, "-o", rs, *K0)
    assert result.exit_code == 1
    assert error_lines(result) == [f"error: {rs / 'img1.jpg'}: would overwrite {rs / 'img1.json'}, which cores predict did not write; move it away or choose another --out"]
    assert (rs / "img1.json").read_bytes() == REASONSEG_ANNOTATION
    assert sorted(p.name for p in rs.iterdir()) == ["img1.jpg", "img1.json"]


def test_a_file_that_appears_while_the_model_runs_is_not_replaced(tiny_checkpoint, tmp_path, monkeypatch):
    img = write_image(tmp_path / "photo.png", 40, 30)
    out = tmp_path / "out"
    original = Image.Image.save

    def save_then_user_writes(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)
        if self.mode == "RGB":  # the overlay is staged; the user saves an annotation meanwhile
            (out / "photo.json").write_bytes(REASONSEG_ANNOTATION)

    monkeypatch.setattr(Image.Image, "save", save_then_user_writes)
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 1
    assert "which cores predict did not write" in error_lines(result)[0]
    assert (out / "photo.json").read_bytes() == REASONSEG_ANNOTATION
    assert item_files(out) == {"tmp": set(), "photo": {"json"}}


def test_reruns_into_the_input_folder_replace_their_own_outputs_and_take_no_output_as_input(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write_image(folder / "img1.jpg", 40, 30)
    write_image(folder / "img2.png", 30, 40, seed=1)
    staged_names = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        staged_names.append(Path(src).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)

    def predict(source, query: str) -> list[dict]:
        result = run(source, query, "-c", tiny_checkpoint, "-o", folder, "--json", *K0)
        assert result.exit_code == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    assert [r["id"] for r in predict(folder, "first")] == ["img1", "img2"]
    records = predict(folder, "second")  # the earlier masks and overlays are not inputs now
    assert [(r["id"], r["query"]) for r in records] == [("img1", "second"), ("img2", "second")]
    assert json.loads((folder / "img1.json").read_text())["query"] == "second"
    # a run killed between its overlay and its record left both PNGs without a record
    (folder / "img2.json").unlink()
    records = predict(str(folder / "*"), "third")  # a glob also leaves out records and PNGs
    assert [(r["id"], r["query"]) for r in records] == [("img1", "third"), ("img2", "third")]
    assert assert_only_whole_items(folder) == {"img1", "img2"}
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith((".mask.png", ".overlay.png", ".json"))) == ["img1.jpg", "img2.png"]
    assert staged_names and all(f".{batch_predict.TEMPORARY_TAG}." in name for name in staged_names)


def test_staged_files_can_carry_a_tag_and_untagged_names_are_unchanged(tmp_path):
    import re

    from cores_cli.fileio import TEMPORARY_PATTERN, staged_file

    with staged_file(tmp_path / "x.json") as (_, plain), staged_file(tmp_path / "x.json", tag="cores-predict") as (_, tagged):
        assert re.fullmatch(TEMPORARY_PATTERN.format(name=re.escape("x.json")), plain.name)
        assert re.fullmatch(TEMPORARY_PATTERN.format(name=re.escape("x.json") + r"\.cores-predict"), tagged.name)
        assert not re.fullmatch(TEMPORARY_PATTERN.format(name=re.escape("x.json")), tagged.name)


# --------------------------------------------------------------------------- globs through links


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
@pytest.mark.parametrize("links", [1, 2])
def test_a_recursive_glob_never_loops_through_linked_folders(tmp_path, links):
    import threading

    loop = tmp_path / "loop"
    write_image(loop / "x.jpg", 40, 30)
    write_image(loop / "sub" / "y.jpg", 40, 30)
    for i in range(links):
        (loop / f"s{i}").symlink_to(".")  # each a cycle: loop/s0/s0/s0/...
    found: list = []
    worker = threading.Thread(target=lambda: found.append(batch_predict.jobs_from_argument(str(loop / "**" / "*.jpg"), "q")), daemon=True)
    worker.start()
    worker.join(HANG_GUARD_S)  # only against a hang (glob.glob never ends with two links)
    assert found, "listing the glob did not finish"
    assert [Path(j.image) for j in found[0]] == [loop / "sub" / "y.jpg", loop / "x.jpg"]  # each once
    assert [j.name_parts for j in found[0]] == [("sub", "y"), ("x",)]


# --------------------------------------------------------------------------- smaller


def test_the_pixel_limit_message_shows_pixels_below_a_megapixel(tmp_path):
    from cores_cli.errors import InputImageError
    from cores_cli.images import load_image

    img = write_image(tmp_path / "photo.png", 40, 30)
    with pytest.raises(InputImageError, match=r"is 40×30 \(1,200 pixels\), above the limit of 1,000 pixels \(raise it"):
        load_image(img, max_pixels=1000)


def test_a_query_holding_a_model_token_is_that_items_error(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "photo.png", 40, 30)
    lines = [
        {"image": str(img), "query": "where is the [SEG]?", "id": "a"},
        {"image": str(img), "query": "<image> the red part", "id": "b"},
        {"image": str(img), "query": "the red part</s>"},
        {"image": str(img), "query": "the [seg] in lower case is only text", "id": "d"},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0, input=stdin)
    assert result.exit_code == 1
    rest = ", a token the model reserves for itself; rephrase it without "
    assert error_lines(result) == [
        f"error: stdin line 1 ({img}, id 'a'): the query contains [SEG]{rest}[SEG]",
        f"error: stdin line 2 ({img}, id 'b'): the query contains <image>{rest}<image>",
        f"error: stdin line 3 ({img}): the query contains </s>{rest}</s>",
        f"error: 3 of 4 items failed; 1 written to {tmp_path / 'out'}",
    ]
    assert assert_only_whole_items(tmp_path / "out") == {"d"}


def test_jsonl_ids_must_be_strings_or_numbers(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "photo.png", 40, 30)
    ids = [False, {"n": 1}, [1], 7, 1.5, "1.5"]
    stdin = "".join(json.dumps({"image": str(img), "query": "the red part", "id": i}) + "\n" for i in ids)
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path / "out", "--json", *K0, input=stdin)
    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: stdin line 1: id must be a string or a number",
        "error: stdin line 2: id must be a string or a number",
        "error: stdin line 3: id must be a string or a number",
        "error: stdin line 6: id '1.5' was already used on line 5; give each item its own id",
        f"error: 4 of 6 items failed; 2 written to {tmp_path / 'out'}",
    ]
    assert assert_only_whole_items(tmp_path / "out") == {"7", "1.5"}

"""`cores predict` end to end on the tiny preset: files written, machine-readable output,
batches from folders, globs and stdin, and a clean one-line failure for each bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import error_lines, invoke_predict


K0 = ["--set", "prompt.in_context_k=0"]

run = invoke_predict


def write_image(path: Path, size=(120, 90), mode="RGB", fill=None) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode) if fill is None else Image.new(mode, size, fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_single_image_writes_mask_overlay_and_record(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "photo.jpg", size=(150, 100))
    out = tmp_path / "out"
    result = run(img, "what lets the vehicle roll?", "--checkpoint", tiny_checkpoint, "-o", out, *K0)
    assert result.exit_code == 0, result.stderr
    mask = np.array(Image.open(out / "photo.mask.png"))
    overlay = Image.open(out / "photo.overlay.png")
    assert mask.shape == (100, 150) and set(np.unique(mask)) <= {0, 255}
    # a small image is enlarged for display (visualize.display_size), the legend below it
    assert overlay.size[0] == 600 and overlay.size[1] > 400 and overlay.mode == "RGB"
    record = json.loads((out / "photo.json").read_text())
    assert record["query"] == "what lets the vehicle roll?"
    assert record["answer"] == "Sure, it appears on [LOC]. It is [SEG]."
    assert record["mask_area"] == int((mask == 255).sum())
    assert record["image_size"] == {"width": 150, "height": 100}
    assert [lv["token"] for lv in record["levels"]] == ["[LOC]", "[SEG]"]
    assert set(record["timings_s"]) >= {"load_image", "model", "write", "total"}
    assert Path(record["outputs"]["mask"]) == (out / "photo.mask.png").resolve()
    if record["bbox"] is not None:
        ys, xs = np.nonzero(mask)
        assert record["bbox"] == {"x": int(xs.min()), "y": int(ys.min()), "width": int(xs.max() - xs.min() + 1), "height": int(ys.max() - ys.min() + 1)}
    assert "photo.mask.png" in result.stdout  # where the outputs went


def test_json_flag_prints_one_record_per_line(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "a.png")
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o", "--json", *K0)
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record == json.loads((tmp_path / "o" / "a.json").read_text())


def test_folder_glob_and_stdin_batches_load_the_model_once(tiny_checkpoint, tmp_path, monkeypatch):
    from cores_cli.engine import loading

    calls = []
    original = loading.load_checkpoint
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    folder = tmp_path / "imgs"
    for name in ("b.jpg", "a.png", "c.jpeg"):
        write_image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    result = run(folder, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o1", "--json", *K0)
    assert result.exit_code == 0
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a", "b", "c"]
    assert len(calls) == 1

    result = run(str(folder / "*.jp*g"), "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o2", "--json", *K0)
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["b", "c"]

    other = write_image(tmp_path / "elsewhere" / "a.png")
    lines = [
        {"image": str(folder / "a.png"), "query": "what shines?"},
        {"image": str(other), "query": "the wheel"},  # same stem: a-HASH
        {"image": str(folder / "b.jpg"), "query": "the sky", "id": "job/7"},
    ]
    stdin = "\n".join(json.dumps(x) for x in lines) + "\n"
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path / "o3", "--json", *K0, input=stdin)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["query"] for r in records] == ["what shines?", "the wheel", "the sky"]
    names = sorted(p.name for p in (tmp_path / "o3").glob("*.json"))
    assert names[1:] == ["a.json", "job_7.json"] and re.fullmatch(r"a-[0-9a-f]{8}\.json", names[0])
    for r in records:  # each record is the one in its own file
        assert json.loads(Path(r["outputs"]["json"]).read_text())["query"] == r["query"]


def test_a_batch_continues_past_bad_items_and_reports_them(tiny_checkpoint, tmp_path):
    good = write_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    lines = [
        json.dumps({"image": str(good), "query": "the red part"}),
        json.dumps({"image": str(tmp_path / "missing.png"), "query": "x"}),
        "{this is not json",
        json.dumps({"image": str(corrupt), "query": "x"}),
        json.dumps({"image": str(good), "query": "   "}),
        json.dumps({"query": "no image key"}),
        json.dumps({"image": str(good), "query": "the sky"}),
    ]
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path / "o", "--json", *K0, input="\n".join(lines))
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 7
    assert [("error" in r) for r in records] == [False, True, True, True, True, True, False]
    errors = error_lines(result)
    assert len(errors) == 5 + 1  # one per bad item, then the summary
    assert "image not found" in errors[0]
    assert "stdin line 3: not valid JSON" in errors[1]
    assert "cannot read image" in errors[2] and "corrupt.jpg" in errors[2]
    assert "the query is empty" in errors[3]
    assert 'expected {"image": PATH, "query": TEXT}' in errors[4]
    assert errors[-1] == f"error: 5 of 7 items failed; 2 written to {tmp_path / 'o'}"
    assert len(list((tmp_path / "o").glob("*.mask.png"))) == 2


@pytest.mark.parametrize(
    "mode,fill,converted",
    [("L", None, "L"), ("RGBA", None, "RGBA"), ("I;16", 40000, "I;16"), ("P", None, "P")],
)
def test_grayscale_rgba_16bit_and_palette_images_are_converted(tiny_checkpoint, tmp_path, mode, fill, converted):
    img = write_image(tmp_path / "odd.png", size=(80, 60), mode=mode, fill=fill)
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o", "--json", *K0)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["converted_from"] in (converted, "I")  # PIL may read 16-bit PNGs as "I"
    assert Image.open(tmp_path / "o" / "odd.mask.png").size == (80, 60)


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "image not found"),
        ("corrupt", "not a recognised image format"),
        ("too_large", "above the limit of 1 MP"),
        ("empty_query", "the query is empty"),
        ("no_checkpoint_dir", "checkpoint directory not found"),
        ("not_a_checkpoint", "not a cores checkpoint"),
        ("no_folder_images", "no images in folder"),
        ("glob_no_match", "no files match"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_nonzero_exit(tiny_checkpoint, tmp_path, case, message):
    img = write_image(tmp_path / "ok.png", size=(1500, 800))
    args = [img, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o", *K0]
    if case == "missing":
        args[0] = tmp_path / "nope.jpg"
    elif case == "corrupt":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG garbage")
        args[0] = bad
    elif case == "too_large":
        args += ["--max-pixels", "1000000"]
    elif case == "empty_query":
        args[1] = "  "
    elif case == "no_checkpoint_dir":
        args[3] = tmp_path / "no_such_ckpt"
    elif case == "not_a_checkpoint":
        (tmp_path / "empty").mkdir()
        args[3] = tmp_path / "empty"
    elif case == "no_folder_images":
        (tmp_path / "emptydir").mkdir()
        args[0] = tmp_path / "emptydir"
    elif case == "glob_no_match":
        args[0] = str(tmp_path / "*.tiff")
    result = run(*args)
    assert result.exit_code == 1
    errors = error_lines(result)
    assert errors and message in errors[0]
    assert not list((tmp_path / "o").glob("*.mask.png")) if (tmp_path / "o").exists() else True


def test_usage_mistakes_exit_2(tmp_path):
    assert run().exit_code == 2
    img = write_image(tmp_path / "x.png")
    result = run(img)
    assert result.exit_code == 2 and "missing QUERY" in result.stderr


def test_exif_rotated_photo_gives_an_upright_mask(tiny_checkpoint, realdata, tmp_path):
    result = run(realdata / "quirks" / "exif_orientation" / "Landscape_6.jpg", "the waterfall", "-c", tiny_checkpoint, "-o", tmp_path, "--json", *K0)
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert record["exif_rotated"] and record["image_size"] == {"width": 1800, "height": 1200}
    assert Image.open(tmp_path / "Landscape_6.mask.png").size == (1800, 1200)


def test_all_lisa_demo_photos_run_including_28_megapixels(tiny_checkpoint, realdata, tmp_path):
    queries = json.loads((realdata / "lisa_demo" / "queries.json").read_text())
    # car_speed.jpg has no recorded query (null): give it one
    jobs = [{"image": str(realdata / "lisa_demo" / q["image"]), "query": q["query"] or "Where is the speedometer?"} for q in queries]
    stdin = "\n".join(json.dumps(j) for j in jobs)
    result = run("-", "-c", tiny_checkpoint, "-o", tmp_path, "--json", *K0, input=stdin)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(jobs)
    assert {Path(r["image"]).name for r in records} == {p.name for p in (realdata / "lisa_demo" / "imgs").glob("*.jpg")}
    big = next(r for r in records if r["image"].endswith("wash_hands.jpg"))
    assert big["image_size"] == {"width": 4793, "height": 5953}
    assert Image.open(big["outputs"]["mask"]).size == (4793, 5953)


def test_generate_mode_falls_back_to_the_template_without_chain_tokens(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "g.png")
    result = run(img, "what lets the vehicle roll?", "-c", tiny_checkpoint, "-o", tmp_path, "--json", "--mode", "generate", *K0)
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert record["mode"] == "generate"
    assert record["fallback_to_template"] is True  # random weights emit no chain
    assert "generated_text" in record and record["answer"] == "Sure, it appears on [LOC]. It is [SEG]."
    assert Path(record["outputs"]["mask"]).is_file()


def test_example_with_a_random_preset_runs(tmp_path):
    result = run("--example", "--preset", "tiny", "-o", tmp_path, *K0)
    assert result.exit_code == 0, result.stderr
    assert "random weights" in result.stderr
    assert (tmp_path / "example.mask.png").is_file()


def test_the_installed_console_script_runs(tmp_path):
    exe = shutil.which("cores")
    cmd = [exe] if exe else [sys.executable, "-m", "cores_cli"]
    help_ = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0
    bad = subprocess.run([*cmd, "predict", str(tmp_path / "none.jpg"), "q", "--preset", "tiny"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == f"error: image not found: {tmp_path / 'none.jpg'}"
    assert "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- issue 15: RLE, image options


def test_the_record_carries_the_mask_as_coco_rle_equal_to_the_png(tiny_checkpoint, tmp_path):
    from pycocotools import mask as mask_utils

    from cores_cli.rle import decode

    img = write_image(tmp_path / "photo.png", size=(75, 52))
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o", "--json", "--levels", *K0)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    png = np.array(Image.open(tmp_path / "o" / "photo.mask.png")) == 255
    rle = record["mask_rle"]
    assert rle["size"] == [52, 75] and isinstance(rle["counts"], str)
    assert (decode(rle) == png).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools 2.0.x under numpy 2
        coco = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    assert (coco == png).all()  # pixel for pixel, read by pycocotools itself
    # --levels: every chain level too; the last level is the final mask
    levels = record["levels"]
    assert [lv["token"] for lv in levels] == ["[LOC]", "[SEG]"]
    for lv in levels:
        assert int(decode(lv["mask_rle"]).sum()) == lv["mask_area"]
    assert levels[-1]["mask_rle"] == rle
    assert json.loads((tmp_path / "o" / "photo.json").read_text()) == record


def test_without_levels_the_level_entries_hold_no_masks(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "p.png")
    record = json.loads(run(img, "the red part", "-c", tiny_checkpoint, "-o", tmp_path / "o", "--json", *K0).stdout)
    assert "mask_rle" in record and all("mask_rle" not in lv for lv in record["levels"])


def test_no_png_writes_the_record_only_and_says_so(tiny_checkpoint, tmp_path):
    from cores_cli.rle import decode

    img = write_image(tmp_path / "in" / "p.png", size=(64, 48))
    out = tmp_path / "o"
    with_images = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--json", *K0)
    png = np.array(Image.open(out / "p.mask.png")) == 255
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--json", "--no-png", *K0)
    assert with_images.exit_code == result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["outputs"] == {"mask": None, "overlay": None, "json": str((out / "p.json").resolve())}
    # the earlier run's images were ours: gone, so that no file describes another run
    assert sorted(p.name for p in out.iterdir()) == ["p.json"]
    assert (decode(record["mask_rle"]) == png).all()
    assert "record" in run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--no-png", *K0).stdout
    # the folder's record is still recognised as ours: a rerun with images replaces it
    again = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--json", *K0)
    assert again.exit_code == 0 and json.loads(again.stdout)["outputs"]["mask"] == str((out / "p.mask.png").resolve())


def test_no_overlay_and_jpg_overlays(tiny_checkpoint, tmp_path):
    from cores_cli.engine.batch_predict import is_our_output

    img = write_image(tmp_path / "p.png", size=(300, 200))
    out = tmp_path / "o"
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--json", "--no-overlay", *K0)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["overlay"] is None
    assert sorted(p.name for p in out.iterdir()) == ["p.json", "p.mask.png"]

    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--json", "--overlay-format", "jpg", "--overlay-max-side", "150", *K0)
    assert result.exit_code == 0, result.stderr
    path = Path(json.loads(result.stdout)["outputs"]["overlay"])
    assert path.name == "p.overlay.jpg" and Image.open(path).format == "JPEG"
    assert Image.open(path).size[0] == 150  # the long side, shrunk; the legend strip is below
    assert is_our_output(path) and not is_our_output(img)
    # ours, so a folder run with --out the input folder does not take it for an input
    result = run(tmp_path, "the red part", "-c", tiny_checkpoint, "-o", tmp_path, "--json", *K0)
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["p"]


def test_a_jpeg_that_cores_did_not_write_is_never_replaced(tiny_checkpoint, tmp_path):
    img = write_image(tmp_path / "p.png")
    out = tmp_path / "o"
    out.mkdir()
    Image.new("RGB", (10, 10)).save(out / "p.overlay.jpg", comment=b"someone else's")
    before = (out / "p.overlay.jpg").read_bytes()
    result = run(img, "the red part", "-c", tiny_checkpoint, "-o", out, "--overlay-format", "jpg", *K0)
    assert result.exit_code == 1 and "cores predict did not write" in error_lines(result)[0]
    assert (out / "p.overlay.jpg").read_bytes() == before


def test_image_options_that_contradict_each_other_exit_2(tmp_path):
    img = write_image(tmp_path / "p.png")
    result = run(img, "q", "--no-png", "--overlay-format", "jpg")
    assert result.exit_code == 2 and "--overlay-format" in result.stderr


def test_the_help_names_the_default_overlay_size():
    import inspect

    from cores_cli.cli.predict import predict
    from cores_cli.visualize import DEFAULT_MAX_SIDE

    option = inspect.signature(predict).parameters["overlay_max_side"].default
    assert f"(default {DEFAULT_MAX_SIDE}," in option.help

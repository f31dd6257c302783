"""The Python API a notebook user reaches for: ``cores_cli.load()`` then ``model.predict``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, invoke_predict
from PIL import Image

import cores_cli
from cores_cli.errors import CoresError


@pytest.fixture(scope="module")
def model():
    return cores_cli.load(device="cpu")


def test_predict_a_path_gives_the_final_mask_at_the_image_size_and_the_cli_record(model, tmp_path):
    image = cores_cli.example_image()
    result = model.predict(image, cores_cli.EXAMPLE_QUERY)
    h, w = np.asarray(Image.open(image)).shape[:2]
    assert result.mask.shape == (h, w) and result.mask.dtype == bool
    assert len(result.level_masks) == len(result.level_tokens) == model.model.cfg.chain.depth
    assert result.level_tokens == ["[LOC]", "[SEG]"]
    assert np.array_equal(result.level_masks[-1], result.mask)
    assert "[SEG]" in result.answer and result.question
    # the same record the command prints, field by field (files and timings aside)
    cli = invoke_predict(image, cores_cli.EXAMPLE_QUERY, "--json", "-o", tmp_path)
    assert cli.exit_code == 0, cli.stderr
    printed = json.loads(cli.stdout.splitlines()[0])
    ours = dict(result.record)
    assert ours.pop("outputs") == {} and printed.pop("outputs")
    printed.pop("timings_s")
    assert ours == printed
    written = np.asarray(Image.open(tmp_path / "example.mask.png")) > 0
    assert np.array_equal(written, result.mask)


def test_a_pil_image_and_an_array_give_the_same_mask_as_the_file(model):
    image = cores_cli.example_image()
    from_path = model.predict(image, "the wheel").mask
    pil = Image.open(image)
    array = np.asarray(Image.open(image).convert("RGB"))
    assert np.array_equal(model.predict(pil, "the wheel").mask, from_path)
    assert np.array_equal(model.predict(array, "the wheel").mask, from_path)
    assert array.flags.writeable is False  # the caller's array is read, never written


def test_a_pil_image_is_turned_upright_as_a_file_is(model, realdata):
    path = realdata / "quirks" / "exif_orientation" / "Landscape_6.jpg"
    from_file = model.predict(path, "the red part")
    from_pil = model.predict(Image.open(path), "the red part")
    assert from_file.record["exif_rotated"] and from_pil.record["exif_rotated"]
    assert from_pil.mask.shape == from_file.mask.shape
    assert np.array_equal(from_pil.mask, from_file.mask)


def test_predict_batch_keeps_order_and_matches_one_at_a_time(model):
    image = cores_cli.example_image()
    pixels = np.asarray(Image.open(image).convert("RGB"))
    pairs = [(image, cores_cli.EXAMPLE_QUERY), (pixels[:, ::-1].copy(), "the tree"), (pixels[:64], "the wheel")]
    one_by_one = [model.predict(i, q) for i, q in pairs]
    for batch_size in (1, 2, 8):
        batched = model.predict_batch(pairs, batch_size=batch_size)
        assert [r.record["query"] for r in batched] == [q for _, q in pairs]
        assert [r.record["id"] for r in batched] == ["example", "item-1", "item-2"]
        for a, b in zip(batched, one_by_one):
            assert a.mask.shape == b.mask.shape
            assert np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize(
    ("image", "query", "message"),
    [
        (np.zeros((8, 8), np.uint8), "q", r"^an image array must be uint8 of shape \(H, W, 3\).*\(8, 8\)"),
        (np.zeros((8, 8, 3), np.float32), "q", r"uint8 of shape \(H, W, 3\).*float32"),
        (np.zeros((0, 8, 3), np.uint8), "q", r"the image array is empty"),
        (Image.new("RGB", (0, 5)), "q", r"the PIL image is empty: 0×5"),
        (np.zeros((40, 40, 3), np.uint8), "q", r"above the limit of 1,000 pixels \(raise it with max_pixels=\)"),
        (42, "q", r"a path, a PIL image or a uint8 .*got int"),
        ("no/such/image.png", "q", r"image not found: no/such/image\.png"),
        ("", "q", r"the image path is empty"),
        (None, "   ", r"^the query is empty"),
        (None, 5, r"the query must be a string, got int"),
        (None, "where is [SEG] here?", r"the query contains \[SEG\]"),
    ],
)
def test_bad_input_is_one_clear_error(model, image, query, message, monkeypatch):
    monkeypatch.setattr(model, "max_pixels", 1000)
    image = cores_cli.example_image() if image is None else image
    with pytest.raises(CoresError, match=message):
        model.predict(image, query)


def test_a_pil_image_whose_file_was_closed_is_a_clear_error(model):
    with Image.open(cores_cli.example_image()) as closed:
        pass
    with pytest.raises(CoresError, match="cannot read the PIL image"):
        model.predict(closed, "the wheel")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.predict(cores_cli.example_image(), "q", style="bogus"), r"style must be one of auto, sentence, phrase; got 'bogus'"),
        (lambda m: m.predict(cores_cli.example_image(), "q", mode="fast"), r"mode must be one of teacher, generate; got 'fast'"),
        (lambda m: m.predict_batch([(cores_cli.example_image(), "q")], batch_size="2"), r"batch_size must be a whole number of at least 1, got '2'"),
        (lambda m: m.predict_batch([(cores_cli.example_image(), "q")], batch_size=0), r"batch_size must be a whole number"),
        (lambda m: m.predict_batch((cores_cli.example_image(), "q")), r"a list of \(image, query\) pairs; for one pair use predict"),
        (lambda m: m.predict_batch([(cores_cli.example_image(), "q", 1)]), r"item 0: expected an \(image, query\) pair, got tuple of 3"),
        (lambda m: m.predict_batch(["ab"]), r"item 0: expected an \(image, query\) pair, got str"),
        (lambda m: m.predict_batch([(cores_cli.example_image(), "q"), (np.zeros((8, 8), np.uint8), "q")]), r"item 1: an image array must be uint8"),
        (lambda m: m.predict_batch([(cores_cli.example_image(), "q"), (cores_cli.example_image(), "")]), r"item 1: the query is empty"),
    ],
)
def test_bad_arguments_are_named(model, call, message):
    with pytest.raises(CoresError, match=message):
        call(model)


def test_a_bad_item_fails_the_batch_before_the_model_runs(model, monkeypatch):
    calls = []
    monkeypatch.setattr(model.predictor, "predict_images", lambda *a, **k: calls.append(a))
    with pytest.raises(CoresError, match="item 2: image not found"):
        model.predict_batch([(cores_cli.example_image(), "the wheel"), (cores_cli.example_image(), "a"), ("gone.png", "b")])
    assert calls == []


def test_images_are_decoded_a_batch_at_a_time(model, monkeypatch):
    import cores_cli.api as api

    events = []
    decode, run = api.as_image, model.predictor.predict_images
    monkeypatch.setattr(api, "as_image", lambda image, *a: events.append("decode") or decode(image, *a))
    monkeypatch.setattr(model.predictor, "predict_images", lambda items, *a, **k: events.append(f"run {len(items)}") or run(items, *a, **k))
    model.predict_batch([(cores_cli.example_image(), "the wheel")] * 3, batch_size=2)
    assert events == ["decode", "decode", "run 2", "decode", "run 1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "mps"}, r"unknown device 'mps'; use auto, cpu, cuda or cuda:N"),
        ({"device": "meta"}, r"unknown device 'meta'"),
        ({"device": None}, r"unknown device None"),
        ({"device": "cuda:99"}, r"device 'cuda:99' asked for, but"),
        ({"dtype": "int8"}, r"unknown dtype 'int8'"),
        ({"checkpoint": "x", "preset": "tiny"}, r"give either checkpoint or preset, not both"),
        ({"checkpoint": "  "}, r"checkpoint is an empty string"),
        ({"overrides": "prompt.in_context_k=0"}, r"overrides is a list of 'key=value' strings"),
        ({"max_pixels": "5"}, r"max_pixels must be a whole number of at least 1, got '5'"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be a whole number of at least 1, got 0"),
    ],
)
def test_load_refuses_bad_arguments_in_one_line(kwargs, message):
    with pytest.raises(CoresError, match=message):
        cores_cli.load(**kwargs)


def test_a_preset_build_leaves_the_callers_random_state_alone():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="random weights"):
        cores_cli.load(preset="tiny", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_tab_completion_lists_the_api_before_it_is_loaded():
    code = "import sys, cores_cli; print(sorted({'load', 'Segmenter', 'Result'} & set(dir(cores_cli))), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "['Result', 'Segmenter', 'load'] False"


def test_load_reads_a_checkpoint_from_an_offline_hub_cache(offline_hub):
    """``load("org/name")`` finds the repository as huggingface_hub lays out its cache."""
    from cores_cli.bundled import embedded_checkpoint

    offline_hub("someone/cores-tiny", embedded_checkpoint())
    hub = cores_cli.load("someone/cores-tiny", device="cpu")
    assert hub.source == "someone/cores-tiny"
    shipped = cores_cli.load(device="cpu")
    image = cores_cli.example_image()
    assert np.array_equal(hub.predict(image, "the wheel").mask, shipped.predict(image, "the wheel").mask)
    with pytest.raises(CoresError, match=r"no directory 'someone/other' here, and the Hub repository someone/other is not in the cache \(.*hf/hub\) while offline"):
        cores_cli.load("someone/other", device="cpu")


def test_importing_the_package_does_not_load_torch():
    code = "import sys, cores_cli; print('torch' in sys.modules, callable(cores_cli.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "True"]


def test_the_readme_python_snippet_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "(128, 128) bool"
    assert lines[1] == "Sure, it appears on [LOC]. It is [SEG]."

"""The shipped model knows synthetic 128×128 scenes only: used on anything else, it says so once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cores_cli
from conftest import invoke_predict
from cores_cli.cli.app import app

CAUTION = "the default model was trained only on synthetic 128×128 scenes"


def _photo(path, size=(96, 64)):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def cautions(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CAUTION in line]


def test_predict_cautions_once_for_images_that_are_not_synthetic_scenes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png")
    _photo(photos / "b.png", (200, 150))
    result = invoke_predict(photos, "the dog's nose", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    (line,) = cautions(result.stderr)
    assert line.startswith("warning:") and "(96×64)" in line and "-c/--checkpoint" in line


def test_no_caution_on_a_synthetic_scene_or_with_a_named_checkpoint(tmp_path):
    from cores_cli.bundled import embedded_checkpoint

    scene = invoke_predict("--example", "-o", tmp_path / "a")
    assert scene.exit_code == 0 and cautions(scene.stderr) == []
    named = invoke_predict(_photo(tmp_path / "p.png"), "the nose", "-c", embedded_checkpoint(), "-o", tmp_path / "b")
    assert named.exit_code == 0 and cautions(named.stderr) == []


def test_eval_cautions_on_a_dataset_other_than_the_synthetic_benchmark(tmp_path):
    from cores_cli.data.synthetic import write_split

    write_split(tmp_path / "reason_seg" / "ReasonSeg", "val", n=2)
    runner = CliRunner()
    other = runner.invoke(app, ["eval", "--dataset", "reasonseg:val", "--data-root", str(tmp_path)])
    assert other.exit_code == 0, other.stderr
    assert len(cautions(other.stderr)) == 1 and "reasonseg:val" in cautions(other.stderr)[0]
    synthetic = runner.invoke(app, ["eval", "--dataset", "synthetic:val", "--opt", "n=2"])
    assert synthetic.exit_code == 0 and cautions(synthetic.stderr) == []


def test_the_api_warns_once():
    model = cores_cli.load(device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(cores_cli.example_image(), "the wheel")
        assert [w for w in caught if CAUTION in str(w.message)] == []
        photo = np.zeros((64, 96, 3), np.uint8)
        model.predict_batch([(photo, "the nose"), (photo, "the ear")])
        model.predict(photo, "the eye")
    assert len([w for w in caught if CAUTION in str(w.message)]) == 1


@pytest.mark.parametrize("size", [(128, 128), (64, 96)])
def test_the_scene_size_rule(size):
    from cores_cli.bundled import is_synthetic_scene_size

    assert is_synthetic_scene_size(*size) == (size == (128, 128))

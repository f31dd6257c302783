"""Training from imported checkpoints (issue 14): an original LLaVA-v0 base as ``cores-7b-v0``
uses it, and a LISA checkpoint as the starting point (``train.init_from``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import in_process_training, tiny_recipe
from source_formats import build_tiny_sam, write_clip_dir, write_lisa_dir, write_llava_original_dir

from cores_cli.engine.checkpoint import load_initial_weights
from cores_cli.engine.importing import import_checkpoint
from cores_cli.engine.trainer import _build_model, run_training
from cores_cli.errors import CheckpointError
from safetensors.torch import load_file


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with in_process_training():
        yield


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    clip = write_clip_dir(root / "clip", seed=1)
    lisa = write_lisa_dir(root / "lisa", clip, seed=2, seg_first=False)
    v0 = write_llava_original_dir(root / "v0", "v0", seed=3, clip_dir=clip)
    sam = root / "sam.pth"
    torch.save(build_tiny_sam().state_dict(), sam)
    import_checkpoint(lisa.path, root / "lisa-cores", sam_preset="tiny")
    import_checkpoint(v0.path, root / "v0-cores", sam=sam, sam_preset="tiny")
    return root, sam


def recipe_on(base, run_dir, *overrides):
    """tiny-synthetic with the v0 recipe's model settings (paper's trainable parts only) on an imported base."""
    return tiny_recipe(
        run_dir,
        "data.val.dataset=null",
        "train.save_every=1000",
        "model.train_extra=[]",
        f"model.mllm.path={base / 'llava'}",
        "model.mllm.image_start_end=true",
        "model.mllm.image_token_index=null",
        *overrides,
    )


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_a_v0_base_imported_from_original_weights_trains(imports, tmp_path):
    root, sam = imports
    run = tmp_path / "run"
    recipe = recipe_on(root / "v0-cores", run, f"model.sam.checkpoint={sam}", "train.steps=16", "train.micro_batch_size=4", "train.lr=3.0e-3", "train.warmup_steps=2", "train.schedule=warmup_constant")
    run_training(recipe)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["kind"] == "train"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses


def test_a_lisa_checkpoint_is_a_starting_point_with_init_from(imports, tmp_path):
    root, _ = imports
    lisa = root / "lisa-cores"
    recipe = recipe_on(lisa, tmp_path / "run", f"train.init_from={lisa}", "train.steps=2", "model.chain.hidden_at=predicting")
    model = _build_model(recipe, None, torch.float32)
    report = load_initial_weights(model, lisa, required=("sam.",))
    stored = load_file(str(lisa / "weights.safetensors"))
    state = model.state_dict()
    # LISA's SAM, its β and its [SEG] rows are where training starts (CoReS's depth-2 chain)
    assert torch.equal(state["projector.fc1.weight"], stored["projector.fc1.weight"])
    assert torch.equal(state["sam.mask_decoder.iou_token.weight"], stored["sam.mask_decoder.iou_token.weight"])
    assert torch.equal(state["token_rows.embed"], stored["token_rows.embed"])
    assert report.loaded == len(stored) and model.cfg.chain.depth == 2
    messages = Messages()
    run_training(recipe, reporter=messages)
    assert any(line.startswith(f"initialised from {lisa}: ") for line in messages.lines), messages.lines


def test_init_from_without_sam_weights_names_the_missing_setting(imports, tmp_path):
    root, sam = imports
    # a training checkpoint made with a SAM file stores only SAM's mask decoder
    base = recipe_on(root / "v0-cores", tmp_path / "a", f"model.sam.checkpoint={sam}", "train.steps=1")
    run_training(base)
    partial = tmp_path / "a" / "checkpoints" / "step-000001"
    recipe = recipe_on(root / "v0-cores", tmp_path / "b", f"train.init_from={partial}")
    model = _build_model(recipe, None, torch.float32)
    with pytest.raises(CheckpointError, match=r"lacks \d+ tensor\(s\) the model needs from it, e\.g\. sam\.image_encoder.*set model\.sam\.checkpoint"):
        load_initial_weights(model, partial, required=("sam.",))

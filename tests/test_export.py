"""`cores export`: LoRA merged into a plain HF LLaVA directory that predicts the same masks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import typer
from conftest import build_tiny, scene_sample
from typer.testing import CliRunner

from cores_cli.cli.export import export as export_command
from cores_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from cores_cli.engine.export import export_checkpoint
from cores_cli.engine.predictor import Predictor
from cores_cli.errors import CoresError


@pytest.fixture(autouse=True)
def one_thread():
    # tiny ops: one thread is as fast, and immune to oversubscription on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_like_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose LoRA, chain-token rows and decoder are far from their init, so a
    wrong merge or a forgotten row would change the masks."""
    model = build_tiny("chain.depth=3", seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif name.startswith("token_rows."):
                p.add_(torch.randn_like(p))
    return save_checkpoint(model, tmp_path_factory.mktemp("exp") / "ckpt")


def masks(model, images):
    predictor = Predictor(model)
    return [[m for m in predictor.predict(img, q).level_masks] for img, q in images]


def test_export_predicts_the_same_masks_as_its_checkpoint(trained_like_checkpoint, tmp_path):
    out = export_checkpoint(trained_like_checkpoint, tmp_path / "export")
    original, _ = load_checkpoint(trained_like_checkpoint)
    exported, report = load_checkpoint(out)  # an export is itself a cores checkpoint
    assert not report.missing and not report.unexpected
    assert not exported.cfg.lora.enabled and exported.cfg.sam.checkpoint is None
    images = [(scene_sample("a", 0).image_array, "what lets the vehicle roll?"), (scene_sample("b", 5).image_array, "the red part")]
    got, want = masks(exported, images), masks(original, images)
    for g_levels, w_levels in zip(got, want):
        assert len(g_levels) == 3
        for g, w in zip(g_levels, w_levels):
            assert np.array_equal(g, w)
    # the chain-token rows are in the plain matrices, so LLaVA alone gives the same logits
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(out / "llava"))
    ids = torch.tensor([[exported.chain_token_ids["[SEG]"], exported.chain_token_ids["[LOC]"]]])
    rows = original.token_rows
    assert torch.allclose(hf.get_input_embeddings()(ids)[0], rows.embed[[2, 0]], atol=1e-6)
    assert (out / "llava" / "tokenizer.json").is_file() and not (out / "adapter").exists()


def test_a_moved_export_still_loads(trained_like_checkpoint, tmp_path):
    out = export_checkpoint(trained_like_checkpoint, tmp_path / "a", dtype="bf16")
    moved = tmp_path / "b"
    shutil.move(str(out), str(moved))
    assert json.loads((moved / "config.json").read_text())["model"]["mllm"]["path"] == "llava"
    model, report = load_checkpoint(moved)
    assert not report.missing and model.cfg.mllm.path == str(moved / "llava")
    assert json.loads((moved / "config.json").read_text())["extra"]["dtype"] == "bf16"


def test_export_refuses_to_overwrite_and_the_command_prints_the_directory(trained_like_checkpoint, tmp_path):
    app = typer.Typer()
    app.command()(export_command)
    target = tmp_path / "out"
    res = CliRunner().invoke(app, [str(trained_like_checkpoint), str(target)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(target)
    res = CliRunner().invoke(app, [str(trained_like_checkpoint), str(target)])
    assert res.exit_code == 1 and "already exists" in res.output
    with pytest.raises(CoresError, match="unknown dtype"):
        export_checkpoint(trained_like_checkpoint, tmp_path / "x", dtype="int8")

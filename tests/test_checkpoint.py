"""Checkpoint directories, SAM .pth files and HF LLaVA directories: round trips with the real
key names, clear errors for broken files, and no unpickling of untrusted data."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny, scene_sample
from safetensors.torch import load_file, save_file

from cores_cli.config import replace, tiny
from cores_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from cores_cli.engine.predictor import Predictor
from cores_cli.errors import CheckpointError
from cores_cli.model.builder import build_model
from cores_cli.model.mllm import build_llava, build_tiny_tokenizer
from cores_cli.model.sam import build_sam, load_sam_checkpoint


class Boom:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _predict(model, pixels, mode="teacher"):
    return Predictor(model).predict(pixels, "what lets the vehicle roll?", mode=mode)


def test_save_then_load_gives_identical_predictions(tiny_checkpoint):
    model, report = load_checkpoint(tiny_checkpoint)
    assert not report.missing and not report.unexpected
    again, _ = load_checkpoint(tiny_checkpoint)
    pixels = scene_sample().image_array
    a, b = _predict(model, pixels), _predict(again, pixels)
    for ma, mb in zip(a.level_masks, b.level_masks):
        assert np.array_equal(ma, mb)
    # and equal to the model that was saved (rebuilt the same way the fixture built it)
    original = build_tiny(seed=1)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if "lora_B" in name:
                p.copy_(dict(model.named_parameters())[name])
    sd_saved, sd_loaded = original.state_dict(), model.state_dict()
    assert all(torch.equal(sd_saved[k], sd_loaded[k]) for k in sd_saved)


def test_checkpoint_layout_has_no_pickles(tiny_checkpoint):
    files = {p.relative_to(tiny_checkpoint).as_posix() for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert {"config.json", "weights.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".p"))]
    adapter = json.loads((tiny_checkpoint / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and adapter["lora_alpha"] == 16
    meta = json.loads((tiny_checkpoint / "config.json").read_text())
    assert meta["format"] == "cores-checkpoint" and meta["model"]["preset"] == "tiny"


def test_lora_and_chain_rows_matter_after_loading(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    lora = get_lora(model)
    assert lora and all(t.abs().sum() > 0 for t in lora)  # the fixture's non-zero B matrices came back


def get_lora(model):
    return [p for n, p in model.named_parameters() if "lora_B" in n]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing_dir", "checkpoint directory not found"),
        ("file", "a checkpoint is a directory"),
        ("no_config", "not a cores checkpoint"),
        ("bad_json", "is not valid JSON"),
        ("wrong_format", "not a cores checkpoint config"),
        ("unknown_key", "unknown config key"),
        ("no_weights", "checkpoint file missing"),
        ("garbage_weights", "not a readable safetensors file"),
        ("no_tokenizer", "has no tokenizer"),
        ("no_adapter", "no .*adapter_config.json"),
    ],
)
def test_broken_checkpoints_fail_clearly(tiny_checkpoint, tmp_path, breakage, message):
    ck = _copy(tiny_checkpoint, tmp_path)
    if breakage == "missing_dir":
        ck = tmp_path / "nope"
    elif breakage == "file":
        ck = tmp_path / "file.txt"
        ck.write_text("x")
    elif breakage == "no_config":
        (ck / "config.json").unlink()
    elif breakage == "bad_json":
        (ck / "config.json").write_text("{not json")
    elif breakage == "wrong_format":
        (ck / "config.json").write_text('{"format": "something-else"}')
    elif breakage == "unknown_key":
        meta = json.loads((ck / "config.json").read_text())
        meta["model"]["chain"]["dpeth"] = 2
        (ck / "config.json").write_text(json.dumps(meta))
    elif breakage == "no_weights":
        (ck / "weights.safetensors").unlink()
    elif breakage == "garbage_weights":
        (ck / "weights.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    elif breakage == "no_tokenizer":
        shutil.rmtree(ck / "tokenizer")
    elif breakage == "no_adapter":
        shutil.rmtree(ck / "adapter")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ck)


def test_a_pickle_in_place_of_weights_is_refused_not_executed(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path)
    canary = tmp_path / "pwned"
    (ck / "weights.safetensors").write_bytes(pickle.dumps({"x": Boom(canary)}))
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)
    assert not canary.exists()


def test_missing_and_unexpected_tensors_are_reported(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path)
    weights = load_file(str(ck / "weights.safetensors"))
    dropped = "refiner.kind"
    del weights[dropped]
    weights["projector.extra.weight"] = torch.zeros(2)
    save_file(weights, str(ck / "weights.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. refiner.kind\), 1 unexpected \(e.g. projector.extra.weight\)"):
        load_checkpoint(ck)
    model, report = load_checkpoint(ck, allow_missing=True)
    assert report.missing == [dropped] and report.unexpected == ["projector.extra.weight"]


def _edit_config(ck: Path, section: str, key: str, value) -> None:
    meta = json.loads((ck / "config.json").read_text())
    meta["model"][section][key] = value
    (ck / "config.json").write_text(json.dumps(meta))


def test_a_checkpoint_of_another_size_is_refused(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path)
    _edit_config(ck, "sam", "prompt_embed_dim", 32)  # config.json no longer matches the weights
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(ck)


def test_lora_rank_mismatch_is_refused(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path)
    _edit_config(ck, "lora", "r", 4)
    with pytest.raises(CheckpointError, match="LoRA r=8"):
        load_checkpoint(ck)


def test_overwriting_a_checkpoint_is_atomic(tmp_path):
    model = build_tiny()
    dest = save_checkpoint(model, tmp_path / "ck")
    before = (dest / "weights.safetensors").read_bytes()

    class Crash(Exception):
        pass

    original = model.tokenizer.save_pretrained
    model.tokenizer.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(Crash())
    with pytest.raises(Crash):
        save_checkpoint(model, dest)
    model.tokenizer.save_pretrained = original
    assert (dest / "weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind


# ------------------------------------------------------------------------------- SAM .pth


def test_sam_pth_with_official_key_names_loads(tmp_path):
    torch.manual_seed(0)
    source = build_sam(tiny().sam)
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), path)  # the official files are plain state dicts like this
    target = build_sam(tiny().sam)
    report = load_sam_checkpoint(target, path)
    assert not report.missing and not report.unexpected
    assert "image_encoder.blocks.0.attn.rel_pos_h" in source.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_sam_pth_that_would_execute_code_is_refused(tmp_path):
    canary = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": Boom(canary)}, path)
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load_sam_checkpoint(build_sam(tiny().sam), path)
    assert not canary.exists()


def test_sam_pth_of_another_size_or_incomplete_is_refused(tmp_path):
    small = build_sam(tiny().sam)
    other = build_sam(replace(tiny().sam, encoder_embed_dim=32))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="has shape"):
        load_sam_checkpoint(small, tmp_path / "other.pth")
    partial = {k: v for k, v in small.state_dict().items() if not k.startswith("mask_decoder.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="does not fit this SAM size: .* missing"):
        load_sam_checkpoint(small, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_sam_checkpoint(small, tmp_path / "absent.pth")


# ----------------------------------------------------------------------- HF LLaVA directory


def test_llava_directory_in_the_hub_key_layout_loads(tmp_path):
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tiny()
    llava = build_llava(cfg.mllm, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    llava.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    # Rewrite the weights in the exact key layout of llava-hf/llava-1.5-7b-hf's files.
    weights_file = tmp_path / "llava" / "model.safetensors"
    saved = load_file(str(weights_file))
    hub = {("vision_tower.vision_model." + k[len("vision_tower."):]) if k.startswith("vision_tower.") else k: v for k, v in saved.items()}
    save_file(hub, str(weights_file), metadata={"format": "pt"})
    keys = set(hub)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys

    sam_path = tmp_path / "sam.pth"
    torch.save(build_sam(cfg.sam).state_dict(), sam_path)
    real_style = replace(cfg, mllm=replace(cfg.mllm, path=str(tmp_path / "llava")), sam=replace(cfg.sam, checkpoint=str(sam_path)))
    model = build_model(real_style)
    loaded = model.llava.state_dict()
    for name, tensor in llava.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:
            tensor, got = tensor, loaded[name][: tensor.shape[0]]  # grown by the chain tokens
        else:
            got = loaded[name.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")] if ("language_model" in name and ("q_proj" in name or "v_proj" in name)) else loaded[name]
        assert torch.equal(tensor, got), name

    # a checkpoint of such a model stores only what is not in the base files
    ck = save_checkpoint(model, tmp_path / "ck")
    stored = set(load_file(str(ck / "weights.safetensors")))
    assert stored and all(k.startswith(("sam.mask_decoder.", "projector.", "refiner.", "token_rows.")) for k in stored)
    back, report = load_checkpoint(ck)
    assert not report.missing
    pixels = scene_sample().image_array
    assert np.array_equal(_predict(model, pixels).mask, _predict(back, pixels).mask)


def test_missing_llava_directory_is_a_clear_error(tmp_path):
    cfg = tiny()
    bad = replace(cfg, mllm=replace(cfg.mllm, path=str(tmp_path / "nowhere")))
    with pytest.raises(CheckpointError, match="tokenizer directory not found"):
        build_model(bad)

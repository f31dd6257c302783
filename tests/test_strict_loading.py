"""Strict, clear loading: ``-c`` takes a training run directory, and a base model directory
that does not match what is asked of it fails at load time with one line naming it."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny, error_lines, invoke_predict
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from cores_cli.config import SAM_PRESETS, sam_vit_h, sam_vit_l, tiny
from cores_cli.configio import apply_overrides
from cores_cli.engine.loading import resolve_checkpoint
from cores_cli.engine.train_state import TrainState, capture_rng, write_best, write_training_checkpoint
from cores_cli.errors import CheckpointError, CoresError
from cores_cli.model.builder import build_model
from cores_cli.model.mllm import IMAGE_TOKEN, build_llava, build_tiny_tokenizer, check_loading_info, load_llava
from cores_cli.model.sam import build_sam, load_sam_checkpoint, variant_settings

K0 = ["--set", "prompt.in_context_k=0"]


# ------------------------------------------------------------------------------ -c RUN


def _perturbed_tiny(seed: int):
    """A tiny model whose LoRA B matrices are non-zero, so two seeds predict differently."""
    model = build_tiny(seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _write_step(model, root: Path, step: int) -> Path:
    _, rng_tensors = capture_rng()
    return write_training_checkpoint(model, root, TrainState(step=step), {}, [rng_tensors])


@pytest.fixture(scope="module")
def training_run(tmp_path_factory) -> Path:
    """A run directory laid out as ``cores train`` writes it: step checkpoints, ``latest``
    and a ``best/`` that holds a different model than the latest step."""
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    root = run / "checkpoints"
    _write_step(_perturbed_tiny(seed=3), root, 2)
    _write_step(_perturbed_tiny(seed=4), root, 4)
    write_best(_perturbed_tiny(seed=5), root, step=2, metrics={"giou": 0.5})
    (run / "metrics.jsonl").write_text("", encoding="utf-8")
    return run


def test_a_run_directory_resolves_to_its_best_checkpoint(training_run):
    assert resolve_checkpoint(training_run) == training_run / "checkpoints" / "best"
    assert resolve_checkpoint(str(training_run)) == training_run / "checkpoints" / "best"


def test_a_run_without_best_resolves_to_the_latest_complete_step(training_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(training_run, run)
    shutil.rmtree(run / "checkpoints" / "best")
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000004"
    # ``latest`` naming a step that a kill left incomplete: the newest complete one instead
    (run / "checkpoints" / "step-000004" / "train_state" / "rng.safetensors").unlink()
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-000002"


def test_a_checkpoint_directory_is_taken_as_it_is(training_run):
    step = training_run / "checkpoints" / "step-000002"
    assert resolve_checkpoint(step) == step


def test_a_run_with_no_checkpoint_yet_is_one_clear_error(tmp_path):
    run = tmp_path / "fresh-run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CoresError, match=r"fresh-run is a training run with no complete checkpoint yet"):
        resolve_checkpoint(run)


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def _predict_mask(image: Path, checkpoint: Path, out: Path) -> np.ndarray:
    result = invoke_predict(image, "the red part", "-c", checkpoint, "-o", out, "--json", *K0)
    assert result.exit_code == 0, result.stderr
    return np.array(Image.open(out / f"{image.stem}.mask.png"))


def test_predict_with_a_run_directory_uses_its_best_checkpoint(training_run, tmp_path):
    image = _image(tmp_path / "photo.png")
    from_run = _predict_mask(image, training_run, tmp_path / "from-run")
    from_best = _predict_mask(image, training_run / "checkpoints" / "best", tmp_path / "from-best")
    from_latest = _predict_mask(image, training_run / "checkpoints" / "step-000004", tmp_path / "from-latest")
    assert np.array_equal(from_run, from_best)
    assert not np.array_equal(from_run, from_latest)  # the models differ, so this tells best/ from latest
    record = json.loads((tmp_path / "from-run" / "photo.json").read_text())
    assert record["answer"]  # a whole prediction, not an error record


def test_predict_with_a_run_that_has_no_checkpoint_fails_in_one_line(tmp_path):
    run = tmp_path / "fresh-run"
    (run / "checkpoints").mkdir(parents=True)
    result = invoke_predict(_image(tmp_path / "photo.png"), "the red part", "-c", run, "-o", tmp_path / "out", *K0)
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "no complete checkpoint yet" in lines[0], result.stderr


# ------------------------------------------------------------------------------ HF LLaVA directory


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA as ``save_pretrained`` writes it, with its tokenizer beside it."""
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    llava = build_llava(tiny().mllm, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id)
    path = tmp_path_factory.mktemp("base") / "llava"
    llava.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _copy(llava_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "llava"
    shutil.copytree(llava_dir, dest)
    return dest


def _rewrite_weights(path: Path, change) -> None:
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})


def test_a_clean_llava_directory_loads_without_complaint(llava_dir):
    assert isinstance(load_llava(llava_dir), LlavaForConditionalGeneration)


def test_a_llava_directory_with_a_missing_weight_does_not_load(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)
    dropped = "language_model.model.layers.0.mlp.up_proj.weight"
    _rewrite_weights(path, lambda t: t.pop(dropped))
    with pytest.raises(CheckpointError, match=r"\(1 missing: model\.language_model\.layers\.0\.mlp\.up_proj\.weight\)") as err:
        load_llava(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_many_missing_and_unexpected_tensors_are_counted_and_the_first_named(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)

    def damage(tensors):
        for key in [k for k in tensors if k.startswith("language_model.model.layers.0.self_attn.")]:
            del tensors[key]
        tensors["language_model.model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    _rewrite_weights(path, damage)
    with pytest.raises(CheckpointError, match=r"\(4 missing: [^;]*, \.\.\.; 1 unexpected: \S*extra\.weight\)"):
        load_llava(path)


def test_benign_rotary_and_position_buffers_are_allowed(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)

    def add_buffers(tensors):  # as older saves of Llama and CLIP carry them
        tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]

    _rewrite_weights(path, add_buffers)
    load_llava(path)
    # and the allow-list itself, whatever transformers filters before reporting
    info = {"missing_keys": {"model.language_model.rotary_emb.inv_freq"}, "unexpected_keys": {"model.language_model.layers.3.self_attn.rotary_emb.inv_freq", "vision_tower.vision_model.embeddings.position_ids"}}
    check_loading_info(path, info)


def test_a_config_whose_vocabulary_does_not_match_the_weights_fails_in_one_line(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    rows = config["text_config"]["vocab_size"]
    config["text_config"]["vocab_size"] = rows + 10
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"vocabulary size is {rows + 10} but the embedding weights have {rows} rows: set text_config.vocab_size to {rows}") as err:
        load_llava(path)
    assert str(path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_a_tokenizer_without_the_image_token_fails_at_load_time(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != IMAGE_TOKEN]
    del tokenizer["model"]["vocab"][IMAGE_TOKEN]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    cfg = tiny()
    with pytest.raises(CheckpointError, match=rf"the tokenizer in {re.escape(str(path))} has no <image> token.*add_tokens") as err:
        build_model(replace(cfg, mllm=replace(cfg.mllm, path=str(path))))
    assert "\n" not in str(err.value)


def test_a_config_whose_image_token_is_not_the_tokenizers_fails_at_load_time(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    right = config["image_token_index"]
    config["image_token_index"] = right - 1  # another token of the vocabulary
    (path / "config.json").write_text(json.dumps(config))
    cfg = tiny()
    with pytest.raises(CheckpointError, match=rf"image_token_index is {right - 1} but the tokenizer's <image> is id {right}: set image_token_index to {right}") as err:
        build_model(replace(cfg, mllm=replace(cfg.mllm, path=str(path))))
    assert str(path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_predict_with_a_broken_llava_directory_is_one_error_line(llava_dir, tmp_path):
    path = _copy(llava_dir, tmp_path)
    _rewrite_weights(path, lambda t: t.pop("multi_modal_projector.linear_2.bias"))
    image = _image(tmp_path / "photo.png")
    result = invoke_predict(image, "the red part", "--preset", "tiny", "--set", f"mllm.path={path}", "-o", tmp_path / "out", *K0)
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "multi_modal_projector.linear_2.bias" in lines[0], result.stderr


# ------------------------------------------------------------------------------ SAM .pth variants


def _fake_official_pth(variant: str, path: Path) -> Path:
    """A ``sam_vit_*.pth`` with the official key names and the encoder's real patch-embedding
    shape (what tells the variants apart), every other tensor a placeholder: megabytes, not GB."""
    with torch.device("meta"):
        keys = list(build_sam(SAM_PRESETS[variant]()).state_dict().items())
    state = {k: torch.zeros(v.shape if k == "image_encoder.patch_embed.proj.weight" else (1,)) for k, v in keys}
    torch.save(state, path)
    return path


def test_a_vit_b_pth_into_a_vit_h_config_names_the_file_and_the_settings(tmp_path):
    pth = _fake_official_pth("vit_b", tmp_path / "sam_vit_b_01ec64.pth")
    with torch.device("meta"):
        vit_h = build_sam(sam_vit_h())
    with pytest.raises(CheckpointError) as err:
        load_sam_checkpoint(vit_h, pth)
    message = str(err.value)
    assert "\n" not in message
    assert f"SAM checkpoint {pth} is ViT-B (width 768, 12 blocks), but the model is configured for ViT-H (width 1280, 32 blocks)" in message
    assert "--set sam.encoder_embed_dim=768 --set sam.encoder_depth=12 --set sam.encoder_num_heads=12 --set sam.encoder_global_attn_indexes=[2,5,8,11]" in message
    assert "or pass a sam_vit_h_*.pth" in message


def test_the_suggested_settings_build_the_variant_of_the_file():
    settings = variant_settings("vit_l").replace("--set ", "").split()
    assert apply_overrides(tiny(), settings).sam.encoder_embed_dim == sam_vit_l().encoder_embed_dim
    assert apply_overrides(tiny(), settings).sam.encoder_global_attn_indexes == sam_vit_l().encoder_global_attn_indexes


def test_predict_with_a_sam_pth_of_another_variant_is_one_error_line(tmp_path):
    pth = _fake_official_pth("vit_b", tmp_path / "sam_vit_b.pth")
    image = _image(tmp_path / "photo.png")
    result = invoke_predict(image, "the red part", "--preset", "tiny", "--set", f"sam.checkpoint={pth}", "-o", tmp_path / "out", *K0)
    assert result.exit_code != 0
    lines = error_lines(result)
    assert len(lines) == 1 and str(pth) in lines[0] and "configure vit_b with --set sam.encoder_embed_dim=768" in lines[0], result.stderr


def test_mllm_path_takes_a_hub_id_from_an_offline_cache_and_keeps_the_id(llava_dir, offline_hub):
    offline_hub("someone/llava-tiny", llava_dir)
    cfg = tiny()
    torch.manual_seed(0)  # the rows added for the chain tokens are drawn at random
    model = build_model(replace(cfg, mllm=replace(cfg.mllm, path="someone/llava-tiny")))
    torch.manual_seed(0)
    local = build_model(replace(cfg, mllm=replace(cfg.mllm, path=str(llava_dir))))
    assert model.cfg.mllm.path == "someone/llava-tiny"  # what a checkpoint will record
    for (name, a), (_, b) in zip(model.llava.state_dict().items(), local.llava.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(CoresError, match=r"mllm.path not found: .*someone/absent.* not in the cache"):
        build_model(replace(cfg, mllm=replace(cfg.mllm, path="someone/absent")))

"""Real widths and token counts at one layer: the 7B preset's LLM width (4096, 32 heads, 11008,
32000-entry vocabulary), CLIP ViT-L/14 at 336 px (576 image tokens, ``vision_feature_layer=-2``)
and SAM ViT-H's width at 1024 px (64×64 embeddings, 256×256 low-res masks), with the depth cut
to what each part needs. The tiny preset cannot catch a bug that only shows at these sizes (a
token count, a grid side, a vocabulary past the tokenizer), and the real depth cannot run here.

Also an HF-format LLaVA directory at these widths, with a Llama-style tokenizer built offline,
loaded the way ``--set model.mllm.path=DIR`` loads it.

Computed in fp32 on the CPU: bf16 matmuls are ~200× slower on CPUs without bf16 units. The
model is ~2 GB in fp32, so it is built once per module and freed at the end.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from conftest import make_batch, scene_sample

from cores_cli.config import ModelConfig, llava_15_7b
from cores_cli.configio import apply_overrides
from cores_cli.model.cores import TRAINABLE_GROUPS

IMAGE_TOKENS = 576  # (336 / 14) ** 2
SAM_GRID = 64  # 1024 / 16
LOW_RES_MASK = 256  # 4 × SAM_GRID
VOCAB = 32000


def real_width_config(*overrides: str) -> ModelConfig:
    """The llava-1.5-7b preset at its real widths, one layer per part (CLIP keeps two:
    ``vision_feature_layer=-2`` reads the second-to-last hidden state, which must come from a
    layer, not the embeddings). SAM's single block is a global-attention block, as the real
    model's last block is. The tokenizer is the built-in tiny one, whose ids all lie inside the
    32000-row vocabulary (``fit_vocabulary`` never shrinks it)."""
    return apply_overrides(
        llava_15_7b(),
        [
            "preset=real-width-1-layer",
            "prompt.in_context_k=0",
            "mllm.text.num_layers=1",
            f"mllm.text.vocab_size={VOCAB}",
            "mllm.vision.num_layers=2",
            "mllm.image_token_index=null",
            "sam.encoder_depth=1",
            "sam.encoder_global_attn_indexes=[0]",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def real_width_model():
    from cores_cli.model.builder import build_model

    torch.manual_seed(0)
    model = build_model(real_width_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # LoRA B starts at 0: non-zero so that LoRA shows in every test
    yield model
    del model
    gc.collect()


def test_the_preset_has_the_real_widths(real_width_model):
    m = real_width_model
    text, vision = m.llava.config.text_config, m.llava.config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size) == (4096, 32, 11008)
    assert m.llava.get_input_embeddings().num_embeddings == VOCAB
    assert m.llava.get_output_embeddings().out_features == VOCAB
    assert (vision.hidden_size, vision.num_attention_heads, vision.patch_size, vision.image_size) == (1024, 16, 14, 336)
    assert m.llava.config.vision_feature_layer == -2
    assert m.num_image_tokens == IMAGE_TOKENS
    encoder = m.sam.image_encoder
    assert encoder.patch_embed.proj.out_channels == 1280 and encoder.img_size == 1024
    assert encoder.blocks[0].window_size == 0  # the global-attention block
    assert all(i < VOCAB for i in m.chain_token_ids.values())


@pytest.mark.slow
def test_a_teacher_forced_training_step_reaches_every_trainable_group(real_width_model):
    model = real_width_model
    model.train()
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.sam.image_encoder.register_forward_hook(lambda mod, args, out: seen.__setitem__("sam", tuple(out.shape))),
        model.llava.model.multi_modal_projector.register_forward_hook(lambda mod, args, out: seen.__setitem__("image_features", tuple(out.shape))),
    ]
    try:
        batch = make_batch(model, [scene_sample("a", 0, size=(768, 1024))], train=True)
        out = model(batch)
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    try:
        assert torch.isfinite(out.loss)
        assert int((batch.input_ids == model.image_token_id).sum()) == IMAGE_TOKENS
        assert seen["image_features"][-2:] == (IMAGE_TOKENS, 4096)
        assert seen["sam"] == (1, 256, SAM_GRID, SAM_GRID)
        assert batch.sam_images.shape[-2:] == (1024, 1024)
        assert all(level.shape == (1, 1, LOW_RES_MASK, LOW_RES_MASK) for level in out.level_logits)
        groups = model.parameter_groups()
        assert set(TRAINABLE_GROUPS) <= set(groups)
        for group, params in groups.items():
            for name, p in params:
                if group in TRAINABLE_GROUPS:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
                else:
                    assert p.grad is None, f"frozen {name} got a gradient"
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


PHOTO_SIZE = (768, 1024)  # (H, W): a 1024×768 photo, resized by SAM to 1024×768 and padded


def _photo() -> np.ndarray:
    return scene_sample("photo", 3, size=PHOTO_SIZE).image_array


def _predicted_masks(model, pixels: np.ndarray) -> list[np.ndarray]:
    from cores_cli.engine.predictor import Predictor

    return Predictor(model).predict(pixels, "what lets the vehicle roll?").level_masks


@pytest.fixture(scope="module")
def reference_masks(real_width_model) -> list[np.ndarray]:
    return _predicted_masks(real_width_model, _photo())


@pytest.mark.slow
def test_predict_gives_masks_at_the_image_size(real_width_model, reference_masks):
    assert len(reference_masks) == real_width_model.cfg.chain.levels
    assert all(m.shape == PHOTO_SIZE and m.dtype == bool for m in reference_masks)
    # a random model predicts something, yet not the same everywhere: the masks are not degenerate
    assert 0 < reference_masks[-1].mean() < 1


@pytest.fixture(scope="module")
def real_width_checkpoint(real_width_model, tmp_path_factory):
    from cores_cli.engine.checkpoint import save_checkpoint

    return save_checkpoint(real_width_model, tmp_path_factory.mktemp("real-width") / "ckpt")


@pytest.mark.slow
def test_save_then_load_predicts_identical_masks(real_width_checkpoint, reference_masks):
    from cores_cli.engine.checkpoint import load_checkpoint

    loaded, report = load_checkpoint(real_width_checkpoint)
    try:
        assert not report.missing and not report.unexpected
        assert loaded.llava.get_input_embeddings().num_embeddings == VOCAB
        got = _predicted_masks(loaded, _photo())
        assert len(got) == len(reference_masks)
        for g, w in zip(got, reference_masks):
            assert np.array_equal(g, w)
    finally:
        del loaded
        gc.collect()


@pytest.mark.slow
def test_export_loads_back_and_predicts_the_same_masks(real_width_checkpoint, reference_masks, tmp_path):
    from cores_cli.engine.checkpoint import load_checkpoint
    from cores_cli.engine.export import export_checkpoint

    out = export_checkpoint(real_width_checkpoint, tmp_path / "export")
    gc.collect()
    exported, report = load_checkpoint(out)
    try:
        assert not report.missing and not report.unexpected
        assert not exported.cfg.lora.enabled and (out / "llava" / "config.json").is_file()
        got = _predicted_masks(exported, _photo())
        # LoRA merged into the weights rounds differently from LoRA applied beside them: a
        # pixel whose logit is within rounding of 0 may flip, nothing more
        for g, w in zip(got, reference_masks):
            assert g.shape == w.shape and (g == w).mean() > 0.999
    finally:
        del exported
        gc.collect()


# --------------------------------------------------------------- an HF LLaVA directory, as users pass it

HF_VOCAB = 32064  # llava-1.5-hf pads 32000 + <image> + <pad> to a multiple of 64
IMAGE_ID, PAD_ID = 32000, 32001


def llama_style_tokenizer():
    from cores_cli.model.mllm import build_llama_style_tokenizer

    return build_llama_style_tokenizer()


@pytest.fixture(scope="module")
def hf_llava_dir(tmp_path_factory):
    """A 1-layer real-width LLaVA-1.5 directory as ``save_pretrained`` writes it (bf16
    safetensors, as llava-hf ships), with its tokenizer."""
    from transformers import LlavaForConditionalGeneration

    from cores_cli.model.mllm import llava_config

    tok = llama_style_tokenizer()
    assert (len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id) == (VOCAB + 2, IMAGE_ID, PAD_ID)
    cfg = real_width_config().mllm
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(llava_config(cfg, HF_VOCAB, IMAGE_ID, PAD_ID)).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("hf") / "llava-1.5-1-layer"
    llava.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    q_proj = llava.model.language_model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    del llava
    gc.collect()
    return path, q_proj


def test_an_hf_llava_directory_loads_the_way_mllm_path_does(hf_llava_dir):
    from cores_cli.model.builder import build_model

    path, saved_q_proj = hf_llava_dir
    model = build_model(real_width_config(f"mllm.path={path}", f"mllm.image_token_index={IMAGE_ID}"))
    try:
        tok = model.tokenizer
        assert tok.is_fast and len(tok) == VOCAB + 2 + 3
        assert list(model.chain_token_ids.values()) == [32002, 32003, 32004]  # after <image> and <pad>
        assert model.image_token_id == IMAGE_ID and tok.pad_token_id == PAD_ID
        assert model.llava.get_input_embeddings().num_embeddings == HF_VOCAB  # not shrunk to the tokenizer
        assert model.llava.config.text_config.hidden_size == 4096 and model.num_image_tokens == IMAGE_TOKENS
        base_q = model.llava.model.language_model.layers[0].self_attn.q_proj.base_layer.weight
        assert torch.equal(base_q, saved_q_proj)  # the weights of the directory, not a fresh init
        # text the corpus never saw falls back to bytes and decodes back whole
        text = "a 日本 wheel"
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.convert_tokens_to_ids("<0xE6>") in ids and tok.decode(ids) == text
        batch = make_batch(model, [scene_sample("a", 0, size=PHOTO_SIZE)], train=True)
        assert int((batch.input_ids == IMAGE_ID).sum()) == IMAGE_TOKENS
        assert [int((batch.input_ids == i).sum()) for i in model.chain_token_ids.values()] == [1, 0, 1]  # [LOC] … [SEG]
    finally:
        del model
        gc.collect()

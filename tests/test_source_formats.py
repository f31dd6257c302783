"""The source-format fixtures (tests/source_formats.py) are what they claim to be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from source_formats import (
    ARCH,
    IMAGE_TOKEN_INDEX,
    LISA_SYSTEM,
    build_tiny_sam,
    clip_vision_weights,
    lisa_preprocess,
    lisa_prompt,
    lisa_reference_forward,
    lisa_reference_logits,
    lisa_seg_positions,
    read_checkpoint_dir,
    write_clip_dir,
    write_clip_full_dir,
    write_lisa_dir,
    write_llava_original_dir,
    write_sp_tokenizer,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_clip_dir(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def lisa7(tmp_path_factory, clip_dir):
    """LISA-7B-v1 style: <im_patch> <im_start> <im_end> [SEG], .bin shards."""
    return write_lisa_dir(tmp_path_factory.mktemp("lisa7") / "LISA-7B-v1", clip_dir, seed=0, fmt="bin", seg_first=False)


@pytest.fixture(scope="module")
def lisa13(tmp_path_factory, clip_dir):
    """LISA-13B-llama2-v1 style: [SEG] <im_start> <im_end>, 3 safetensors shards."""
    return write_lisa_dir(
        tmp_path_factory.mktemp("lisa13") / "LISA-13B-llama2-v1", clip_dir, seed=1, shards=3, fmt="safetensors", seg_first=True
    )


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 90, (40, 60, 3), dtype=np.uint8)
    img[10:30, 15:40] = (220, 50, 40)
    return img


def llm_keys(layers: int) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        keys |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return keys


def expected_lisa_keys() -> set[str]:
    sam = {f"model.visual_model.{k}" for k in build_tiny_sam().state_dict()}
    fcs = {f"model.text_hidden_fcs.0.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")}
    return llm_keys(ARCH.layers) | {"model.mm_projector.weight", "model.mm_projector.bias"} | sam | fcs


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("added", [["<im_patch>", "<im_start>", "<im_end>", "[SEG]"], ["[SEG]", "<im_start>", "<im_end>"], []])
def test_sp_tokenizer_keeps_added_ids(tmp_path, added):
    from transformers import AutoTokenizer

    write_sp_tokenizer(tmp_path, added, vocab_size=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "added_tokens.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"
    ]  # fmt: skip
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {t: 1000 + i for i, t in enumerate(added)}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["tokenizer_class"], cfg["legacy"], cfg["model_max_length"], cfg["padding_side"], cfg["pad_token"]) == (
        "LlamaTokenizer", True, 512, "right", "<unk>"
    )  # fmt: skip
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "<unk>"

    tok = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=True)
    assert tok.is_fast and len(tok) == 1000 + len(added)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    for i, t in enumerate(added):
        assert tok.convert_tokens_to_ids(t) == 1000 + i
        assert tok(t, add_special_tokens=False).input_ids == [1000 + i]  # one id, no stray "▁" (LISA #55)
    ids = tok("USER: hi ASSISTANT:").input_ids
    assert ids[0] == 1 and all(i < 1000 for i in ids)


# --------------------------------------------------------------------------- LISA layout


@pytest.mark.parametrize("which", ["lisa7", "lisa13"])
def test_lisa_dir_keys_and_shards(request, which):
    fx = request.getfixturevalue(which)
    files = sorted(p.name for p in fx.path.iterdir())
    index = json.loads(fx.index_file.read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == expected_lisa_keys() == set(fx.state_dict)
    assert not any("vision_tower" in k for k in weight_map)  # LISA strips CLIP
    if fx.fmt == "bin":
        assert fx.index_file.name == "pytorch_model.bin.index.json"
        assert [p.name for p in fx.shard_files] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    else:
        assert fx.index_file.name == "model.safetensors.index.json"
        assert [p.name for p in fx.shard_files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(weight_map.values()) == {p.name for p in fx.shard_files} <= set(files)
    assert "tokenizer.json" not in files and {"config.json", "generation_config.json", "tokenizer.model"} <= set(files)

    seen: dict[str, torch.Tensor] = {}
    for shard in fx.shard_files:
        if fx.fmt == "bin":
            part = torch.load(shard, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            part = load_file(str(shard))
        assert part and not set(part) & set(seen)
        assert all(weight_map[k] == shard.name for k in part)
        seen.update(part)
    assert set(seen) == set(weight_map)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in seen.values())
    for k, t in seen.items():
        assert t.dtype == fx.state_dict[k].dtype and torch.equal(t, fx.state_dict[k]), k
        assert torch.isfinite(t.float()).all()
        want = torch.float32 if k.startswith(("model.visual_model.", "model.text_hidden_fcs.")) else torch.bfloat16
        assert t.dtype == want, k
    assert read_checkpoint_dir(fx.path).keys() == seen.keys()

    H, vocab = ARCH.hidden, fx.config["vocab_size"]
    assert seen["model.embed_tokens.weight"].shape == seen["lm_head.weight"].shape == (vocab, H)
    assert seen["model.mm_projector.weight"].shape == (H, 32) and seen["model.mm_projector.bias"].shape == (H,)
    assert seen["model.text_hidden_fcs.0.0.weight"].shape == (H, H)
    assert seen["model.text_hidden_fcs.0.2.weight"].shape == (64, H) and seen["model.text_hidden_fcs.0.2.bias"].shape == (64,)
    assert seen["model.visual_model.prompt_encoder.no_mask_embed.weight"].shape == (1, 64)
    assert seen["model.norm.weight"].eq(1).all()


@pytest.mark.parametrize("which", ["lisa7", "lisa13"])
def test_lisa_config_and_tokens(request, which, clip_dir):
    from transformers import AutoTokenizer

    fx = request.getfixturevalue(which)
    cfg = json.loads((fx.path / "config.json").read_text())
    assert cfg == fx.config
    expected = {
        "architectures": ["LISAForCausalLM"], "model_type": "llava", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "mm_vision_tower": str(clip_dir), "vision_tower": str(clip_dir), "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False, "use_mm_proj": True, "image_aspect_ratio": "square", "out_dim": 64,
        "train_mask_decoder": True, "use_cache": False, "tune_mm_mlp_adapter": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    assert "seg_token_idx" not in cfg and "mm_projector_type" not in cfg
    added = json.loads((fx.path / "added_tokens.json").read_text())
    if which == "lisa7":
        assert added == {"<im_patch>": 1000, "<im_start>": 1001, "<im_end>": 1002, "[SEG]": 1003}
    else:
        assert added == {"[SEG]": 1000, "<im_start>": 1001, "<im_end>": 1002}
    assert cfg["vocab_size"] == 1000 + len(added)
    tok = AutoTokenizer.from_pretrained(str(fx.path), use_fast=True)
    assert (fx.seg_token_id, fx.im_start_id, fx.im_end_id) == (added["[SEG]"], added["<im_start>"], added["<im_end>"])
    assert tok.convert_tokens_to_ids("[SEG]") == fx.seg_token_id
    assert tok("[SEG]", add_special_tokens=False).input_ids == [fx.seg_token_id]


# --------------------------------------------------------------------------- CLIP and original LLaVA


def test_clip_dirs(tmp_path, clip_dir):
    from safetensors import safe_open
    from transformers import CLIPVisionModel

    base = CLIPVisionModel.from_pretrained(str(clip_dir)).state_dict()
    cfg = json.loads((clip_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (32, 64, 2, 2)
    assert (cfg["image_size"], cfg["patch_size"], cfg["hidden_act"], cfg["projection_dim"]) == (32, 8, "quick_gelu", 32)

    legacy = write_clip_dir(tmp_path / "legacy", seed=0, legacy_keys=True)
    with safe_open(str(legacy / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(k.startswith("vision_model.") for k in names)
    full = write_clip_full_dir(tmp_path / "full", seed=5, vision_dir=clip_dir)
    same_seed = write_clip_full_dir(tmp_path / "full0", seed=0)
    assert json.loads((full / "config.json").read_text())["architectures"] == ["CLIPModel"]
    with safe_open(str(full / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= keys
    assert any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.") for k in keys)
    assert keys <= {"visual_projection.weight", "text_projection.weight", "logit_scale"} | {
        k for k in keys if k.startswith(("vision_model.", "text_model."))
    }
    want = clip_vision_weights(clip_dir)
    for d in (legacy, full, same_seed):
        got = clip_vision_weights(d)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), d
        loaded = CLIPVisionModel.from_pretrained(str(d)).state_dict()
        assert all(torch.equal(loaded[k], base[k]) for k in base), d


@pytest.mark.parametrize(
    "version,tower,fmt", [("v0", True, "bin"), ("v1", False, "safetensors"), ("v1", True, "bin"), ("v1.5", True, "safetensors")]
)
def test_llava_original_dir(tmp_path, clip_dir, version, tower, fmt):
    fx = write_llava_original_dir(tmp_path / "llava", version, seed=2, clip_dir=clip_dir, with_vision_tower=tower, fmt=fmt)
    cfg = json.loads((fx.path / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert cfg["model_type"] == ("llama" if version == "v0" else "llava")
    assert (cfg["mm_vision_tower"], cfg["mm_vision_select_layer"], cfg["mm_hidden_size"]) == (str(clip_dir), -2, 32)
    assert cfg["mm_use_im_start_end"] is (version == "v0")
    added = json.loads((fx.path / "added_tokens.json").read_text())
    assert added == ({"<im_patch>": 1000, "<im_start>": 1001, "<im_end>": 1002} if version == "v0" else {})
    assert cfg["vocab_size"] == 1000 + len(added)
    if version == "v1.5":
        assert (cfg["mm_projector_type"], cfg["image_aspect_ratio"]) == ("mlp2x_gelu", "pad")
        proj = {f"model.mm_projector.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")}
    else:
        assert "mm_projector_type" not in cfg
        proj = {"model.mm_projector.weight", "model.mm_projector.bias"}
    weight_map = json.loads(fx.index_file.read_text())["weight_map"]
    assert all((fx.path / f).is_file() for f in weight_map.values())
    stored = read_checkpoint_dir(fx.path)
    assert set(stored) == set(weight_map) == set(fx.state_dict)
    prefix = "model.vision_tower." if version == "v0" else "model.vision_tower.vision_tower."
    clip = {prefix + k: v for k, v in clip_vision_weights(clip_dir).items()} if tower else {}
    assert set(stored) == llm_keys(ARCH.layers) | proj | set(clip)
    if version != "v0":
        assert not any(k.startswith("model.vision_tower.vision_model.") for k in stored)
    for k, v in clip.items():
        assert torch.equal(stored[k].float(), v.half().float())
    assert {t.dtype for t in stored.values()} == {torch.float16}
    if version == "v1.5":
        assert stored["model.mm_projector.0.weight"].shape == (64, 32) and stored["model.mm_projector.2.weight"].shape == (64, 64)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape", [(40, 60), (61, 37), (32, 32), (100, 45)])
def test_lisa_preprocess_matches_sam_and_clip_processors(shape):
    from segment_anything.utils.transforms import ResizeLongestSide

    img = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    sam_pixels, clip_pixels, input_size = lisa_preprocess(img, 128, 32)
    resized = ResizeLongestSide(128).apply_image(img)
    assert input_size == resized.shape[:2]
    sam = build_tiny_sam()
    want = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
    assert sam_pixels.shape == (1, 3, 128, 128) and torch.allclose(sam_pixels, want, atol=1e-5)
    assert sam_pixels[..., input_size[0] :, :].eq(0).all() and sam_pixels[..., input_size[1] :].eq(0).all()

    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None)  # the PIL one, as transformers 4.31 had
    if cls is None:
        pytest.skip("no PIL CLIPImageProcessor in this transformers")
    proc = cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = proc(images=img, return_tensors="pt")["pixel_values"]
    assert clip_pixels.shape == (1, 3, 32, 32) and torch.allclose(clip_pixels, want, atol=1e-5)


# --------------------------------------------------------------------------- reference forward


def test_seg_position_hand_example():
    # [BOS, 5, <image>, 7, 9, [SEG], 11] with 16 image features: the image fills expanded
    # positions 2..17, so 7 -> 18, 9 -> 19, [SEG] -> 20; LISA reads 19, the token before [SEG]
    assert lisa_seg_positions([1, 5, IMAGE_TOKEN_INDEX, 7, 9, 1000, 11], 1000, 16) == [19]
    # LISA's real size: 256 features, offset 255
    assert lisa_seg_positions([1, IMAGE_TOKEN_INDEX, 4, 1000, 2], 1000, 256) == [2 + 255]
    assert lisa_seg_positions([1, IMAGE_TOKEN_INDEX, 1000, 8, 1000], 1000, 4) == [4, 6]


def test_lisa_prompt_strings():
    head = f"{LISA_SYSTEM} USER: <im_start><image><im_end>\n"
    assert lisa_prompt("the dog", "phrase") == head + " What is the dog in this image? Please output segmentation mask. ASSISTANT: [SEG].</s>"
    assert lisa_prompt("what barks?", "sentence") == head + " what barks? Please output segmentation mask. ASSISTANT: [SEG].</s>"


@pytest.mark.parametrize("which", ["lisa7", "lisa13"])
def test_reference_forward(request, which, clip_dir, image):
    from transformers import AutoTokenizer

    fx = request.getfixturevalue(which)
    sam_pixels, clip_pixels, input_size = lisa_preprocess(image, 128, 32)
    args = (fx, clip_dir, sam_pixels, clip_pixels, input_size, image.shape[:2])
    ref = lisa_reference_forward(*args, "the red box", "phrase")
    assert ref.logits.shape == image.shape[:2] and ref.logits.dtype == torch.float32
    assert torch.isfinite(ref.logits).all() and ref.logits.abs().max() > 0
    again = lisa_reference_logits(*args, "the red box", "phrase")
    assert torch.equal(ref.logits, again)

    # the ids: one BOS, the image placeholder between <im_start> and <im_end>, one [SEG], EOS last
    ids = ref.input_ids
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2
    p = ids.index(IMAGE_TOKEN_INDEX)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[p - 1] == fx.im_start_id and ids[p + 1] == fx.im_end_id
    s = ids.index(fx.seg_token_id)
    assert ids.count(fx.seg_token_id) == 1
    tok = AutoTokenizer.from_pretrained(str(fx.path), use_fast=True)
    pieces = tok.convert_ids_to_tokens(ids[s - 2 : s + 4])
    # transformers 4.31's slow tokenizer strips the space before the added [SEG] (the state LISA
    # reads is ":"'s), then encodes "." alone with SentencePiece's prefix
    assert pieces == ["ISTANT", ":", "[SEG]", "▁", "."] + ["</s>"], pieces
    # ...and the newline and space after <im_end>: the question starts right after it
    assert tok.convert_ids_to_tokens(ids[p + 1 : p + 3]) == ["<im_end>", "▁What"]

    n_feat = ARCH.n_patches
    assert ref.hidden.shape == (len(ids) - 1 + n_feat, ARCH.hidden)
    assert ref.seg_positions == [s - 1 + n_feat - 1]  # the expanded position of the token before [SEG]
    sd = {k: v.float() for k, v in fx.state_dict.items()}
    h = ref.hidden[ref.seg_positions[0]]
    x = torch.relu(h @ sd["model.text_hidden_fcs.0.0.weight"].T + sd["model.text_hidden_fcs.0.0.bias"])
    x = x @ sd["model.text_hidden_fcs.0.2.weight"].T + sd["model.text_hidden_fcs.0.2.bias"]
    assert torch.allclose(ref.seg_embedding[0], x, atol=1e-5)
    assert ref.low_res_masks.shape == (1, 1, 32, 32)


def test_reference_depends_on_the_position_before_seg(lisa13, clip_dir, image):
    sam_pixels, clip_pixels, input_size = lisa_preprocess(image, 128, 32)
    args = (lisa13, clip_dir, sam_pixels, clip_pixels, input_size, image.shape[:2])
    a = lisa_reference_forward(*args, "what is the red cat", "sentence")
    b = lisa_reference_forward(*args, "what is the red dog", "sentence")  # one word differs, late in the question
    assert len(a.input_ids) == len(b.input_ids)
    first = next(i for i, (x, y) in enumerate(zip(a.input_ids, b.input_ids)) if x != y)
    assert first > a.input_ids.index(IMAGE_TOKEN_INDEX)
    at = first - 1 + ARCH.n_patches  # expanded index of the changed token
    # causal: every hidden state before the changed token is identical, the ones from it on differ
    assert torch.allclose(a.hidden[:at], b.hidden[:at], atol=1e-6)
    assert not torch.allclose(a.hidden[at], b.hidden[at], atol=1e-3)
    pos = a.seg_positions[0]
    assert pos == b.seg_positions[0] > at
    assert (a.seg_embedding - b.seg_embedding).abs().max() > 1e-3
    assert (a.logits - b.logits).abs().max() > 1e-5
    # the reference reads exactly hidden[pos], not [SEG]'s own state nor the one before
    assert not torch.allclose(a.hidden[pos], a.hidden[pos + 1]) and not torch.allclose(a.hidden[pos], a.hidden[pos - 1])
    c = lisa_reference_forward(*args, "what is the red cat", "phrase")
    assert "What is what is the red cat in this image?" in c.prompt and not torch.equal(c.logits, a.logits)


def test_sp_tokenizer_legacy_flag(tmp_path):
    """``legacy`` is honoured: the legacy tokenizer puts a dummy-prefix "▁" after an added token."""
    from transformers import AutoTokenizer

    text = "<im_end>\n What ASSISTANT: [SEG].</s>"
    pieces = {}
    for legacy in (True, False):
        write_sp_tokenizer(tmp_path / str(legacy), ["[SEG]", "<im_start>", "<im_end>"], legacy=legacy)
        tok = AutoTokenizer.from_pretrained(str(tmp_path / str(legacy)), use_fast=True)
        pieces[legacy] = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert pieces[True][:4] == ["<s>", "<im_end>", "▁", "<0x0A>"] and pieces[True][-4:] == ["[SEG]", "▁", ".", "</s>"]
    assert pieces[False][:3] == ["<s>", "<im_end>", "<0x0A>"] and pieces[False][-3:] == ["[SEG]", ".", "</s>"]

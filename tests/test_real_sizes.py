"""Real-size architectures (SAM ViT-H + LLaVA-1.5-7B/13B) built on the meta device: parameter
counts against the published models, and the official checkpoints' key names."""

from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry

from cores_cli.config import llava_15_7b, llava_15_13b, sam_vit_b, sam_vit_h, sam_vit_l
from cores_cli.model.builder import build_on_meta
from cores_cli.model.sam import build_sam

# Published sizes: SAM ViT-H 641,090,608; llava-1.5-7b-hf 7,063,427,072 (Llama-2-7B with the
# vocabulary padded to 32064, CLIP ViT-L/14-336, a 2-layer GELU projector).
SAM_VIT_H = 641_090_608
LLAVA_7B = 7_063_427_072
LLAVA_13B = 13_351_494_656


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,ours", [("vit_h", sam_vit_h), ("vit_l", sam_vit_l), ("vit_b", sam_vit_b)])
def test_our_sam_sizes_match_the_official_registry(name, ours):
    with torch.device("meta"):
        official = sam_model_registry[name]()
        mine = build_sam(ours())
    a, b = official.state_dict(), mine.state_dict()
    assert list(a) == list(b)  # the key names of sam_vit_*.pth
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.fixture(scope="module")
def cores_7b():
    return build_on_meta(llava_15_7b())


def test_vit_h_and_llava_7b_parameter_counts(cores_7b):
    m = cores_7b
    assert all(p.device.type == "meta" for p in m.parameters())
    assert _count(m.sam) == SAM_VIT_H
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in m.parameter_groups().items()}
    llava_base = sum(groups[g] for g in ("vision_tower", "mm_projector", "llm"))
    assert llava_base == LLAVA_7B
    hidden, prompt = 4096, 256
    assert groups["lora"] == 32 * 2 * (hidden * 8 + 8 * hidden)  # r=8 on q_proj, v_proj of 32 layers
    assert groups["projector"] == (hidden * hidden + hidden) + (hidden * prompt + prompt)
    assert groups["chain_token_rows"] == 3 * hidden * 2
    assert groups["refiner"] == 2 * 2 * prompt + 2 * prompt + (3 * prompt * prompt + 3 * prompt) + (prompt * prompt + prompt)
    assert groups["vision_tower"] == 303_507_456


def test_llava_7b_keys_and_trainable_set(cores_7b):
    names = [n for n, _ in cores_7b.named_parameters()]
    lora = [n for n in names if "lora_" in n]
    assert len(lora) == 32 * 2 * 2
    assert all(".language_model." in n and (".q_proj." in n or ".v_proj." in n) for n in lora)
    assert not any(".vision_tower." in n for n in lora)  # CLIP has q_proj/v_proj too: untouched
    trainable = {n for n, p in cores_7b.named_parameters() if p.requires_grad}
    assert all(n.startswith(("sam.mask_decoder.", "projector.", "refiner.", "token_rows.")) or "lora_" in n for n in trainable)
    assert cores_7b.num_image_tokens == 576
    assert cores_7b.clip_size == 336


def test_llava_13b_parameter_count():
    m = build_on_meta(llava_15_13b())
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in m.parameter_groups().items()}
    assert sum(groups[g] for g in ("vision_tower", "mm_projector", "llm")) == LLAVA_13B
    assert m.llava.config.text_config.hidden_size == 5120

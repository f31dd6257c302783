"""Tiny checkpoints in third-party source formats, and a LISA reference forward (tests only).

What is written here mirrors how the upstream projects lay their checkpoints out, at a tiny
size, with the real key names and config fields:

- :func:`write_sp_tokenizer`: a slow Llama tokenizer directory (``tokenizer.model`` +
  ``tokenizer_config.json`` + ``special_tokens_map.json`` + ``added_tokens.json``), as LISA and
  the original LLaVA ship it (no ``tokenizer.json``);
- :func:`write_clip_dir` / :func:`write_clip_full_dir`: HF ``CLIPVisionModel`` / ``CLIPModel``;
- :func:`write_lisa_dir`: the merged directory LISA's ``merge_lora_weights_and_save_hf_model.py``
  writes (LLM + linear ``mm_projector`` + SAM under ``model.visual_model.`` + ``text_hidden_fcs``,
  no CLIP keys);
- :func:`write_llava_original_dir`: liuhaotian's LLaVA v0 / v1 / v1.5 layouts;
- :func:`lisa_reference_forward` / :func:`lisa_reference_logits`: LISA's teacher-forced
  ``model_forward(inference=True)`` in fp32, written from its definition (not from cores), and
  :func:`lisa_preprocess` (LISA's SAM and CLIP image preprocessing).

Everything is seeded and offline. Written for tests: ``from source_formats import ...``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------- constants

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the image in input_ids (never a vocab id)
IMAGE_TOKEN = "<image>"
LISA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LISA_7B_ADDED = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")  # xinlai/LISA-7B-v1 added_tokens.json order
LISA_13B_ADDED = ("[SEG]", "<im_start>", "<im_end>")  # xinlai/LISA-13B-llama2-v1 order
LLAVA_V0_ADDED = ("<im_patch>", "<im_start>", "<im_end>")
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyArch:
    """The tiny sizes of every part, in one place."""

    # LLM (Llama)
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    base_vocab: int = 1000  # the SentencePiece model's size; added tokens come after it
    # CLIP vision
    clip_hidden: int = 32
    clip_intermediate: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    clip_image_size: int = 32
    clip_patch: int = 8
    clip_act: str = "quick_gelu"
    clip_projection_dim: int = 32
    # LISA text_hidden_fcs output (= SAM prompt_embed_dim)
    out_dim: int = 64

    @property
    def n_patches(self) -> int:
        return (self.clip_image_size // self.clip_patch) ** 2

    @property
    def sam(self):
        """Exactly the cores tiny preset's SAM config."""
        from cores_cli.config import tiny

        return tiny().sam


ARCH = TinyArch()


def build_tiny_sam():
    """segment_anything's ``Sam`` at the tiny preset's size (official state-dict key names)."""
    from cores_cli.model.sam import build_sam

    return build_sam(ARCH.sam)


# --------------------------------------------------------------------------- tokenizer


def _corpus_lines() -> list[str]:
    text = (resources.files("cores_cli") / "assets" / "tiny_tokenizer_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _train_sp_model(vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    # Llama's tokenizer.model settings: BPE, byte fallback, identity normalisation (keeps "\n"),
    # dummy prefix, no whitespace collapsing, digits split; unk 0, <s> 1, </s> 2, no pad.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


_SP_CACHE: dict[int, bytes] = {}


def _added_token_dict(content: str) -> dict:
    # transformers 4.31's serialisation of an AddedToken in special_tokens_map.json
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_sp_tokenizer(dest: Path, added: list[str], *, vocab_size: int = 1000, legacy: bool = True) -> None:
    """A slow-Llama tokenizer directory as LISA / LLaVA ship it; ``added[i]`` gets id ``vocab_size + i``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if vocab_size not in _SP_CACHE:
        _SP_CACHE[vocab_size] = _train_sp_model(vocab_size)
    (dest / "tokenizer.model").write_bytes(_SP_CACHE[vocab_size])
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_added_token_dict("<s>")},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_added_token_dict("</s>")},
        "legacy": legacy,
        "model_max_length": 512,
        "pad_token": "<unk>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token_dict("<unk>")},
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {
        "bos_token": _added_token_dict("<s>"),
        "eos_token": _added_token_dict("</s>"),
        "pad_token": "<unk>",
        "unk_token": _added_token_dict("<unk>"),
    }
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    if len(set(added)) != len(added):
        raise ValueError(f"duplicate added tokens: {added}")
    (dest / "added_tokens.json").write_text(json.dumps({t: vocab_size + i for i, t in enumerate(added)}) + "\n")


# --------------------------------------------------------------------------- CLIP


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=ARCH.clip_hidden,
        intermediate_size=ARCH.clip_intermediate,
        num_hidden_layers=ARCH.clip_layers,
        num_attention_heads=ARCH.clip_heads,
        image_size=ARCH.clip_image_size,
        patch_size=ARCH.clip_patch,
        hidden_act=ARCH.clip_act,
        projection_dim=ARCH.clip_projection_dim,
    )


def _clip_vision_model(seed: int):
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(_clip_vision_config()).eval()


def clip_vision_weights(clip_dir: Path) -> dict[str, torch.Tensor]:
    """The vision weights of a CLIP directory (CLIPVisionModel or CLIPModel), named as
    transformers 4.x names them (``vision_model.*``) whatever version wrote the file."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(clip_dir) / "model.safetensors"))
    if any(k.startswith("text_model.") for k in sd):  # a full CLIPModel
        return {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    return {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v for k, v in sd.items()}


def write_clip_dir(dest: Path, seed: int, *, legacy_keys: bool = False) -> Path:
    """An HF ``CLIPVisionModel`` directory (config.json + model.safetensors) of the tiny CLIP.

    transformers 5 saves the vision model's keys without a prefix (``embeddings.*``,
    ``encoder.*``); ``legacy_keys=True`` rewrites them as transformers 4.x saved them
    (``vision_model.*``). ``CLIPVisionModel.from_pretrained`` loads both.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    model = _clip_vision_model(seed)
    model.save_pretrained(dest)
    if legacy_keys:
        sd = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def write_clip_full_dir(dest: Path, seed: int, *, vision_dir: Path | None = None) -> Path:
    """An HF ``CLIPModel`` (vision + tiny text tower) stored like openai/clip-vit-large-patch14:
    ``vision_model.*``, ``text_model.*``, ``visual_projection.weight``, ``text_projection.weight``,
    ``logit_scale``. Its vision part equals ``vision_dir``'s weights, or, without one, the
    weights :func:`write_clip_dir` writes for the same ``seed``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    dest = Path(dest)
    vision = clip_vision_weights(vision_dir) if vision_dir is not None else {
        f"vision_model.{k}": v for k, v in _clip_vision_model(seed).state_dict().items()
    }
    text_cfg = CLIPTextConfig(
        hidden_size=ARCH.clip_hidden,
        intermediate_size=ARCH.clip_intermediate,
        num_hidden_layers=ARCH.clip_layers,
        num_attention_heads=ARCH.clip_heads,
        vocab_size=ARCH.base_vocab,
        max_position_embeddings=77,
        hidden_act=ARCH.clip_act,
        projection_dim=ARCH.clip_projection_dim,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = CLIPConfig(
        text_config=text_cfg.to_dict(),
        vision_config=_clip_vision_config().to_dict(),
        projection_dim=ARCH.clip_projection_dim,
    )
    torch.manual_seed(seed + 1)
    model = CLIPModel(config).eval()
    sd = model.state_dict()
    missing = [k for k in sd if k.startswith("vision_model.") and k not in vision]
    if missing or len(vision) != sum(k.startswith("vision_model.") for k in sd):
        raise ValueError(f"vision weights do not fit a CLIPModel's vision tower (missing e.g. {missing[:3]})")
    model.load_state_dict({**sd, **vision})
    model.save_pretrained(dest)
    return dest


# --------------------------------------------------------------------------- shards


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_sharded(dest: Path, state: dict[str, torch.Tensor], *, shards: int, fmt: str) -> tuple[list[Path], Path]:
    """HF's sharded layout: ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``
    (``torch.save`` of plain tensor dicts) or ``model-0000i-of-0000n.safetensors`` +
    ``model.safetensors.index.json``; keys in state-dict order, split by size."""
    from safetensors.torch import save_file

    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', not {fmt!r}")
    keys = list(state)
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be within 1..{len(keys)}")
    total = sum(_tensor_bytes(state[k]) for k in keys)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for i, k in enumerate(keys):
        g = min(shards - 1, done * shards // max(total, 1))
        g = max(g, shards - (len(keys) - i))  # leave at least one key for every later shard
        g = max(g, max((j for j, grp in enumerate(groups) if grp), default=0))  # never go back
        groups[g].append(k)
        done += _tensor_bytes(state[k])
    groups = [g for g in groups if g]
    n = len(groups)
    stem, suffix = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    files, weight_map = [], {}
    for i, grp in enumerate(groups, start=1):
        name = f"{stem}-{i:05d}-of-{n:05d}.{suffix}"
        part = {k: state[k].detach().clone().contiguous() for k in grp}
        if fmt == "bin":
            torch.save(part, dest / name)
        else:
            save_file(part, str(dest / name), metadata={"format": "pt"})
        files.append(dest / name)
        weight_map.update({k: name for k in grp})
    index = dest / f"{stem}.{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files, index


def read_checkpoint_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded (or single-file) HF checkpoint directory, as stored."""
    from safetensors.torch import load_file

    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        part = load_file(str(f)) if name.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True)
        out.update(part)
    return out


# --------------------------------------------------------------------------- LLM weights


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


def _llama_state(gen: torch.Generator, vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaMA weights, N(0, 0.02) with unit norms, in state-dict order of LlamaForCausalLM's
    ``model.*`` part (``lm_head.weight`` is returned separately by the callers' order)."""
    H, I = ARCH.hidden, ARCH.intermediate
    kv = ARCH.kv_heads * (H // ARCH.heads)

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    sd = {"model.embed_tokens.weight": normal(vocab, H)}
    for i in range(ARCH.layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = normal(H, H)
        sd[p + "self_attn.k_proj.weight"] = normal(kv, H)
        sd[p + "self_attn.v_proj.weight"] = normal(kv, H)
        sd[p + "self_attn.o_proj.weight"] = normal(H, H)
        sd[p + "mlp.gate_proj.weight"] = normal(I, H)
        sd[p + "mlp.up_proj.weight"] = normal(I, H)
        sd[p + "mlp.down_proj.weight"] = normal(H, I)
        sd[p + "input_layernorm.weight"] = torch.ones(H, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=dtype)
    sd["model.norm.weight"] = torch.ones(H, dtype=dtype)
    return sd


def _sam_state(seed: int) -> dict[str, torch.Tensor]:
    """The tiny SAM's weights (PyTorch default init, seeded), with the zero-initialised
    positional tensors (pos_embed, rel_pos_*) made non-zero so they matter."""
    torch.manual_seed(seed)
    sam = build_tiny_sam()
    gen = torch.Generator().manual_seed(seed + 7)
    sd = {}
    for k, v in sam.state_dict().items():
        v = v.detach().clone().float()
        if k.endswith("pos_embed") or ".rel_pos_" in k:
            v = torch.randn(v.shape, generator=gen) * 0.02
        sd[k] = v
    return sd


def _fcs_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed + 3)
    H = ARCH.hidden
    fcs = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, ARCH.out_dim), nn.Dropout(0.0))
    return {f"model.text_hidden_fcs.0.{k}": v.detach().clone().float() for k, v in fcs.state_dict().items()}


def _llama_config_fields(vocab: int) -> dict:
    # transformers 4.31 LlamaConfig fields, as they appear in LISA / LLaVA configs
    return {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": ARCH.hidden,
        "initializer_range": 0.02,
        "intermediate_size": ARCH.intermediate,
        "max_position_embeddings": ARCH.max_position_embeddings,
        "num_attention_heads": ARCH.heads,
        "num_hidden_layers": ARCH.layers,
        "num_key_value_heads": ARCH.kv_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": ARCH.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
    }


# --------------------------------------------------------------------------- LISA


@dataclass
class LisaFixture:
    path: Path
    clip_dir: Path
    config: dict
    state_dict: dict[str, torch.Tensor]  # exactly what the shards hold (LLM bf16, SAM + fcs fp32)
    added_tokens: dict[str, int]
    seg_token_id: int
    im_start_id: int
    im_end_id: int
    shard_files: list[Path]
    index_file: Path
    fmt: str


def write_lisa_dir(
    dest: Path,
    clip_dir: Path,
    seed: int,
    *,
    shards: int = 2,
    fmt: Literal["bin", "safetensors"] = "bin",
    seg_first: bool = True,
) -> LisaFixture:
    """The merged HF directory LISA's ``merge_lora_weights_and_save_hf_model.py`` writes, tiny.

    ``seg_first=True``: LISA-13B-llama2-v1's added tokens (``[SEG]`` first); ``False``: LISA-7B-v1's
    (``<im_patch> <im_start> <im_end> [SEG]``). No CLIP keys (LISA strips every ``vision_tower`` key).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    added = list(LISA_13B_ADDED if seg_first else LISA_7B_ADDED)
    write_sp_tokenizer(dest, added, vocab_size=ARCH.base_vocab)
    added_ids = {t: ARCH.base_vocab + i for i, t in enumerate(added)}
    vocab = ARCH.base_vocab + len(added)

    gen = torch.Generator().manual_seed(seed)
    H = ARCH.hidden
    # state-dict order of LISAForCausalLM: LlamaModel, mm_projector, visual_model, fcs, lm_head
    state = _llama_state(gen, vocab, torch.bfloat16)
    state["model.mm_projector.weight"] = _bf16(torch.randn(H, ARCH.clip_hidden, generator=gen) * 0.02)
    state["model.mm_projector.bias"] = _bf16(torch.randn(H, generator=gen) * 0.02)
    state.update({f"model.visual_model.{k}": v for k, v in _sam_state(seed).items()})
    state.update(_fcs_state(seed))
    state["lm_head.weight"] = _bf16(torch.randn(vocab, H, generator=gen) * 0.02)

    config = {
        "_name_or_path": "./LLaVA/LLaVA-Lightning-7B-v1-1",
        "architectures": ["LISAForCausalLM"],
        **_llama_config_fields(vocab),
        "freeze_mm_mlp_adapter": True,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "mm_hidden_size": ARCH.clip_hidden,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip_dir),
        "model_type": "llava",
        "out_dim": ARCH.out_dim,
        "pretrain_mm_mlp_adapter": None,
        "torch_dtype": "bfloat16",
        "train_mask_decoder": True,
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower": str(clip_dir),
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen_cfg = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"}
    (dest / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    files, index = write_sharded(dest, state, shards=shards, fmt=fmt)
    return LisaFixture(
        path=dest,
        clip_dir=Path(clip_dir),
        config=config,
        state_dict=state,
        added_tokens=added_ids,
        seg_token_id=added_ids["[SEG]"],
        im_start_id=added_ids["<im_start>"],
        im_end_id=added_ids["<im_end>"],
        shard_files=files,
        index_file=index,
        fmt=fmt,
    )


# --------------------------------------------------------------------------- original LLaVA


@dataclass
class LlavaFixture:
    path: Path
    version: str
    config: dict
    state_dict: dict[str, torch.Tensor]  # exactly what the shards hold (fp16)
    added_tokens: dict[str, int]
    shard_files: list[Path]
    index_file: Path
    fmt: str


HUB_CLIP = {"v0": "openai/clip-vit-large-patch14", "v1": "openai/clip-vit-large-patch14", "v1.5": "openai/clip-vit-large-patch14-336"}


def write_llava_original_dir(
    dest: Path,
    version: Literal["v0", "v1", "v1.5"],
    seed: int,
    clip_dir: Path | None = None,
    with_vision_tower: bool = False,
    *,
    shards: int = 2,
    fmt: Literal["bin", "safetensors"] = "bin",
    added_tokens: list[str] | None = None,
) -> LlavaFixture:
    """A liuhaotian LLaVA checkpoint directory (tiny), fp16.

    - ``v0``: ``model_type "llama"``, linear ``model.mm_projector``, ``mm_use_im_start_end`` true,
      ``<im_patch> <im_start> <im_end>`` added; vision tower keys (if asked) ``model.vision_tower.vision_model.*``.
    - ``v1`` (Lightning / llava-llama-2 era): ``model_type "llava"``, linear projector, no start/end,
      no added tokens (as llava-llama-2-13b-chat-lightning-preview; pass ``added_tokens`` for others).
    - ``v1.5``: ``mlp2x_gelu`` projector ``model.mm_projector.{0,2}.*``, ``image_aspect_ratio "pad"``.
    v1/v1.5 vision tower keys: ``model.vision_tower.vision_tower.vision_model.*`` (self-trained
    DeepSpeed checkpoints; the released ones have none). ``mm_vision_tower`` is ``clip_dir``, or
    the official hub id without one (then ``with_vision_tower`` is impossible).
    """
    if version not in ("v0", "v1", "v1.5"):
        raise ValueError(f"version must be v0, v1 or v1.5, not {version!r}")
    if with_vision_tower and clip_dir is None:
        raise ValueError("with_vision_tower needs clip_dir (the weights to store)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    added = list(added_tokens) if added_tokens is not None else (list(LLAVA_V0_ADDED) if version == "v0" else [])
    write_sp_tokenizer(dest, added, vocab_size=ARCH.base_vocab)
    added_ids = {t: ARCH.base_vocab + i for i, t in enumerate(added)}
    vocab = ARCH.base_vocab + len(added)

    gen = torch.Generator().manual_seed(seed)
    H, C = ARCH.hidden, ARCH.clip_hidden
    half = torch.float16
    state = _llama_state(gen, vocab, half)
    if version == "v1.5":
        state["model.mm_projector.0.weight"] = (torch.randn(H, C, generator=gen) * 0.02).to(half)
        state["model.mm_projector.0.bias"] = (torch.randn(H, generator=gen) * 0.02).to(half)
        state["model.mm_projector.2.weight"] = (torch.randn(H, H, generator=gen) * 0.02).to(half)
        state["model.mm_projector.2.bias"] = (torch.randn(H, generator=gen) * 0.02).to(half)
    else:
        state["model.mm_projector.weight"] = (torch.randn(H, C, generator=gen) * 0.02).to(half)
        state["model.mm_projector.bias"] = (torch.randn(H, generator=gen) * 0.02).to(half)
    if with_vision_tower:
        prefix = "model.vision_tower." if version == "v0" else "model.vision_tower.vision_tower."
        state.update({prefix + k: v.to(half) for k, v in clip_vision_weights(clip_dir).items()})
    state["lm_head.weight"] = (torch.randn(vocab, H, generator=gen) * 0.02).to(half)

    tower = str(clip_dir) if clip_dir is not None else HUB_CLIP[version]
    config = {
        "_name_or_path": {"v0": "LLaVA-7b-v0", "v1": "llava-llama-2-7b-chat-lightning", "v1.5": "llava-v1.5-7b"}[version],
        "architectures": ["LlavaLlamaForCausalLM"],
        **_llama_config_fields(vocab),
        "mm_hidden_size": C,
        "mm_use_im_start_end": version == "v0",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": tower,
        "model_type": "llama" if version == "v0" else "llava",
        "torch_dtype": "float16",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
    }
    if version == "v0":
        config.update({"sep_image_conv_front": False, "transformers_version": "4.28.0.dev0"})
    else:
        config.update(
            {
                "freeze_mm_mlp_adapter": False,
                "image_aspect_ratio": "pad" if version == "v1.5" else "square",
                "mm_use_im_patch_token": False,
                "mm_vision_select_feature": "patch",
                "transformers_version": "4.31.0",
            }
        )
    if version == "v1.5":
        config.update({"mm_projector_type": "mlp2x_gelu", "image_grid_pinpoints": None})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files, index = write_sharded(dest, state, shards=shards, fmt=fmt)
    return LlavaFixture(dest, version, config, state, added_ids, files, index, fmt)


# --------------------------------------------------------------------------- LISA preprocessing


def lisa_preprocess(image: np.ndarray, sam_size: int, clip_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """LISA's two image inputs from an RGB uint8 HWC image: ``(sam_pixels [1,3,S,S],
    clip_pixels [1,3,C,C], input_size (h, w) of the resized image inside the SAM square)``.

    SAM: longest side to ``sam_size`` (new side ``int(old * scale + 0.5)``), PIL bilinear,
    ``(x - mean) / std`` on 0..255, zero pad bottom/right. CLIP (CLIPImageProcessor of
    openai/clip-vit-large-patch14): shortest side to ``clip_size`` (long side truncated),
    PIL bicubic, centre crop, /255, CLIP mean/std.
    """
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be uint8 HWC RGB")
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    # SAM (ResizeLongestSide.apply_image, then Sam.preprocess)
    scale = sam_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
    x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    sam_pixels = F.pad(x, (0, sam_size - nw, 0, sam_size - nh)).unsqueeze(0)
    # CLIP
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(clip_size * long / short)
    ch, cw = (clip_size, new_long) if h <= w else (new_long, clip_size)
    c = np.asarray(pil.resize((cw, ch), Image.BICUBIC))
    top, left = (ch - clip_size) // 2, (cw - clip_size) // 2
    c = c[top : top + clip_size, left : left + clip_size]
    y = torch.from_numpy(c.copy()).permute(2, 0, 1).float() / 255.0
    y = (y - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    return sam_pixels, y.unsqueeze(0), (nh, nw)


# --------------------------------------------------------------------------- LISA reference forward


def lisa_question(text: str, style: Literal["sentence", "phrase"]) -> str:
    """LISA's validation question (ValDataset), ``<image>\\n`` prefix included."""
    if style == "sentence":
        return f"{IMAGE_TOKEN}\n {text} Please output segmentation mask."
    if style == "phrase":
        return f"{IMAGE_TOKEN}\n What is {text} in this image? Please output segmentation mask."
    raise ValueError(f"style must be 'sentence' or 'phrase', not {style!r}")


def lisa_prompt(text: str, style: Literal["sentence", "phrase"], *, use_im_start_end: bool = True, answer: str = "[SEG].") -> str:
    """The llava_v1 (SeparatorStyle.TWO) teacher-forced prompt of LISA's validation:
    ``{system} USER: {question} ASSISTANT: {answer}</s>``, then ``<image>`` wrapped in
    ``<im_start>``/``<im_end>`` (collate_fn)."""
    prompt = f"{LISA_SYSTEM} USER: {lisa_question(text, style)} ASSISTANT: {answer}</s>"
    if use_im_start_end:
        prompt = prompt.replace(IMAGE_TOKEN, f"<im_start>{IMAGE_TOKEN}<im_end>")
    return prompt


def slow_llama_ids(tok_dir: Path, text: str) -> list[int]:
    """transformers 4.31's slow ``LlamaTokenizer`` (legacy), which LISA runs (``use_fast=False``),
    written from its ``tokenize``: the text is split at the added tokens (``added_tokens.json``)
    and the special tokens; the added tokens were added as plain strings, so the whitespace on both
    sides of each is stripped (the specials, AddedTokens without lstrip/rstrip, strip nothing);
    every remaining piece goes to SentencePiece on its own (its dummy prefix included); BOS first.
    Uses SentencePiece directly, not transformers' conversion, so it checks that conversion too."""
    import re

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tok_dir) / "tokenizer.model"))
    added = json.loads((Path(tok_dir) / "added_tokens.json").read_text())
    specials = {t: sp.piece_to_id(t) for t in ("<s>", "</s>", "<unk>")}
    vocab = {**specials, **added}
    pieces = re.split("(" + "|".join(re.escape(t) for t in sorted(vocab, key=len, reverse=True)) + ")", text)
    for i, piece in enumerate(pieces):
        if i % 2 == 1 and piece in added:  # odd indexes are the matched tokens
            pieces[i - 1] = pieces[i - 1].rstrip()
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
    ids = [specials["<s>"]]
    for i, piece in enumerate(pieces):
        if i % 2 == 1:
            ids.append(vocab[piece])
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def lisa_tokenize(tok_dir: Path, prompt: str) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` over LISA's tokenizer: the prompt split at ``<image>``,
    each chunk tokenized on its own (:func:`slow_llama_ids`, each with a BOS), the first chunk's
    BOS kept only, IMAGE_TOKEN_INDEX between chunks."""
    chunks = [slow_llama_ids(tok_dir, chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:])
    return ids


def lisa_seg_positions(input_ids: list[int], seg_token_id: int, n_image_features: int) -> list[int]:
    """Indices, in the image-expanded sequence, whose final hidden state LISA feeds to
    text_hidden_fcs: its ``seg_token_mask`` (``ids[1:] == seg``, a zero appended, then
    ``n_image_features - 1`` zeros prepended: 255 for CLIP-L/14-224). That is the token before
    each [SEG] (the position predicting it), if the image precedes every [SEG]."""
    ids = torch.tensor(input_ids)
    mask = torch.cat([ids[1:] == seg_token_id, torch.zeros(1, dtype=torch.bool)])
    mask = torch.cat([torch.zeros(n_image_features - 1, dtype=torch.bool), mask])
    return mask.nonzero().flatten().tolist()


@dataclass
class LisaReference:
    logits: torch.Tensor  # (H, W) fp32 mask logits at original_size
    input_ids: list[int]  # with IMAGE_TOKEN_INDEX at the image
    prompt: str
    seg_positions: list[int]  # indices into the expanded sequence read for [SEG]
    hidden: torch.Tensor = field(repr=False)  # [L + P - 1, H] final post-norm hidden states
    seg_embedding: torch.Tensor = field(repr=False)  # [n_seg, out_dim] text_hidden_fcs output
    low_res_masks: torch.Tensor = field(repr=False)  # [n_seg, 1, h, w]


_REF_CACHE: dict = {}


def _load_lisa_modules(lisa_dir: Path, clip_dir: Path):
    """(config, LlamaModel, projector, CLIPVisionModel, fcs, Sam), fp32, eval."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaModel

    cfg = json.loads((lisa_dir / "config.json").read_text())
    state = {k: v.float() for k, v in read_checkpoint_dir(lisa_dir).items()}
    llama_cfg = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        rms_norm_eps=cfg["rms_norm_eps"],
        max_position_embeddings=cfg["max_position_embeddings"],
        hidden_act=cfg.get("hidden_act", "silu"),
        pad_token_id=cfg.get("pad_token_id", 0),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=False,
        use_cache=False,
    )
    llama_cfg._attn_implementation = "eager"
    llm = LlamaModel(llama_cfg).eval()
    llm.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm."))})
    H = cfg["hidden_size"]
    projector = nn.Linear(cfg["mm_hidden_size"], H).eval()
    projector.load_state_dict({"weight": state["model.mm_projector.weight"], "bias": state["model.mm_projector.bias"]})
    out_dim = state["model.text_hidden_fcs.0.2.weight"].shape[0]
    fcs = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, out_dim), nn.Dropout(0.0)).eval()
    fcs.load_state_dict({k[len("model.text_hidden_fcs.0.") :]: v for k, v in state.items() if k.startswith("model.text_hidden_fcs.0.")})
    sam = build_tiny_sam().eval()
    sam.load_state_dict({k[len("model.visual_model.") :]: v for k, v in state.items() if k.startswith("model.visual_model.")})
    clip = CLIPVisionModel.from_pretrained(str(clip_dir)).float().eval()
    return cfg, llm, projector, clip, fcs, sam


@torch.no_grad()
def lisa_reference_forward(
    fixture_or_dir: LisaFixture | Path | str,
    clip_dir: Path | str,
    sam_pixels: torch.Tensor,
    clip_pixels: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    question: str,
    style: Literal["sentence", "phrase"],
) -> LisaReference:
    """LISA's teacher-forced ``model_forward(inference=True)`` for one image and one question
    (answer ``[SEG].``), fp32, from the LISA definition (see module doc). ``question`` is the
    object text (sentence or phrase), not the full prompt."""
    lisa_dir = Path(fixture_or_dir.path if isinstance(fixture_or_dir, LisaFixture) else fixture_or_dir)
    stamps = tuple(f.stat().st_mtime_ns for f in sorted(lisa_dir.glob("*.index.json")))
    key = (str(lisa_dir.resolve()), str(Path(clip_dir).resolve()), stamps)
    if key not in _REF_CACHE:
        _REF_CACHE.clear()
        _REF_CACHE[key] = _load_lisa_modules(lisa_dir, Path(clip_dir))
    cfg, llm, projector, clip, fcs, sam = _REF_CACHE[key]

    prompt = lisa_prompt(question, style, use_im_start_end=cfg.get("mm_use_im_start_end", True))
    ids = lisa_tokenize(lisa_dir, prompt)
    seg_id = json.loads((lisa_dir / "added_tokens.json").read_text())["[SEG]"]
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise ValueError("the reference handles exactly one image")

    # CLIP: hidden_states[select_layer], CLS dropped; linear projector
    out = clip(pixel_values=clip_pixels.float(), output_hidden_states=True)
    feats = out.hidden_states[cfg.get("mm_vision_select_layer", -2)][:, 1:]
    image_embeds = projector(feats)[0]  # [P, H]
    n_feat = image_embeds.shape[0]

    # splice: the placeholder is replaced by the P image features (sequence grows by P - 1)
    p = ids.index(IMAGE_TOKEN_INDEX)
    embed = llm.get_input_embeddings()
    before = embed(torch.tensor(ids[:p]))
    after = embed(torch.tensor(ids[p + 1 :]))
    inputs_embeds = torch.cat([before, image_embeds, after]).unsqueeze(0)
    attn = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
    hidden = llm(inputs_embeds=inputs_embeds, attention_mask=attn, use_cache=False).last_hidden_state[0]  # post-norm

    positions = lisa_seg_positions(ids, seg_id, n_feat)
    if len(positions) != 1:
        raise ValueError(f"expected one [SEG] in the prompt, found {len(positions)}")
    seg_embedding = fcs(hidden[positions])  # [1, out]

    image_embeddings = sam.image_encoder(sam_pixels.float())
    pe = sam.prompt_encoder
    h, w = pe.image_embedding_size
    sparse = seg_embedding.unsqueeze(1)  # [1, 1, out] (LISA's text_embeds, no points/boxes)
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, h, w)
    low_res, _ = sam.mask_decoder(
        image_embeddings=image_embeddings[0:1],
        image_pe=pe.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    S = sam.image_encoder.img_size
    m = F.interpolate(low_res.float(), (S, S), mode="bilinear", align_corners=False)
    m = m[..., : input_size[0], : input_size[1]]
    m = F.interpolate(m, tuple(original_size), mode="bilinear", align_corners=False)
    return LisaReference(
        logits=m[0, 0].float(),
        input_ids=ids,
        prompt=prompt,
        seg_positions=positions,
        hidden=hidden,
        seg_embedding=seg_embedding,
        low_res_masks=low_res,
    )


def lisa_reference_logits(*args, **kwargs) -> torch.Tensor:
    """The (H, W) fp32 mask logits of :func:`lisa_reference_forward` (same arguments)."""
    return lisa_reference_forward(*args, **kwargs).logits

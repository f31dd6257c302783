"""Model configuration: typed dataclasses, one per model part, and named presets.

A checkpoint's ``config.json`` is a :class:`ModelConfig`. Presets:

- ``tiny``: a 2-layer Llama with a locally built tokenizer, a tiny CLIP tower and a tiny SAM,
  all randomly initialised and constructible offline in seconds (tests, smoke runs, the CPU
  recipes).
- ``llava-1.5-7b`` / ``llava-1.5-13b``: an HF-format LLaVA-1.5 directory and an official SAM
  ``sam_vit_h_4b8939.pth``, both given by path (``--set mllm.path=... --set sam.checkpoint=...``).
  The architecture numbers are kept so the models can be built on the ``meta`` device.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .configio import FieldError, apply_overrides, dump_text, from_dict, read_mapping, to_dict
from .errors import ConfigError

CHAIN_TOKENS: tuple[str, ...] = ("[LOC]", "[POS]", "[SEG]")
"""Special tokens that carry the chain, outermost level first. ``[SEG]`` always ends a chain."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
"""SAM normalises 0-255 pixels (CLIP normalises 0-1 pixels): the values of the official checkpoints."""

MAX_IN_CONTEXT_K = 16
"""Upper bound of ``prompt.in_context_k``. An exemplar is 35-100 tokens (60 on average for the
shipped library), so 16 of them already need ~1000 tokens, twice the default
``prompt.max_text_tokens`` (512); the paper uses 1. Exemplars past the budget are dropped
anyway, so a larger k could only mislead about what the model was shown."""


# ----------------------------------------------------------------------------------- checks
# Each config dataclass checks its own fields in ``__post_init__`` and raises FieldError with
# the field's name; ``configio.from_dict`` prefixes the key path. A zero or negative size would
# otherwise surface deep inside torch as a traceback (or, worse, build a silently wrong model).


def _at_least(obj: object, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise FieldError(name, f"must be at least {minimum}, got {value}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise FieldError(name, f"must be positive, got {value}")


def _rgb_normalisation(obj: object, mean: str, std: str) -> None:
    for name in (mean, std):
        if len(getattr(obj, name)) != 3:
            raise FieldError(name, f"must be 3 numbers (R, G, B), got {len(getattr(obj, name))}")
    if not all(v > 0 for v in getattr(obj, std)):
        raise FieldError(std, f"must be positive, got {list(getattr(obj, std))}")


def _divides(obj: object, total: str, parts: str) -> None:
    if getattr(obj, total) % getattr(obj, parts):
        raise FieldError(parts, f"must divide {total} ({getattr(obj, total)}), got {getattr(obj, parts)}")


@dataclass
class SamConfig:
    """SAM (segment-anything). ``image_size`` is the square input side; masks come out at
    ``4 * image_size / patch_size`` per side (256 at real size)."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    checkpoint: str | None = None
    """Official ``sam_vit_*.pth`` (loaded with ``weights_only=True``); None = random init."""
    pixel_mean: tuple[float, ...] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, ...] = SAM_PIXEL_STD
    """Per-channel normalisation of 0-255 pixels (the processor's; SAM's own buffers hold the same)."""

    def __post_init__(self) -> None:
        _rgb_normalisation(self, "pixel_mean", "pixel_std")
        _at_least(self, 1, "image_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "window_size")
        _at_least(self, 1, "prompt_embed_dim", "decoder_depth", "decoder_mlp_dim", "decoder_num_heads", "iou_head_hidden_dim")
        if self.image_size < self.patch_size:
            raise FieldError("image_size", f"must be at least patch_size ({self.patch_size}), got {self.image_size}")
        _divides(self, "encoder_embed_dim", "encoder_num_heads")
        # SAM's two-way transformer attends at prompt_embed_dim and, across, at half of it
        if self.prompt_embed_dim % (2 * self.decoder_num_heads):
            raise FieldError("decoder_num_heads", f"must divide half of prompt_embed_dim ({self.prompt_embed_dim // 2}), got {self.decoder_num_heads}")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise FieldError("encoder_global_attn_indexes", f"must be block indexes below encoder_depth ({self.encoder_depth}), got {bad[0]}")
        # a window wider than the patch grid only pads it (and sizes the relative-position tables)
        if self.window_size > self.embedding_size:
            raise FieldError("window_size", f"must be at most the patch grid's side (image_size / patch_size = {self.embedding_size}), got {self.window_size}")

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:
        return 4 * self.embedding_size


@dataclass
class TextArch:
    """The Llama language model of LLaVA (used when building without a directory)."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32064
    """Base vocabulary before the chain tokens are added; 0 = the tokenizer's size."""
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _at_least(self, 1, "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings")
        _at_least(self, 0, "vocab_size")
        _positive(self, "rms_norm_eps")
        _divides(self, "hidden_size", "num_heads")
        _divides(self, "num_heads", "num_kv_heads")


@dataclass
class VisionArch:
    """The CLIP vision tower of LLaVA."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        _at_least(self, 1, "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size", "projection_dim")
        if self.image_size < self.patch_size:
            raise FieldError("image_size", f"must be at least patch_size ({self.patch_size}), got {self.image_size}")
        _divides(self, "hidden_size", "num_heads")


@dataclass
class MllmConfig:
    """The multimodal LLM. With ``path`` set, the HF LLaVA directory there is loaded (its own
    config.json wins over ``text``/``vision``); with ``path`` None a model is built from
    ``text``/``vision`` with random weights (the tiny preset, or real sizes on ``meta``)."""

    path: str | None = None
    tokenizer: str | None = None
    """Tokenizer directory; None = ``path``, or the built-in tiny tokenizer when ``path`` is None."""
    text: TextArch = field(default_factory=TextArch)
    vision: VisionArch = field(default_factory=VisionArch)
    image_token_index: int | None = 32000
    """Id of ``<image>``; None = look it up in the tokenizer."""
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_mode: Literal["crop", "pad"] = "crop"
    """How the CLIP input is made square: resize + centre crop (LISA, HF processor) or pad."""
    image_start_end: bool = False
    """Wrap the image tokens in ``<im_start>`` … ``<im_end>`` (LLaVA-v0/v1 and LISA's
    ``mm_use_im_start_end``); the tokenizer must have both as single tokens."""
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """The vision→language projector of a model built from this config: LLaVA-1.5's two-layer
    MLP, or LLaVA-v0/v1's single linear layer (held in the MLP's place as the first layer, an
    identity activation and an identity second layer, so it computes exactly the linear map).
    A LLaVA directory (``path``) brings its own."""
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_token_index is not None and self.image_token_index < 0:
            raise FieldError("image_token_index", f"must be 0 or more (or null), got {self.image_token_index}")
        # CLIP returns num_layers + 1 hidden states (the embeddings first)
        layers = self.vision.num_layers
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise FieldError("vision_feature_layer", f"must index one of the vision tower's {layers + 1} hidden states ({-(layers + 1)} to {layers}), got {self.vision_feature_layer}")
        _rgb_normalisation(self, "image_mean", "image_std")

    @property
    def num_image_tokens(self) -> int:
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        return n + 1 if self.vision_feature_select_strategy == "full" else n


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Module names inside the language model only (the vision tower is never adapted)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "r", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise FieldError("target_modules", "must name at least one module when LoRA is enabled")
        odd = [m for m in self.target_modules if not isinstance(m, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", m)]
        if odd:
            raise FieldError("target_modules", f"must be module names like q_proj (letters, digits, '_'), got {odd[0]!r}")


@dataclass
class ChainConfig:
    """The dual chain (paper §3.1) and the switches of the paper's Table 3."""

    depth: int = 2
    """1 = ``[SEG]`` (LISA), 2 = ``[LOC] → [SEG]`` (paper default), 3 = ``[LOC] → [POS] → [SEG]``."""
    reasoning: bool = True
    """CoR. Off: the answer carries only ``[SEG]`` and every level reuses its embedding."""
    segmenting: bool = True
    """CoS. Off: one decoder pass prompted with the mean of the chain embeddings."""
    refiner: bool = True
    """CoS-R. Off: levels t ≥ 1 use the unrefined token (the soft mask prompt stays)."""
    refiner_heads: int = 8
    refiner_init_scale: float = 1e-3
    """Std of the refiner's output projection at init: near identity, yet every refiner
    weight gets a gradient from the first step."""
    hidden_at: Literal["token", "predicting"] = "token"
    """Where a chain token's hidden state is read: at the token itself (cores), or at the
    position before it, whose output predicts the token (LISA and the official CoReS code;
    set for imported LISA checkpoints)."""

    def __post_init__(self) -> None:
        if self.depth not in (1, 2, 3):
            raise FieldError("depth", f"must be 1, 2 or 3, got {self.depth}")
        _at_least(self, 1, "refiner_heads")
        if self.refiner_init_scale < 0:
            raise FieldError("refiner_init_scale", f"must be 0 or more, got {self.refiner_init_scale}")

    @property
    def tokens(self) -> tuple[str, ...]:
        """The chain tokens the answer carries, outermost first."""
        if not self.reasoning or self.depth == 1:
            return ("[SEG]",)
        return ("[LOC]", "[SEG]") if self.depth == 2 else ("[LOC]", "[POS]", "[SEG]")

    @property
    def levels(self) -> int:
        """Mask-decoder passes per target."""
        return self.depth if self.segmenting else 1


@dataclass
class PromptConfig:
    """The conversation around the query (docs/MODEL.md)."""

    system: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    cores_suffix: str = (
        "To realize segmentation, the assistant guesses all possible object it typically "
        "appears on and its distinct appearance."
    )
    in_context_k: int = 1
    """Exemplars drawn per sample (paper's InC); 0 disables in-context guidance."""
    context_library: str | None = None
    """Exemplar library (JSONL); None = the one shipped in the package."""
    max_text_tokens: int = 512
    """Token budget excluding image tokens; exemplars are dropped first, then the query shortened."""
    answer_template: int = 0
    """Which answer phrasing eval and predict use (training samples all of them)."""
    template: Literal["cores", "lisa"] = "cores"
    """Question and answer wording: cores's, or LISA's exactly (its ``validate()`` questions
    with the space after the image line, and ``[SEG].`` as the eval answer)."""

    def __post_init__(self) -> None:
        if not 0 <= self.in_context_k <= MAX_IN_CONTEXT_K:
            raise FieldError("in_context_k", f"must be between 0 and {MAX_IN_CONTEXT_K} exemplars, got {self.in_context_k}")
        _at_least(self, 1, "max_text_tokens")
        _at_least(self, 0, "answer_template")


@dataclass
class LossConfig:
    """Loss weights (LISA/CoReS code defaults; the paper's text and Table S2 disagree)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    intermediate: float = 0.0
    """Weight of BCE+Dice on the intermediate levels against the final target (0 = off, as
    in the paper; Table S1 shows supervising C1 hurts)."""

    def __post_init__(self) -> None:
        for name in ("ce", "bce", "dice", "intermediate"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be 0 or more (a negative weight rewards the error), got {getattr(self, name)}")


@dataclass
class ModelConfig:
    preset: str = "custom"
    sam: SamConfig = field(default_factory=SamConfig)
    mllm: MllmConfig = field(default_factory=MllmConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    chain: ChainConfig = field(default_factory=ChainConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train_extra: tuple[str, ...] = ()
    """Parts trainable beyond the paper's set, for from-scratch recipes: any of
    ``sam_image_encoder``, ``sam_prompt_encoder``, ``vision_tower``, ``mm_projector``, ``llm``."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.train_extra) - set(EXTRA_TRAINABLE))
        if bad:
            raise FieldError("train_extra", f"holds an unknown part {bad[0]!r}; choose from {', '.join(EXTRA_TRAINABLE)}")
        # the token refiner attends over SAM prompt embeddings
        if self.sam.prompt_embed_dim % self.chain.refiner_heads:
            raise FieldError("chain.refiner_heads", f"must divide sam.prompt_embed_dim ({self.sam.prompt_embed_dim}), got {self.chain.refiner_heads}")
        if self.prompt.template == "lisa" and self.chain.tokens != ("[SEG]",):
            raise FieldError("prompt.template", f"'lisa' has answers for the [SEG] chain only; set chain.depth=1 (the chain is {' '.join(self.chain.tokens)})")


EXTRA_TRAINABLE = ("sam_image_encoder", "sam_prompt_encoder", "vision_tower", "mm_projector", "llm")


# ----------------------------------------------------------------------------------- presets


def sam_vit_h() -> SamConfig:
    return SamConfig()


def sam_vit_l() -> SamConfig:
    return SamConfig(encoder_embed_dim=1024, encoder_depth=24, encoder_global_attn_indexes=(5, 11, 17, 23))


def sam_vit_b() -> SamConfig:
    return SamConfig(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11))


def sam_tiny() -> SamConfig:
    return SamConfig(
        image_size=128,
        patch_size=16,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=4,
        prompt_embed_dim=64,
        decoder_depth=2,
        decoder_mlp_dim=128,
        decoder_num_heads=2,
        iou_head_hidden_dim=64,
    )


SAM_PRESETS = {"vit_h": sam_vit_h, "vit_l": sam_vit_l, "vit_b": sam_vit_b, "tiny": sam_tiny}


def tiny() -> ModelConfig:
    return ModelConfig(
        preset="tiny",
        sam=sam_tiny(),
        mllm=MllmConfig(
            text=TextArch(
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                num_kv_heads=4,
                vocab_size=0,
                max_position_embeddings=2048,
                rms_norm_eps=1e-6,
            ),
            vision=VisionArch(
                hidden_size=32,
                intermediate_size=64,
                num_layers=2,
                num_heads=2,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            ),
            image_token_index=None,
            image_mode="pad",
        ),
        chain=ChainConfig(refiner_heads=4),
        prompt=PromptConfig(max_text_tokens=384),
    )


def llava_15_7b() -> ModelConfig:
    return ModelConfig(preset="llava-1.5-7b", sam=sam_vit_h(), mllm=MllmConfig())


def llava_15_13b() -> ModelConfig:
    text = TextArch(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)
    return ModelConfig(preset="llava-1.5-13b", sam=sam_vit_h(), mllm=MllmConfig(text=text))


def llava_7b_v0() -> ModelConfig:
    """LLaVA-7B-v0, the paper's 7B setting (§4.1, Tables 1-5, S1, S2): Vicuna-7B v0 (LLaMA-1:
    2048 positions, RMSNorm eps 1e-6), CLIP ViT-L/14 at 224 px (256 image tokens between
    <im_start> and <im_end>), a linear projector. ``cores import`` makes its HF directory."""
    text = TextArch(max_position_embeddings=2048, rms_norm_eps=1e-6)
    vision = VisionArch(image_size=224)
    mllm = MllmConfig(text=text, vision=vision, image_token_index=None, image_start_end=True, projector="linear")
    return ModelConfig(preset="llava-7b-v0", sam=sam_vit_h(), mllm=mllm)


PRESETS = {"tiny": tiny, "llava-1.5-7b": llava_15_7b, "llava-1.5-13b": llava_15_13b, "llava-7b-v0": llava_7b_v0}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def load_model_config(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ModelConfig:
    """Preset, then a JSON/YAML file on top of it, then ``--set`` overrides.

    A file may hold the ModelConfig itself or nest it under a ``model:`` key (recipes do).
    """
    cfg = preset(preset_name) if preset_name else ModelConfig()
    if config_file is not None:
        data = read_mapping(config_file)
        data = data.get("model", data) if "model" in data else data
        merged = _deep_merge(to_dict(cfg), data)
        cfg = from_dict(ModelConfig, merged)
    return apply_overrides(cfg, list(overrides))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_model_config(cfg: ModelConfig, path: str | Path) -> None:
    from .fileio import atomic_write_text

    fmt = "yaml" if Path(path).suffix in (".yaml", ".yml") else "json"
    atomic_write_text(path, dump_text(cfg, fmt))


def replace(cfg, **changes):
    """``dataclasses.replace`` re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)

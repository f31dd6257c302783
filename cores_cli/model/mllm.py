"""The multimodal LLM: LLaVA through transformers, its tokenizer, the chain tokens, LoRA.

Two ways in, one model class (``LlavaForConditionalGeneration``):

- from an HF-format LLaVA directory (llava-1.5-7b/13b), loaded offline;
- built from :class:`~cores_cli.config.MllmConfig` with random weights (the tiny preset, or the
  real sizes under ``torch.device("meta")``), with a byte-level BPE tokenizer trained locally on
  a fixed corpus shipped in the package, so nothing is downloaded.

The chain tokens ``[LOC] [POS] [SEG]`` are added as *special* tokens, so they are never split
into pieces of text (Llama-2 turns the plain text ``"[SEG]"`` into two ids).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ..config import CHAIN_TOKENS, LoraSettings, MllmConfig
from ..errors import CheckpointError, ConfigError

IMAGE_TOKEN = "<image>"
IMAGE_WRAP_TOKENS = ("<im_start>", "<im_end>")
"""What LLaVA-v0/v1 and LISA put around the image tokens (``mllm.image_start_end``)."""
TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
TINY_VOCAB_SIZE = 2048


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the shipped corpus: deterministic, offline, ~10 ms.

    It has no chain tokens yet; :func:`add_chain_tokens` adds them exactly as for a real one.
    """
    corpus = (resources.files("cores_cli") / "assets" / "tiny_tokenizer_corpus.txt").read_text("utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )



LLAMA_VOCAB = 32000
"""Llama's vocabulary; llava-hf adds ``<image>`` (32000) and ``<pad>`` (32001) after it."""


def build_llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer built offline (for real-width tests and benchmarks): BPE over
    Metaspace pieces (``▁``), byte fallback through ``<0x00>``..``<0xFF>`` at ids 3-258, trained on
    the shipped corpus and filled to 32000 entries with pieces no text produces (the corpus is too
    small for 32000 merges), then ``<image>`` = 32000 and ``<pad>`` = 32001 as llava-hf adds them."""
    import json

    from tokenizers import AddedToken

    specials = ("<unk>", "<s>", "</s>")
    byte_tokens = tuple(f"<0x{b:02X}>" for b in range(256))
    corpus = (resources.files("cores_cli") / "assets" / "tiny_tokenizer_corpus.txt").read_text("utf-8").splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    # Llama-2's tokenizer.json decoder (a Metaspace decoder after Fuse would drop every space)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=4000, special_tokens=list(specials), show_progress=False))
    data = json.loads(tok.to_str())
    # the byte pieces belong to the model's vocabulary (as in Llama's), not to the added special
    # tokens, which decoding would skip; merges name pieces, not ids, so renumbering keeps them
    trained = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])
    pieces = [*specials, *byte_tokens, *(p for p, _ in trained if p not in specials and p not in byte_tokens)]
    pieces += [f"▁unused{i}" for i in range(len(pieces), LLAMA_VOCAB)]
    data["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken("<image>", normalized=False), AddedToken("<pad>", normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=4096)


def load_tokenizer(cfg: MllmConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by the config: a directory, the LLaVA directory, or the tiny one."""
    source = cfg.tokenizer or cfg.path
    if source is None:
        return build_tiny_tokenizer()
    if not Path(source).is_dir():
        raise CheckpointError(f"tokenizer directory not found: {source}")
    tok = read_tokenizer_dir(source)
    if not tok.is_fast:
        raise CheckpointError(f"{source}: a fast tokenizer (tokenizer.json) is needed for exact answer masking")
    check_image_token(tok, source)
    return tok


def check_image_token(tokenizer: PreTrainedTokenizerBase, source: str | Path) -> None:
    """The prompt marks the image with ``<image>``: a tokenizer that lacks it (or splits it)
    would only fail later, at the first question, with a message about the question."""
    if IMAGE_TOKEN not in tokenizer.get_vocab() or len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        raise CheckpointError(
            f"the tokenizer in {source} has no {IMAGE_TOKEN} token, which LLaVA prompts need: use the tokenizer saved with "
            f"the HF LLaVA model (e.g. llava-hf/llava-1.5-7b-hf), or add it with "
            f"tokenizer.add_tokens(['{IMAGE_TOKEN}'], special_tokens=True) and save_pretrained"
        )


def check_image_token_id(llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, source: str | Path) -> None:
    """The id the model replaces with image features must be the tokenizer's ``<image>``: else
    the first forward fails with a count mismatch of image tokens, or features land on text."""
    wanted = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    have = int(llava.config.image_token_index)
    if have != wanted:
        raise CheckpointError(
            f"{Path(source) / 'config.json'}: image_token_index is {have} but the tokenizer's {IMAGE_TOKEN} is id {wanted}: "
            f"set image_token_index to {wanted} (or use the tokenizer saved with these weights)"
        )


def check_single_tokens(tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...], source: str | Path, why: str) -> None:
    """Each of ``tokens`` is one id of the tokenizer, else a CheckpointError naming the first missing."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token not in vocab or len(tokenizer.encode(token, add_special_tokens=False)) != 1:
            raise CheckpointError(
                f"the tokenizer in {source} has no {token} token, which {why} needs: add it with "
                f"tokenizer.add_tokens(['{token}'], special_tokens=True) and save_pretrained, or turn the setting off"
            )


def read_tokenizer_dir(source: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer directory, offline, or a CheckpointError naming it.

    A tokenizer.json of the wrong structure does not fail with one exception type: the
    tokenizers library raises its bare ``Exception`` for what it cannot deserialize, and
    transformers a KeyError or TypeError for a JSON document of another shape.
    """
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, use_fast=True)
    except Exception as exc:  # noqa: BLE001 (see the docstring: no narrower type covers it)
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot load the tokenizer in {source} (is tokenizer.json a tokenizer?): {detail}") from None


def add_chain_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add ``[LOC] [POS] [SEG]`` (all three, whatever the depth, so vocabularies agree across
    depths) as special tokens; idempotent. Returns their ids."""
    missing = [t for t in CHAIN_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAIN_TOKENS}
    for t, i in ids.items():
        if tokenizer.encode(t, add_special_tokens=False) != [i]:
            raise CheckpointError(f"the tokenizer splits {t} into several ids; it must be one special token")
    if pad_missing(tokenizer):
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return ids


def pad_missing(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.pad_token is None


def llava_config(cfg: MllmConfig, vocab_size: int, image_token_index: int, pad_token_id: int | None) -> LlavaConfig:
    t, v = cfg.text, cfg.vision
    text = LlamaConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        projection_dim=v.projection_dim,
        hidden_act=v.hidden_act,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_index,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=PROJECTOR_ACTIVATION[cfg.projector],
        image_seq_length=cfg.num_image_tokens,
        tie_word_embeddings=False,
    )


PROJECTOR_ACTIVATION = {"mlp2x_gelu": "gelu", "linear": "linear"}
"""transformers' activation between the projector's two layers; ``linear`` is the identity."""


def build_llava(cfg: MllmConfig, base_vocab_size: int, image_token_index: int, pad_token_id: int | None = None) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA of the configured size on the current default device."""
    vocab = cfg.text.vocab_size or base_vocab_size
    model = LlavaForConditionalGeneration(llava_config(cfg, vocab, image_token_index, pad_token_id))
    model.config._attn_implementation = "sdpa"
    if cfg.projector == "linear":
        make_identity(model.model.multi_modal_projector.linear_2)
    return model


def make_identity(layer: torch.nn.Linear) -> None:
    """``layer`` computes x exactly: the second layer of a linear (v0/v1) projector."""
    if layer.in_features != layer.out_features:
        raise ValueError(f"an identity layer must be square, got {layer.in_features}→{layer.out_features}")
    with torch.no_grad():
        layer.weight.copy_(torch.eye(layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device))
        if layer.bias is not None:
            layer.bias.zero_()


def source_format_of(config: dict) -> str | None:
    """``lisa`` or ``llava`` (liuhaotian's original layout) for the config.json of a directory
    ``cores import`` converts; None for anything else (an HF LLaVA directory among them)."""
    if not isinstance(config, dict):
        return None
    if "LISAForCausalLM" in (config.get("architectures") or ()) or {"train_mask_decoder", "out_dim"} <= config.keys():
        return "lisa"
    if "text_config" not in config and ("mm_vision_tower" in config or "mm_hidden_size" in config):
        return "llava"
    return None


def not_hf_llava_hint(path: Path, name: str | None = None) -> str | None:
    """The fix when ``path`` holds a LISA or original-LLaVA checkpoint rather than an HF one
    (``name``: what the user typed for it, e.g. a Hub id; default the path)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fmt = source_format_of(config)
    if fmt is None:
        return None
    kind = "a LISA checkpoint" if fmt == "lisa" else "an original-format LLaVA checkpoint (liuhaotian's layout)"
    shown = name or str(path)
    return f"{shown} is {kind}, not a cores or HF LLaVA directory: convert it once with `cores import {shown} OUT`, then use -c OUT"


QUANTIZE_CHOICES = ("8bit", "4bit")
DEVICE_MAP_CHOICES = ("auto",)


@dataclass(frozen=True)
class LlavaLoading:
    """How an HF LLaVA directory is loaded for inference beyond its dtype: quantized by
    bitsandbytes (``8bit``/``4bit``, LISA's ``--load_in_8bit``/``--load_in_4bit``) and/or spread
    over the visible GPUs (``device_map="auto"``, through accelerate). Such a LLaVA is placed by
    transformers and is never cast or moved afterwards."""

    quantize: str | None = None
    device_map: str | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.device_map is not None and self.device_map not in DEVICE_MAP_CHOICES:
            raise ConfigError(f"device_map must be one of {', '.join(DEVICE_MAP_CHOICES)}, got {self.device_map!r}")

    @property
    def managed(self) -> bool:
        """True when transformers places the LLaVA (quantized or device-mapped)."""
        return self.quantize is not None or self.device_map is not None

    def from_pretrained_kwargs(self, dtype: torch.dtype) -> dict:
        """The extra ``from_pretrained`` arguments."""
        kwargs: dict = {}
        if self.quantize is not None:
            from transformers import BitsAndBytesConfig

            if self.quantize == "8bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            else:  # NF4 weights, computing in the run's dtype (what LISA's chat.py sets up)
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
                )
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs


def load_llava(path: str | Path, dtype: torch.dtype = torch.float32, loading: LlavaLoading | None = None) -> LlavaForConditionalGeneration:
    """An HF-format LLaVA directory, offline, strictly: a tensor the config expects but the
    weights lack (which transformers would leave randomly initialised), a tensor the model has
    no place for, or a shape that differs from the config is a CheckpointError naming them.
    transformers maps older key layouts (``language_model.model.layers...``) onto its current one."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"not an HF LLaVA directory (no config.json): {p}")
    hint = not_hf_llava_hint(p)
    if hint is not None:
        raise CheckpointError(hint)
    # transformers draws its own progress bar and load report on stderr; we report ourselves
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        # mismatched shapes are collected (not raised as a bare RuntimeError) so they can be named
        extra = loading.from_pretrained_kwargs(dtype) if loading is not None else {}
        model, info = LlavaForConditionalGeneration.from_pretrained(
            p, dtype=dtype, local_files_only=True, attn_implementation="sdpa", output_loading_info=True, ignore_mismatched_sizes=True, **extra
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load LLaVA from {p}: {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()
    check_loading_info(p, info)
    return model


BENIGN_KEYS = re.compile(r"(^|\.)(rotary_emb\.(original_)?inv_freq|embeddings\.position_ids)$")
"""Buffers that older saves carry and the model recomputes at build time (rotary frequencies,
CLIP's position ids): present or absent, they change no weight."""

NAMED_KEYS = 3
"""How many tensor names an error quotes before giving the count."""


def _named(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:NAMED_KEYS])
    return f"{len(keys)} {what}: {shown}{', ...' if len(keys) > NAMED_KEYS else ''}"


def check_loading_info(path: Path, info: dict) -> None:
    """Raise for what ``from_pretrained(output_loading_info=True)`` reports as not loaded."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    vocab = [m for m in mismatched if m[0].endswith(("embed_tokens.weight", "lm_head.weight"))]
    if vocab:
        _, stored, expected = vocab[0]
        raise CheckpointError(
            f"{path / 'config.json'}: the vocabulary size is {expected[0]} but the embedding weights have {stored[0]} rows: "
            f"set text_config.vocab_size to {stored[0]} (the config does not belong to these weights)"
        )
    if mismatched:
        shapes = [f"{k} {list(stored)} vs {list(expected)} in config.json" for k, stored, expected in mismatched]
        raise CheckpointError(f"{path}: tensors of another shape than config.json says ({_named(shapes, 'differ')}): the config does not belong to these weights")
    missing = sorted(k for k in info.get("missing_keys") or () if not BENIGN_KEYS.search(k))
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not BENIGN_KEYS.search(k))
    if missing or unexpected:
        parts = ([_named(missing, "missing")] if missing else []) + ([_named(unexpected, "unexpected")] if unexpected else [])
        raise CheckpointError(
            f"{path}: the weights do not match the LLaVA in its config.json ({'; '.join(parts)}): "
            f"point mllm.path at a complete HF LLaVA directory (as save_pretrained writes it)"
        )


def fit_vocabulary(model: LlavaForConditionalGeneration, vocab_size: int) -> None:
    """Grow the embeddings when the tokenizer outgrew them (never shrink: llava-1.5 pads its
    vocabulary to 32064, past the tokenizer's 32002 + chain tokens)."""
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)


def lora_target_regex(settings: LoraSettings) -> str:
    """Adapt only the language model: CLIP's attention also has q_proj/v_proj."""
    names = "|".join(settings.target_modules)
    return rf".*language_model.*\.({names})$"


def apply_lora(model: LlavaForConditionalGeneration, settings: LoraSettings) -> PeftModel:
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(settings),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft calls a transformers method that transformers 5 marks as deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            # adapters at the base's dtype (built under the run's default dtype): peft would
            # otherwise widen them to fp32 for a later cast to bring back
            return get_peft_model(model, config, autocast_adapter_dtype=False)
        except ValueError as exc:  # peft: no module matches the targets
            raise ConfigError(
                f"lora.target_modules {list(settings.target_modules)}: no linear layer of the language model has "
                f"such a name ({str(exc).splitlines()[0][:200]})"
            ) from None

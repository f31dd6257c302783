"""Assemble a CoresModel from a ModelConfig: SAM, LLaVA + tokenizer + chain tokens, LoRA."""

from __future__ import annotations

import contextlib

import torch

from ..config import CHAIN_TOKENS, ModelConfig, replace
from ..errors import ConfigError
from ..hub import local_or_hub
from .cores import CoresModel
from .mllm import (
    IMAGE_TOKEN,
    add_chain_tokens,
    apply_lora,
    IMAGE_WRAP_TOKENS,
    LlavaLoading,
    build_llava,
    check_image_token_id,
    check_single_tokens,
    fit_vocabulary,
    load_llava,
    load_tokenizer,
)
from .precision import cast_for_run, default_dtype
from .sam import build_sam, load_sam_checkpoint
from .token_rows import ChainTokenRows


def build_model(
    cfg: ModelConfig,
    load_base_weights: bool = True,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    llava_loading: LlavaLoading | None = None,
) -> CoresModel:
    """Build the model the config describes at ``dtype``, directly on ``device`` (default: the
    current default device).

    Every part is created at ``dtype`` and on ``device`` (LLaVA loaded by transformers at that
    dtype onto the device in effect, with its low-memory loading; SAM and the new parts created
    under that default dtype and device), so no fp32 copy of the model exists on the way and a
    GPU run does not stage the model in host memory first; the position buffers are fp32 (see
    ``precision``).

    ``load_base_weights`` False skips the SAM ``.pth`` and LLaVA directory weights (the
    architecture is still taken from the directory's config when ``mllm.path`` is set); used
    when building on ``meta`` or before loading a checkpoint that carries them.
    ``tokenizer`` lets a checkpoint supply its saved tokenizer. ``llava_loading`` quantizes or
    spreads the LLaVA directory over GPUs (inference; it is then left where transformers put it).
    ``mllm.path`` and
    ``mllm.tokenizer`` may be Hugging Face Hub ids (read from its cache, fetched when online);
    the model keeps the ids in its config, so a checkpoint stays portable.
    """
    local = _local_mllm_paths(cfg)
    managed = llava_loading is not None and llava_loading.managed
    if managed and not (local.mllm.path and load_base_weights):
        raise ConfigError("quantized or device-mapped loading applies to an HF LLaVA directory (mllm.path), and this model has none: its LLaVA weights are its own (e.g. the tiny model)")
    tok = tokenizer if tokenizer is not None else load_tokenizer(local.mllm)
    if cfg.mllm.image_start_end:
        if tokenizer is None and not (local.mllm.tokenizer or local.mllm.path):
            # the built-in tokenizer of a random-weights model: it learns them like any token
            tok.add_special_tokens({"additional_special_tokens": list(IMAGE_WRAP_TOKENS)}, replace_extra_special_tokens=False)
        check_single_tokens(tok, IMAGE_WRAP_TOKENS, local.mllm.tokenizer or local.mllm.path or "the checkpoint", "mllm.image_start_end")
    base_vocab = len(tok)
    chain_ids = add_chain_tokens(tok)

    # transformers' from_pretrained loads onto the device of an enclosing torch.device block
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    with placement, default_dtype(dtype):
        sam = cast_for_run(build_sam(cfg.sam), dtype)  # fp32 position matrix before loading into it
        if load_base_weights and cfg.sam.checkpoint:
            load_sam_checkpoint(sam, cfg.sam.checkpoint)
        llava = _base_llava(local, tok, base_vocab, load_base_weights, dtype, llava_loading)
        if local.mllm.path:
            check_image_token_id(llava, tok, local.mllm.path)
        fit_vocabulary(llava, len(tok))
        rows = ChainTokenRows.from_model([chain_ids[t] for t in CHAIN_TOKENS], llava.get_input_embeddings(), llava.get_output_embeddings())
        mllm = apply_lora(llava, cfg.lora) if cfg.lora.enabled else llava
        model = CoresModel(cfg, sam, mllm, tok, rows)
    # a no-op for what was created at ``dtype``; the rotary frequencies back to fp32 if needed
    return cast_for_run(model, dtype, skip=(model.mllm,) if managed else ())


def _local_mllm_paths(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with Hub ids in ``mllm.path`` / ``mllm.tokenizer`` replaced by their snapshots."""
    mllm = cfg.mllm
    path = str(local_or_hub(mllm.path, "mllm.path")) if mllm.path else None
    tok = str(local_or_hub(mllm.tokenizer, "mllm.tokenizer")) if mllm.tokenizer else None
    if (path, tok) == (mllm.path, mllm.tokenizer):
        return cfg
    return replace(cfg, mllm=replace(mllm, path=path, tokenizer=tok))


def _base_llava(cfg: ModelConfig, tok, base_vocab: int, load_base_weights: bool, dtype: torch.dtype, loading: LlavaLoading | None = None):
    """LLaVA from its directory (weights, or only the architecture), else from the config."""
    if cfg.mllm.path and load_base_weights:
        return load_llava(cfg.mllm.path, dtype, loading)
    if cfg.mllm.path:
        from transformers import AutoConfig, LlavaForConditionalGeneration

        return LlavaForConditionalGeneration(AutoConfig.from_pretrained(cfg.mllm.path, local_files_only=True))
    image_id = cfg.mllm.image_token_index
    if image_id is None:
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    return build_llava(cfg.mllm, base_vocab, image_id, tok.pad_token_id)


def build_on_meta(cfg: ModelConfig) -> CoresModel:
    """The architecture without memory: for parameter counts and key names of real sizes."""
    return build_model(cfg, load_base_weights=False, device="meta")

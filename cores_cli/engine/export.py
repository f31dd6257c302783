"""Export a checkpoint for use without peft: LoRA merged into a plain HF LLaVA directory.

Layout of an export (itself a cores checkpoint, so ``cores predict -c OUT`` and
:func:`~cores_cli.engine.checkpoint.load_checkpoint` read it)::

    OUT/
      llava/                 a standalone HF LLaVA directory: LoRA merged into the weights
                             (peft ``merge_and_unload``), the chain-token rows written into the
                             embedding and lm_head matrices, the tokenizer with [LOC] [POS] [SEG];
                             ``LlavaForConditionalGeneration.from_pretrained(OUT/llava)`` loads it
      config.json            the model config with ``lora.enabled: false``, ``mllm.path: llava``
                             (relative to OUT) and ``sam.checkpoint: null``
      tokenizer/             the same tokenizer
      weights.safetensors    everything that is not LLaVA: SAM (all of it), β, the token refiner,
                             the chain-token rows

The relative ``mllm.path`` is read against the export's own directory, so it can be moved or
copied whole and still loads with ``load_checkpoint`` / ``cores predict -c``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PeftModel

from ..errors import CoresError
from ..fileio import atomic_directory
from ..runtime import DTYPES
from .checkpoint import load_checkpoint, save_checkpoint


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the export of ``checkpoint`` to ``out`` (atomically) and return ``out``."""
    src, dest = Path(checkpoint), Path(out)
    if dest.exists() and not overwrite:
        raise CoresError(f"{dest} already exists (remove it or pass --overwrite)")
    if dest.resolve() == src.resolve():
        raise CoresError("the export must go to another directory than the checkpoint")
    try:
        torch_dtype = DTYPES[dtype]
    except KeyError:
        raise CoresError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None
    model, _ = load_checkpoint(src)
    merged = model.mllm.merge_and_unload() if isinstance(model.mllm, PeftModel) else model.mllm
    # the chain-token rows live in a side module; a plain HF model needs them in its matrices
    model.token_rows.write_into(merged.get_input_embeddings(), merged.get_output_embeddings())
    model.mllm = merged
    cfg = model.cfg
    model.cfg = dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, enabled=False),
        mllm=dataclasses.replace(cfg.mllm, path="llava", tokenizer=None),
        sam=dataclasses.replace(cfg.sam, checkpoint=None),
        train_extra=(),
    )
    model.to(torch_dtype)
    with atomic_directory(dest) as tmp:
        # first: save_checkpoint swaps its own complete directory in at ``tmp``
        save_checkpoint(model, tmp, extra={"exported_from": str(src.resolve()), "dtype": dtype})
        merged.save_pretrained(tmp / "llava", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "llava")
    return dest

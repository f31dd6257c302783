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

``OUT`` may not overlap the checkpoint or the training run that holds it (replacing it would
delete them), and ``--overwrite`` replaces only an earlier export: a directory whose
``config.json`` is a cores checkpoint's and that holds nothing an export does not write.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from peft import PeftModel

from ..errors import CoresError
from ..fileio import atomic_directory
from ..model.precision import cast_for_run
from ..runtime import DTYPES
from .checkpoint import FORMAT, load_checkpoint, read_checkpoint_config, resolve_base_paths, save_checkpoint
from .train_state import run_dir_of

EXPORT_ENTRIES = frozenset({"config.json", "tokenizer", "weights.safetensors", "llava"})
"""What an export holds: the only names ``--overwrite`` deletes."""


def check_export_target(checkpoint: str | Path, out: str | Path, overwrite: bool) -> None:
    """Refuse an ``out`` that would destroy something: one overlapping the checkpoint or its run,
    or (with ``overwrite``) anything but an earlier export. Checked before the model is loaded."""
    src, dest = Path(checkpoint), Path(out)
    protected = [("the checkpoint", src.resolve())]
    run = run_dir_of(src)
    if run is not None:
        protected.append(("the training run", run))
    target = dest.resolve()
    overlaps = [("is", what, path) for what, path in protected if target == path]
    overlaps += [("lies inside", what, path) for what, path in protected if path in target.parents]
    overlaps += [("contains", what, path) for what, path in protected if target in path.parents]
    if overlaps:
        relation, what, path = overlaps[0]
        raise CoresError(f"{dest} {relation} {what} {path}: --overwrite there would delete it; export to a directory outside it")
    for key, path in _base_files(src):
        if target == path or target in path.parents:
            raise CoresError(f"{dest} holds {path}, the {key} the checkpoint is built on; export to a directory of its own")
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise CoresError(f"{dest} already exists (remove it or pass --overwrite)")
        _check_replaceable(dest, "--overwrite replaces only an earlier export")


def _base_files(checkpoint: Path) -> list[tuple[str, Path]]:
    """The files outside the checkpoint that it needs (LLaVA, tokenizer, SAM ``.pth``): replacing
    one would silently change this checkpoint and every run that names it."""
    cfg = resolve_base_paths(read_checkpoint_config(checkpoint), checkpoint)
    named = [("mllm.path", cfg.mllm.path), ("mllm.tokenizer", cfg.mllm.tokenizer), ("sam.checkpoint", cfg.sam.checkpoint)]
    return [(key, Path(value).resolve()) for key, value in named if value]


def _check_replaceable(path: Path, why: str) -> None:
    """``path`` is an export we wrote and may be deleted, or CoresError."""
    if path.is_symlink():
        raise CoresError(f"{path} is a symbolic link; {why}: remove it yourself or choose another OUT")
    if not path.is_dir():
        raise CoresError(f"{path} is a file, not an earlier export; {why}: choose another OUT")
    if (path / "train_state").exists() or run_dir_of(path) is not None:
        raise CoresError(f"{path} is a checkpoint of a training run; {why}: choose another OUT")
    if not _is_export_config(path / "config.json"):
        raise CoresError(f"{path} is not a cores export (its config.json does not say it was exported); {why}: choose another OUT")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_ENTRIES)
    if foreign:
        raise CoresError(f"{path} holds {foreign[0]!r}, which an export does not write; {why}: move it away or choose another OUT")


def _is_export_config(path: Path) -> bool:
    """A cores checkpoint config that :func:`export_checkpoint` wrote (it records its source);
    a copied training checkpoint has none."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return False
    extra = meta.get("extra")
    return isinstance(extra, dict) and "exported_from" in extra


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the export of ``checkpoint`` to ``out`` (atomically) and return ``out``."""
    src, dest = Path(checkpoint), Path(out)
    check_export_target(src, dest, overwrite)
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
    # merged in fp32 (exact), then stored at the asked dtype with position buffers kept in fp32
    cast_for_run(model, torch_dtype)
    with atomic_directory(dest) as tmp:
        # first: save_checkpoint swaps its own complete directory in at ``tmp``
        save_checkpoint(model, tmp, extra={"exported_from": str(src.resolve()), "dtype": dtype})
        merged.save_pretrained(tmp / "llava", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "llava")
    return dest

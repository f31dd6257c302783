"""Getting a ready-to-run model for inference: from a checkpoint, or a preset's random weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import load_model_config
from ..configio import apply_overrides
from ..contexts import ExemplarSampler, load_library
from ..errors import CoresError
from ..model.builder import build_model
from ..model.cores import CoresModel
from .checkpoint import CheckpointReport, load_checkpoint, read_checkpoint_config


@dataclass
class LoadedModel:
    model: CoresModel
    source: str
    """The checkpoint path, or ``preset:NAME (random weights)``."""
    random_weights: bool
    report: CheckpointReport | None


def load_for_inference(
    checkpoint: str | Path | None,
    preset: str | None,
    overrides: list[str],
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> LoadedModel:
    if checkpoint is not None and preset is not None:
        raise CoresError("give either --checkpoint or --preset, not both")
    if checkpoint is not None:
        cfg = apply_overrides(read_checkpoint_config(checkpoint), overrides)
        model, report = load_checkpoint(checkpoint, overrides=cfg)
        loaded = LoadedModel(model, str(checkpoint), False, report)
    elif preset is not None:
        cfg = load_model_config(preset, None, overrides)
        torch.manual_seed(seed)
        loaded = LoadedModel(build_model(cfg), f"preset:{preset} (random weights)", True, None)
    else:
        raise CoresError("no model given: pass --checkpoint DIR (or --preset tiny for a smoke run with random weights)")
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def exemplar_sampler(model: CoresModel, library: str | Path | None, seed: int) -> ExemplarSampler | None:
    """The sampler for the model's ``in_context_k`` (None when k = 0)."""
    if model.cfg.prompt.in_context_k <= 0:
        return None
    path = library or model.cfg.prompt.context_library
    return ExemplarSampler(load_library(path), seed)

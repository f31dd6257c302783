"""Getting a ready-to-run model for inference: from a checkpoint, or a preset's random weights."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..config import load_model_config
from ..configio import apply_overrides
from ..contexts import ExemplarSampler, load_library
from ..errors import CoresError
from ..model.builder import build_model
from ..model.cores import CoresModel
from .checkpoint import CheckpointReport, load_checkpoint, read_checkpoint_config


EMBEDDED_SOURCE = "embedded:tiny-synthetic"


def embedded_checkpoint() -> Path | None:
    """The tiny checkpoint shipped in the package (trained on the synthetic benchmark with the
    ``tiny-synthetic`` recipe; docs/RESULTS.md), used when no model is named."""
    path = Path(str(resources.files("cores_cli") / "assets" / "demo"))
    return path if (path / "config.json").is_file() else None


@dataclass
class LoadedModel:
    model: CoresModel
    source: str
    """The checkpoint path, ``embedded:tiny-synthetic``, or ``preset:NAME (random weights)``."""
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
    source = str(checkpoint) if checkpoint is not None else None
    if checkpoint is None and preset is None:
        checkpoint = embedded_checkpoint()
        if checkpoint is None:
            raise CoresError("no model given and no embedded default in this install: pass --checkpoint DIR (or --preset tiny for a smoke run with random weights)")
        source = EMBEDDED_SOURCE
    if checkpoint is not None:
        cfg = apply_overrides(read_checkpoint_config(checkpoint), overrides)
        model, report = load_checkpoint(checkpoint, overrides=cfg)
        loaded = LoadedModel(model, source, False, report)
    else:
        cfg = load_model_config(preset, None, overrides)
        torch.manual_seed(seed)
        loaded = LoadedModel(build_model(cfg), f"preset:{preset} (random weights)", True, None)
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def exemplar_sampler(model: CoresModel, library: str | Path | None, seed: int) -> ExemplarSampler | None:
    """The sampler for the model's ``in_context_k`` (None when k = 0)."""
    if model.cfg.prompt.in_context_k <= 0:
        return None
    path = library or model.cfg.prompt.context_library
    return ExemplarSampler(load_library(path), seed)

"""Getting a ready-to-run model for inference: from a checkpoint (a directory or a Hugging Face
Hub id), or a preset's random weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..bundled import EMBEDDED_SOURCE, embedded_checkpoint
from ..config import load_model_config
from ..configio import apply_overrides
from ..contexts import ExemplarSampler, load_library
from ..errors import CheckpointError, CoresError
from ..hub import looks_like_hub_id, model_snapshot, snapshot
from ..model.builder import build_model
from ..model.cores import CoresModel
from ..model.mllm import LlavaLoading, not_hf_llava_hint
from ..model.precision import cast_for_run
from .checkpoint import CheckpointReport, load_checkpoint, read_checkpoint_config

if TYPE_CHECKING:
    from .predictor import Predictor


def is_training_run(path: Path) -> bool:
    """A ``cores train`` output directory (``RUN/checkpoints/``) rather than a checkpoint itself."""
    return path.is_dir() and (path / "checkpoints").is_dir() and not (path / "config.json").exists()


def checkpoint_of_run(run: Path) -> Path:
    """The checkpoint a training run directory stands for: ``checkpoints/best`` when validation
    wrote one, else the newest complete step checkpoint (what ``latest`` names)."""
    from .train_state import find_resume_checkpoint

    root = run / "checkpoints"
    best = root / "best"
    # best/ is written atomically, so its config.json marks it complete.
    if (best / "config.json").is_file():
        return best
    latest = find_resume_checkpoint(root)
    if latest is None:
        raise CoresError(f"{run} is a training run with no complete checkpoint yet: wait for its first save (train.save_every) or pass a checkpoint directory")
    return latest


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint directory for ``ref``: the directory itself when it is one; for a training
    run directory, its ``checkpoints/best`` or else its latest complete step checkpoint (the
    returned path says which); else, for an ``org/name[@revision]`` id, the repository's
    snapshot in the Hugging Face cache (fetched when online; ``HF_HOME`` and
    ``HF_HUB_OFFLINE=1`` honoured, a token read from the environment only). A path that exists
    nowhere is returned as given, for the loader to name it."""
    path = Path(ref)
    if is_training_run(path):
        return checkpoint_of_run(path)
    text = os.fspath(ref)
    if path.exists() or not looks_like_hub_id(text):
        return path
    # config.json first: a LISA or original-LLaVA repository is named before gigabytes come down
    hint = not_hf_llava_hint(snapshot(text, "checkpoint", ("config.json",)), name=text)
    if hint is not None:
        raise CheckpointError(hint)
    return model_snapshot(text, "checkpoint")


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
    llava_loading: LlavaLoading | None = None,
) -> LoadedModel:
    if checkpoint is not None and preset is not None:
        raise CoresError("give either --checkpoint or --preset, not both")
    if llava_loading is not None and llava_loading.managed:
        check_llava_loading(llava_loading, device)
    source = str(checkpoint) if checkpoint is not None else None
    if checkpoint is None and preset is None:
        checkpoint = embedded_checkpoint()
        if checkpoint is None:
            raise CoresError("no model given and no embedded default in this install: pass --checkpoint DIR (or --preset tiny for a smoke run with random weights)")
        source = EMBEDDED_SOURCE
    if checkpoint is not None:
        resolved = resolve_checkpoint(checkpoint)
        if is_training_run(Path(checkpoint)):
            source = str(resolved)  # the record names the checkpoint the run directory resolved to
        checkpoint = resolved
        cfg = apply_overrides(read_checkpoint_config(checkpoint), overrides)
        model, report = load_checkpoint(checkpoint, overrides=cfg, dtype=dtype, device=device, llava_loading=llava_loading)
        loaded = LoadedModel(model, source, False, report)
    else:
        cfg = load_model_config(preset, None, overrides)
        with torch.random.fork_rng(devices=_rng_devices(device)):  # the caller's random state stays as it was
            torch.manual_seed(seed)
            loaded = LoadedModel(build_model(cfg, dtype=dtype, device=device, llava_loading=llava_loading), f"preset:{preset} (random weights)", True, None)
    # built on the device at the dtype already: this only settles what a checkpoint's own
    # precision or an override left elsewhere; a quantized / device-mapped LLaVA stays put
    managed = llava_loading is not None and llava_loading.managed
    cast_for_run(loaded.model, dtype, device, skip=(loaded.model.mllm,) if managed else ()).eval()
    return loaded


def check_llava_loading(loading: LlavaLoading, device: torch.device) -> None:
    """Quantized or device-mapped loading needs CUDA (and bitsandbytes to quantize): said in
    one line before anything loads."""
    asked = " and ".join(part for part in (loading.quantize and f"--quantize {loading.quantize}", loading.device_map and f"--device-map {loading.device_map}") if part)
    if device.type != "cuda":
        raise CoresError(f"{asked} needs a CUDA GPU (bitsandbytes and accelerate place the model there), and this run is on {device}: drop the option, or run where a GPU is visible")
    if loading.quantize is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise CoresError(f'{asked} needs bitsandbytes: pip install "cores[quantize]"') from None


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA generators a random build on ``device`` draws from (for ``fork_rng``)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def exemplar_sampler(model: CoresModel, library: str | Path | None, seed: int) -> ExemplarSampler | None:
    """The sampler for the model's ``in_context_k`` (None when k = 0)."""
    if model.cfg.prompt.in_context_k <= 0:
        return None
    path = library or model.cfg.prompt.context_library
    return ExemplarSampler(load_library(path), seed)


def load_predictor(
    checkpoint: str | Path | None,
    preset: str | None,
    overrides: list[str],
    device: str,
    dtype: str,
    context_library: str | Path | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    quantize: str | None = None,
    device_map: str | None = None,
) -> tuple[Predictor, LoadedModel, dict]:
    """The model, ready to predict with (``cores predict`` and the Python API), and the record's
    ``model`` entry. ``device``/``dtype`` are names (``auto``, ``cpu``, ``bf16``...)."""
    from ..runtime import resolve_device, resolve_dtype
    from .predictor import Predictor

    loading = LlavaLoading(quantize, device_map)  # refuses unknown values before anything else
    dev = resolve_device(device)
    loaded = load_for_inference(checkpoint, preset, overrides, dev, resolve_dtype(dtype, dev), seed, loading)
    predictor = Predictor(loaded.model, exemplar_sampler(loaded.model, context_library, seed), seed=seed, max_new_tokens=max_new_tokens)
    model_info = {"source": loaded.source, "preset": loaded.model.cfg.preset, "chain_depth": loaded.model.cfg.chain.depth}
    return predictor, loaded, model_info

"""Training checkpoints: a cores checkpoint plus ``train_state/``, written atomically.

Layout of a run directory::

    runs/NAME/
      recipe.yaml                 the resolved recipe (``--resume`` reads it)
      metrics.jsonl               one line per step and per validation
      checkpoints/
        step-000100/              a cores checkpoint (config.json, tokenizer/, adapter/,
          train_state/            weights.safetensors) that ``cores predict -c`` loads, plus:
            state.json            step, samples consumed, scheduler, best gIoU, Python/NumPy RNG per rank
            optimizer.safetensors AdamW moments per parameter name (+ fp32 master weights in bf16)
            rng.safetensors       torch CPU/CUDA RNG states per rank
        latest                    "step-000100": the newest complete checkpoint
        best/                     the checkpoint with the best validation gIoU (model only)

A step directory is built under a temporary name and renamed into place in one step, and
``latest`` is replaced atomically after it, so a kill at any instant leaves the previous
checkpoint whole and ``latest`` naming a complete one. Nothing here is a pickle.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..fileio import atomic_directory, atomic_write_json, atomic_write_text
from .checkpoint import save_checkpoint

STATE_FORMAT = "cores-train-state"
STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
FAULT_ENV = "CORES_TEST_FAULT"
"""Test-only fault injection: ``kill-during-save:STEP`` or ``kill-after-save:STEP`` SIGKILLs the
process at that point of saving that step (how the tests prove the atomicity)."""


@dataclass
class TrainState:
    """Where a run is; everything here goes to ``state.json``."""

    step: int = 0
    samples_consumed: int = 0
    optimizer_steps: int = 0
    elapsed_s: float = 0.0
    best_giou: float | None = None
    best_step: int | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    rng: list[dict[str, Any]] = field(default_factory=list)
    """Per rank: ``python`` (random.getstate) and ``numpy`` (np.random.get_state) as JSON."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory that holds ``checkpoint`` (``RUN/checkpoints/NAME``, symlinks resolved),
    or None for a checkpoint outside a training run.

    A folder merely named ``checkpoints`` is not enough (``~/checkpoints/model`` must not make
    ``~`` a run): one of the layout's own files must be there too.
    """
    ckpt = Path(checkpoint).resolve()
    root = ckpt.parent
    if root.name != "checkpoints":
        return None
    run = root.parent
    marks = (ckpt / "train_state", root / "latest", root / "best.json", run / "recipe.yaml", run / "metrics.jsonl")
    return run if any(m.exists() for m in marks) else None


# ------------------------------------------------------------------------------ RNG states


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's RNG states: JSON-able Python/NumPy parts and torch tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def restore_rng(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ writing


def _fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_training_checkpoint(
    model: torch.nn.Module,
    root: Path,
    state: TrainState,
    optimizer_tensors: dict[str, torch.Tensor],
    rng_tensors: list[dict[str, torch.Tensor]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step-N`` (model + train state) atomically, then point ``latest`` at it.
    Rank 0 only; the caller gathered the optimizer and RNG states of every rank."""
    dest = root / step_name(state.step)
    with atomic_directory(dest) as tmp:
        save_checkpoint(model, tmp, extra={**(extra or {}), "step": state.step})
        ts = tmp / "train_state"
        ts.mkdir()
        save_file(optimizer_tensors, str(ts / "optimizer.safetensors"), metadata={"format": STATE_FORMAT})
        _fault("kill-during-save", state.step)
        flat = {f"rank{r}.{k}": v.contiguous() for r, part in enumerate(rng_tensors) for k, v in part.items()}
        save_file(flat, str(ts / "rng.safetensors"), metadata={"format": STATE_FORMAT})
        meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **asdict(state)}
        (ts / "state.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    atomic_write_text(root / "latest", dest.name + "\n")
    _fault("kill-after-save", state.step)
    return dest


def write_best(model: torch.nn.Module, root: Path, step: int, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    dest = root / "best"
    save_checkpoint(model, dest, extra={**(extra or {}), "step": step, "metrics": metrics})
    atomic_write_json(root / "best.json", {"step": step, "metrics": metrics})
    return dest


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest step checkpoints (never the one ``latest`` names)."""
    if keep <= 0:
        return []
    latest = read_latest_name(root)
    steps = sorted(complete_step_dirs(root), key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    removed = []
    for p in steps[:-keep]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------ reading


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "weights.safetensors", "train_state/state.json", "train_state/optimizer.safetensors", "train_state/rng.safetensors"))


def complete_step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and is_complete(p)]


def read_latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names; if that is missing or incomplete, the newest complete one."""
    name = read_latest_name(root)
    if name and STEP_DIR.match(name) and is_complete(root / name):
        return root / name
    found = complete_step_dirs(root)
    return max(found, key=lambda p: int(STEP_DIR.match(p.name).group(1))) if found else None


def remove_partial_writes(root: Path) -> None:
    """Temporary directories left by a run killed mid-save (never a complete checkpoint)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def read_train_state(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    ts = path / "train_state"
    try:
        meta = json.loads((ts / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ts / 'state.json'} is missing or not valid JSON: {exc}") from None
    if meta.get("format") != STATE_FORMAT or meta.get("format_version") != STATE_VERSION:
        raise CheckpointError(f"{ts / 'state.json'} is not a cores training state of version {STATE_VERSION}")
    fields = {k: meta[k] for k in TrainState.__dataclass_fields__ if k in meta}
    state = TrainState(**fields)
    try:
        optimizer = load_file(str(ts / "optimizer.safetensors"))
        flat = load_file(str(ts / "rng.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{ts}: unreadable state file: {str(exc).splitlines()[0]}") from None
    ranks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        rank, _, kind = key.partition(".")
        ranks.setdefault(int(rank[4:]), {})[kind] = value
    return state, optimizer, [ranks[r] for r in sorted(ranks)]

"""Device and dtype are chosen once, here, by the caller; model code follows its tensors.

Every command's device goes through :func:`resolve_device`: ``--device`` of eval and predict,
and training's ``train.device``.
"""

from __future__ import annotations

import torch

from .errors import CoresError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str = "auto", *, setting: str = "device", hint: str = "") -> torch.device:
    """``auto`` = CUDA when a GPU is visible, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` as
    named. ``setting`` names where the value came from in errors (``device`` for an option,
    ``train.device`` for a recipe) and ``hint`` says what to do instead of asking for a GPU that
    is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name) if isinstance(name, str) else None
    except RuntimeError:
        device = None
    # other device types (mps, xpu, meta...) are not ones cores is built and tested for
    if device is None or device.type not in ("cpu", "cuda"):
        raise CoresError(f"unknown {setting} {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CoresError(f"{setting} {name!r} asked for, but no CUDA GPU is visible" + (f"; {hint}" if hint else ""))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CoresError(f"{setting} {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on a GPU (as LISA/CoReS train and infer), fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise CoresError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16") from None

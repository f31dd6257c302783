"""Reading ``.pth`` / ``.bin`` tensor files safely: tensors only, memory-mapped where possible."""

from __future__ import annotations

from pathlib import Path

import torch


def load_pth(path: str | Path) -> dict:
    """The file's tensors without unpickling code (``weights_only``), memory-mapped (no second
    copy of a multi-GB file in RAM); files in torch's legacy (pre-zip) format cannot be mapped
    and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)

"""Reading the tensors of an original-format checkpoint directory, one tensor at a time.

LISA ships ``pytorch_model-0000i-of-0000n.bin`` shards with ``pytorch_model.bin.index.json``;
re-saved copies use safetensors shards and ``model.safetensors.index.json``; small ones a single
``pytorch_model.bin`` or ``model.safetensors``. ``.bin`` files are read with
``torch.load(weights_only=True, mmap=True)``: tensors only, nothing unpickled that could run code,
and no second copy of a 10 GB shard in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from ..model.tensor_files import load_pth

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class SourceWeights:
    """Name → tensor of a checkpoint directory, read lazily file by file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files = _weight_map(self.directory)
        # one file open at a time: a legacy .bin cannot be memory-mapped and is read whole, and
        # keeping every shard of a 13B model would be a second copy of it
        self._open: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.files[name]
        handle = self._open.get(path)
        if handle is None:
            self._open.clear()
            handle = self._open[path] = _open(path)
        if isinstance(handle, dict):
            tensor = handle.get(name)
            if tensor is None:
                raise CheckpointError(f"{path.name} does not hold {name}, though the index says it does")
            return tensor
        try:
            return handle.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: cannot read {name}: {exc}") from None

    def close(self) -> None:
        self._open.clear()


def _weight_map(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for index in INDEX_FILES:
        path = directory / index
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path} is not a weight index (no weight_map): {exc}") from None
            files = {name: directory / file for name, file in weight_map.items()}
            missing = sorted({p.name for p in files.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{path} names {len(missing)} shard(s) that are not there: {', '.join(missing[:3])}")
            return files
    for single in SINGLE_FILES:
        path = directory / single
        if path.is_file():
            handle = _open(path)
            names = handle.keys()
            return {name: path for name in names}
    raise CheckpointError(f"{directory} has no weights: none of {', '.join(INDEX_FILES + SINGLE_FILES)}")


def _open(path: Path):
    """A safetensors handle, or the dict of a ``.bin`` (memory-mapped where its format allows)."""
    if path.suffix == ".safetensors":
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        state = load_pth(path)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path} could not be read safely (tensors only): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state

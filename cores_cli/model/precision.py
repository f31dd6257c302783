"""One numeric policy for training and inference: weights in the run's dtype, positions in fp32.

Rotary frequencies and SAM's random Fourier matrix turn a position into an angle. In bf16 (8
mantissa bits) Llama's angle at position 700 is off by up to about 1 rad, so these buffers stay
fp32 whether a model is prepared for training (before DeepSpeed, which casts parameters only) or
for eval/predict. The modules that read them compute in fp32 and cast the result to the
activations' dtype (transformers' rotary embedding; ``chain.image_positional_encoding`` for SAM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

POSITION_BUFFERS = frozenset(
    {
        "inv_freq",  # Llama rotary frequencies
        "original_inv_freq",  # the copy dynamic rope scaling resets to
        "cos_cached",  # rotary caches of older transformers / other models
        "sin_cached",
        "_cos_cached",
        "_sin_cached",
        "positional_encoding_gaussian_matrix",  # SAM's PositionEmbeddingRandom
    }
)
"""Buffer names (the last part of a dotted name) that carry positions and stay fp32."""

M = TypeVar("M", bound=nn.Module)


def is_position_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in POSITION_BUFFERS


def cast_for_run(model: M, dtype: torch.dtype, device: torch.device | str | None = None, skip: tuple[nn.Module, ...] = ()) -> M:
    """Parameters and ordinary float buffers to ``dtype`` (and ``device``), position buffers to
    fp32 there; in place, returning ``model``. Training and eval/predict both go through here.
    ``skip``: direct children left as they are (a LLaVA that transformers quantized or spread
    over several GPUs is placed already and cannot be cast)."""
    if skip:
        for child in model.children():
            if not any(child is s for s in skip):
                cast_for_run(child, dtype, device)
        return model
    kept = [(module, key, buf) for module in model.modules() for key, buf in module._buffers.items() if buf is not None and key in POSITION_BUFFERS]
    model.to(device=device, dtype=dtype)
    for module, key, buf in kept:
        target = buf.device if device is None else torch.device(device)
        module._buffers[key] = _as_fp32(module, key, buf).to(device=target)
    return model


def _as_fp32(module: nn.Module, key: str, buf: torch.Tensor) -> torch.Tensor:
    """The buffer in fp32; rotary frequencies already rounded to a lower precision are
    recomputed from the module's config rather than widened with their rounding error."""
    if buf.dtype == torch.float32:
        return buf
    if key in ("inv_freq", "original_inv_freq") and buf.device.type != "meta":
        fresh = _rotary_frequencies(module)
        if fresh is not None and fresh.shape == buf.shape:
            return fresh.to(buf.device)
    return buf.float()


def _rotary_frequencies(module: nn.Module) -> torch.Tensor | None:
    config, rope_type = getattr(module, "config", None), getattr(module, "rope_type", None)
    if config is None or rope_type is None:
        return None
    if rope_type == "default" and hasattr(module, "compute_default_rope_parameters"):
        init = module.compute_default_rope_parameters
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS.get(rope_type)
        if init is None:
            return None
    with default_dtype(torch.float32):
        inv_freq, _ = init(config)
    return inv_freq.float()


def position_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every position buffer by its dotted name (for checks and tests)."""
    return {name: buf for name, buf in model.named_buffers() if is_position_buffer(name)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point tensors in ``dtype`` inside the block (so a model is built at the
    run's dtype, never as an fp32 copy first); the previous default comes back after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)

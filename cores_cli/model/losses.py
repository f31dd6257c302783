"""Mask and text losses (paper eq. 1 and 6).

Mask losses take logits and targets on the same grid and a ``valid`` map of pixels that count
(the SAM input's padding does not). Each mask's loss is averaged over its valid pixels, then
over masks, as in LISA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over masks of the per-mask mean BCE over valid pixels. Shapes (N, H, W)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * valid
    per_mask = per_pixel.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    return per_mask.mean()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over masks of 1 − (2|P∩T| + s) / (|P| + |T| + s) on valid pixels. Shapes (N, H, W).

    ``smooth`` is in pixels: an empty prediction on an empty target scores a loss of 0.
    """
    probs = torch.sigmoid(logits) * valid
    targets = targets * valid
    inter = (probs * targets).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + targets.flatten(1).sum(1)
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over the supervised answer tokens. ``logits`` (K, V) predict ``targets`` (K,)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)

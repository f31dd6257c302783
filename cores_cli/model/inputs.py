"""What the model takes: a collated :class:`Batch` (built by ``cores_cli.processing``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A collated batch. B sequences, L tokens, I distinct images, N targets (one per chain)."""

    sam_images: torch.Tensor
    """(I, 3, S, S) float: each distinct image once (I ≤ B)."""
    clip_images: torch.Tensor
    """(B, 3, C, C) float: per sequence."""
    input_ids: torch.Tensor
    """(B, L) long."""
    attention_mask: torch.Tensor
    """(B, L) long."""
    labels: torch.Tensor
    """(B, L) long, ``IGNORE_INDEX`` (-100) outside the answers."""
    target_row_index: torch.Tensor
    """(N,) long: the row (token sequence) of each target."""
    row_image_index: torch.Tensor
    """(B,) long: the row of ``sam_images`` each sequence is about (rows may share an image)."""
    targets: torch.Tensor | None
    """(N, S, S) uint8 in {0, 1, ``IGNORE``}, or None."""
    input_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    sample_ids: list[str]
    questions: list[list[str]]
    sam_digests: list[str] | None = None
    """One digest per ``sam_images`` row of what SAM's encoder is given (the embedding cache's
    key), or None when the processor made none."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        def mv(x: torch.Tensor | None, float_like: bool = False) -> torch.Tensor | None:
            if x is None:
                return None
            return x.to(device=device, dtype=dtype) if (float_like and dtype is not None) else x.to(device)

        return Batch(
            sam_images=mv(self.sam_images, True),
            clip_images=mv(self.clip_images, True),
            input_ids=mv(self.input_ids),
            attention_mask=mv(self.attention_mask),
            labels=mv(self.labels),
            target_row_index=mv(self.target_row_index),
            row_image_index=mv(self.row_image_index),
            targets=mv(self.targets),
            input_sizes=self.input_sizes,
            original_sizes=self.original_sizes,
            sample_ids=self.sample_ids,
            questions=self.questions,
            sam_digests=self.sam_digests,
        )

    @property
    def num_targets(self) -> int:
        return int(self.target_row_index.numel())

    @property
    def target_image_index(self) -> torch.Tensor:
        """(N,) the ``sam_images`` row of each target."""
        return self.row_image_index[self.target_row_index]

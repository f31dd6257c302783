"""The one shared record → tensor path: image preprocessing for SAM and CLIP, target masks in
SAM's input frame, the encoded conversation, and the collate into a :class:`Batch`.

SAM sees the image resized so its longest side is ``sam.image_size`` (as SAM's
``ResizeLongestSide``), normalised, and zero-padded at the bottom/right to a square. Training
targets are drawn at the image's own size, resized the same way (nearest), and padded with
255, which the loss leaves out. Label-``ignore`` pixels (255 in a record's mask) count as
background in training, as in LISA; evaluation compares at the original size instead.

Any size from 1×1 and any aspect ratio is accepted: a resized side never rounds down to zero
pixels, and a very long, thin image is never blown up to a huge square on the way to the CLIP
tower's input (see :func:`clip_image`).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig
from ..contexts import ExemplarSampler
from ..images import DEFAULT_MAX_PIXELS, load_image
from ..model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from .conversation import ConversationEncoder, format_question, pick_answers
from .records import IGNORE, SegSample


# Beyond this aspect ratio the CLIP input is made by a route whose intermediate image stays
# small (the same picture, up to resampling): the LLaVA/CLIP route would build a padded square of
# side 20000 (1.2 GB) for a 20000×20 image, or resize a 1×5000 strip to 224×1120000. Up to this
# ratio the result is exactly what it always was.
_EXACT_ROUTE_MAX_ASPECT = 4


def longest_side_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """(h, w) with the longest side ``target`` and rounding as SAM's ``ResizeLongestSide``.

    The short side is at least 1 pixel: SAM's rounding gives 0 beyond an aspect ratio of
    ``2 * target`` (above 256:1 on the tiny preset), which no resize can produce.
    """
    scale = target / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _resize(pixels: np.ndarray, size_hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    h, w = size_hw
    if pixels.shape[:2] == (h, w):
        return pixels
    return np.array(Image.fromarray(pixels).resize((w, h), resample, reducing_gap=3.0 if resample != Image.NEAREST else None))


def sam_image(pixels: np.ndarray, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (H, W, 3) → normalised, padded float (3, S, S) and the resized (h, w)."""
    h, w = longest_side_shape(pixels.shape[0], pixels.shape[1], image_size)
    small = _resize(pixels, (h, w), Image.BILINEAR)
    x = torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1).float()
    x = (x - torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    out = torch.zeros(3, image_size, image_size)
    out[:, :h, :w] = x
    return out, (h, w)


def sam_target(mask: np.ndarray, input_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """uint8 (H, W) in {0, 1, 255} → uint8 (S, S): resized like the image, padding = 255."""
    small = _resize(mask, input_size, Image.NEAREST)
    out = torch.full((image_size, image_size), IGNORE, dtype=torch.uint8)
    out[: input_size[0], : input_size[1]] = torch.from_numpy(np.ascontiguousarray(small))
    return out


def clip_image(pixels: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...], mode: str) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, size, size) for the CLIP tower.

    ``crop``: shortest side to ``size``, centre crop (CLIPImageProcessor, LISA). ``pad``: pad to a
    square with the mean colour, then resize (LLaVA-1.5's training), so no part of the image is
    cut away. Beyond an aspect ratio of 4:1 the image is shrunk before padding, or its centre
    square cut before resizing, so that no intermediate is much larger than the image.
    """
    if mode == "pad":
        fill = np.array([int(round(m * 255)) for m in mean], dtype=np.uint8)
        square = _pad_to_square(pixels, size, fill)
    else:
        square = _centre_crop_square(pixels, size)
    x = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _is_extreme(h: int, w: int) -> bool:
    return max(h, w) > _EXACT_ROUTE_MAX_ASPECT * min(h, w)


def _pad_to_square(pixels: np.ndarray, size: int, fill: np.ndarray) -> np.ndarray:
    """The image centred on a ``fill``-coloured square, at ``size`` × ``size``."""
    h, w = pixels.shape[:2]
    if _is_extreme(h, w):
        # Shrink first, then pad: the same picture without a full-size square in memory.
        nh, nw = longest_side_shape(h, w, size)
        content, side = _resize(pixels, (nh, nw), Image.BICUBIC), size
    else:
        # LLaVA's expand2square, then one resize of the whole square.
        content, side = pixels, max(h, w)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    ch, cw = content.shape[:2]
    top, left = (side - ch) // 2, (side - cw) // 2
    canvas[top : top + ch, left : left + cw] = content
    return _resize(canvas, (size, size), Image.BICUBIC)


def _centre_crop_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """The shortest side resized to ``size`` and the centre ``size`` × ``size`` cut out."""
    h, w = pixels.shape[:2]
    if _is_extreme(h, w):
        # Cut the centre square first, then resize it: the same window without resizing the
        # whole strip (a 1×5000 image would become 224×1120000).
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _resize(pixels[top : top + side, left : left + side], (size, size), Image.BICUBIC)
    scale = size / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    resized = _resize(pixels, (nh, nw), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


def sample_pixels(sample: SegSample, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A record's image as upright uint8 (H, W, 3): in memory, or read from its path."""
    if sample.image_array is not None:
        return np.asarray(sample.image_array, dtype=np.uint8)
    return load_image(sample.image_path, max_pixels).pixels


@dataclass
class EncodedSample:
    sample_id: str
    sam_image: torch.Tensor
    """(3, S, S) float."""
    clip_image: torch.Tensor
    """(3, C, C) float."""
    input_ids: list[int]
    labels: list[int]
    targets: torch.Tensor | None
    """(R, S, S) uint8 in {0, 1, 255}; None when the record has no masks (prediction)."""
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    questions: list[str]
    answers: list[str] | None
    exemplars_used: int = 0
    query_truncated: bool = False
    meta: dict = field(default_factory=dict)
    image_key: str = ""
    """Rows with the same non-empty key share one image (one SAM encoder pass); "" = own image."""


class SampleTransform:
    """Record → :class:`EncodedSample`. ``train=True`` draws answer phrasings at random and
    treats label-ignore as background; otherwise the fixed phrasing is used."""

    def __init__(
        self,
        cfg: ModelConfig,
        encoder: ConversationEncoder,
        sampler: ExemplarSampler | None,
        clip_size: int,
        train: bool = False,
        seed: int | None = None,
        with_targets: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.cfg = cfg
        self.encoder = encoder
        self.sampler = sampler
        self.clip_size = clip_size
        self.train = train
        self.rng = random.Random(seed) if train else None
        self.with_targets = with_targets
        self.max_pixels = max_pixels

    def pixels(self, sample: SegSample) -> np.ndarray:
        return sample_pixels(sample, self.max_pixels)

    def __call__(self, sample: SegSample, pixels: np.ndarray | None = None, generate: bool = False, exemplar_key: str | None = None) -> EncodedSample:
        """Encode all rounds of ``sample`` as one conversation.

        ``exemplar_key`` makes the exemplar draw a function of that key alone (evaluation: the
        same exemplars for a query whatever the batch order or the number of processes).
        """
        pixels = self.pixels(sample) if pixels is None else pixels
        s_img, input_size = sam_image(pixels, self.cfg.sam.image_size)
        c_img = self._clip(pixels)
        return self._encode(sample, pixels, s_img, c_img, input_size, generate, exemplar_key)

    def per_round(self, sample: SegSample, pixels: np.ndarray | None = None) -> list[EncodedSample]:
        """One single-question conversation per round, all sharing one image (LISA's
        evaluation: each sentence is asked on its own)."""
        pixels = self.pixels(sample) if pixels is None else pixels
        s_img, input_size = sam_image(pixels, self.cfg.sam.image_size)
        c_img = self._clip(pixels)
        out = []
        for i, r in enumerate(sample.rounds):
            one = dataclasses.replace(sample, sample_id=f"{sample.sample_id}#{i}", rounds=(r,))
            enc = self._encode(one, pixels, s_img, c_img, input_size, False, one.sample_id)
            enc.image_key = sample.sample_id
            out.append(enc)
        return out

    def _clip(self, pixels: np.ndarray) -> torch.Tensor:
        m = self.cfg.mllm
        return clip_image(pixels, self.clip_size, m.image_mean, m.image_std, m.image_mode)

    def _encode(self, sample, pixels, s_img, c_img, input_size, generate, exemplar_key) -> EncodedSample:
        cfg = self.cfg
        questions = [format_question(r.query, r.style) for r in sample.rounds]
        answers = None if generate else pick_answers(cfg.chain, len(questions), self.rng, cfg.prompt.answer_template)
        k = cfg.prompt.in_context_k
        exemplars = []
        if self.sampler is not None and k > 0:
            exemplars = self.sampler.sample_for(exemplar_key, k) if exemplar_key is not None else self.sampler.sample(k)
        enc = self.encoder.encode(questions, answers, exemplars, sample.sample_id)
        targets = None
        if self.with_targets and not generate:
            h, w = pixels.shape[:2]
            masks = []
            for r in sample.rounds:
                m = r.target.rasterize(h, w)
                if self.train:
                    m = np.where(m == IGNORE, 0, m).astype(np.uint8)
                masks.append(sam_target(m, input_size, cfg.sam.image_size))
            targets = torch.stack(masks)
        return EncodedSample(
            sample_id=sample.sample_id,
            sam_image=s_img,
            clip_image=c_img,
            input_ids=enc.input_ids,
            labels=enc.labels,
            targets=targets,
            original_size=(pixels.shape[0], pixels.shape[1]),
            input_size=input_size,
            questions=questions,
            answers=answers,
            exemplars_used=enc.exemplars_used,
            query_truncated=enc.query_truncated,
            meta=dict(sample.meta),
        )


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
    """(B, L) long, -100 outside the answers."""
    target_row_index: torch.Tensor
    """(N,) long: the row (token sequence) of each target."""
    row_image_index: torch.Tensor
    """(B,) long: the row of ``sam_images`` each sequence is about (rows may share an image)."""
    targets: torch.Tensor | None
    """(N, S, S) uint8 in {0, 1, 255}, or None."""
    input_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    sample_ids: list[str]
    questions: list[list[str]]

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
        )

    @property
    def num_targets(self) -> int:
        return int(self.target_row_index.numel())

    @property
    def target_image_index(self) -> torch.Tensor:
        """(N,) the ``sam_images`` row of each target."""
        return self.row_image_index[self.target_row_index]


def collate(samples: list[EncodedSample], pad_token_id: int, chains_per_sample: list[int] | None = None, padding_side: str = "right") -> Batch:
    """Pad token sequences (right for teacher forcing, left for generation) and stack.

    ``chains_per_sample`` defaults to one target per question of each sample.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    attn = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(s.labels, dtype=torch.long)
        attn[i, sl] = 1
    counts = chains_per_sample or [len(s.questions) for s in samples]
    index = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    has_targets = all(s.targets is not None for s in samples)
    images: list[torch.Tensor] = []
    slot: dict[str, int] = {}
    row_image = []
    for s in samples:
        if not s.image_key or s.image_key not in slot:
            if s.image_key:
                slot[s.image_key] = len(images)
            row_image.append(len(images))
            images.append(s.sam_image)
        else:
            row_image.append(slot[s.image_key])
    return Batch(
        sam_images=torch.stack(images),
        clip_images=torch.stack([s.clip_image for s in samples]),
        input_ids=ids,
        attention_mask=attn,
        labels=labels,
        target_row_index=index,
        row_image_index=torch.tensor(row_image, dtype=torch.long),
        targets=torch.cat([s.targets for s in samples]) if has_targets else None,
        input_sizes=[s.input_size for s in samples],
        original_sizes=[s.original_size for s in samples],
        sample_ids=[s.sample_id for s in samples],
        questions=[s.questions for s in samples],
    )

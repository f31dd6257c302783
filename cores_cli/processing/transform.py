"""The processor: the one record → tensor path (as transformers keeps ``processing_llava.py``
beside ``modeling_llava.py``): image preprocessing for SAM and CLIP, target masks in SAM's input
frame, the encoded conversation, and the collate into the model's :class:`Batch`.

Build it for a model with :meth:`SampleTransform.for_model`. Training and evaluation records
(:class:`SegSample`, with targets) go through ``transform(sample)``; a prediction has no target
and goes through :meth:`SampleTransform.image` and :meth:`SampleTransform.encode_queries`.

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
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..config import SAM_PIXEL_MEAN, SAM_PIXEL_STD, ModelConfig
from ..contexts import ExemplarSampler
from ..data.records import QueryStyle, SegSample
from ..ignore_values import IGNORE, IGNORE_INDEX
from ..images import DEFAULT_MAX_PIXELS, load_image
from ..model.inputs import Batch
from .conversation import ConversationEncoder, format_question, pick_answers

if TYPE_CHECKING:
    from ..model.cores import CoresModel


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


# Pillow first averages blocks of pixels when shrinking by more than this factor (fast, and the
# result barely differs from a full-support filter).
_REDUCING_GAP = 3.0


def _resize(pixels: np.ndarray, size_hw: tuple[int, int], resample: Image.Resampling, pil: Image.Image | None = None) -> np.ndarray:
    """``pil``: ``pixels`` already as a PIL image (the conversion of a large photo costs as much
    as the resize)."""
    h, w = size_hw
    if pixels.shape[:2] == (h, w):
        return pixels
    return np.array((pil or Image.fromarray(pixels)).resize((w, h), resample, reducing_gap=_REDUCING_GAP if resample != Image.NEAREST else None))


def sam_image(
    pixels: np.ndarray,
    image_size: int,
    mean: Sequence[float] = SAM_PIXEL_MEAN,
    std: Sequence[float] = SAM_PIXEL_STD,
    pil: Image.Image | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (H, W, 3) → normalised, padded float (3, S, S) and the resized (h, w)."""
    return sam_normalise(sam_resized(pixels, image_size, pil), image_size, mean, std)


def sam_resized(pixels: np.ndarray, image_size: int, pil: Image.Image | None = None) -> np.ndarray:
    """uint8 (H, W, 3) → uint8 (h, w, 3) with the longest side ``image_size``: what SAM's
    encoder sees, before normalisation and padding."""
    h, w = longest_side_shape(pixels.shape[0], pixels.shape[1], image_size)
    return _resize(pixels, (h, w), Image.BILINEAR, pil)


def sam_normalise(
    small: np.ndarray, image_size: int, mean: Sequence[float] = SAM_PIXEL_MEAN, std: Sequence[float] = SAM_PIXEL_STD
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The output of :func:`sam_resized` → normalised, padded float (3, S, S) and its (h, w)."""
    h, w = small.shape[:2]
    small = np.ascontiguousarray(small)
    # torch wants writable memory; an image that needed no resize may be the caller's read-only array
    x = torch.from_numpy(small if small.flags.writeable else small.copy()).permute(2, 0, 1).float()
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = torch.zeros(3, image_size, image_size)
    out[:, :h, :w] = x
    return out, (h, w)


def sam_input_digest(small: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """A digest of everything :func:`sam_normalise` makes SAM's input from: the resized pixels
    (≤ 3 MB at 1024², where the float input is 12 MB: benchmarks/cache_keys.py), their shape, the
    square's side and the normalisation. Equal digests, equal inputs."""
    h = hashlib.sha256(f"{small.shape}|{image_size}|{tuple(map(float, mean))}|{tuple(map(float, std))}|".encode())
    h.update(np.ascontiguousarray(small).data)
    return h.hexdigest()


def sam_target(mask: np.ndarray, input_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """uint8 (H, W) in {0, 1, 255} → uint8 (S, S): resized like the image, padding = 255."""
    small = _resize(mask, input_size, Image.NEAREST)
    out = torch.full((image_size, image_size), IGNORE, dtype=torch.uint8)
    out[: input_size[0], : input_size[1]] = torch.from_numpy(np.ascontiguousarray(small))
    return out


def clip_image(
    pixels: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...], mode: str, pil: Image.Image | None = None
) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, size, size) for the CLIP tower.

    ``crop``: shortest side to ``size``, centre crop (CLIPImageProcessor, LISA). ``pad``: pad to a
    square with the mean colour, then resize (LLaVA-1.5's training), so no part of the image is
    cut away. Beyond an aspect ratio of 4:1 the image is shrunk before padding, or its centre
    square cut before resizing, so that no intermediate is much larger than the image.
    """
    if mode == "pad":
        fill = np.array([int(round(m * 255)) for m in mean], dtype=np.uint8)
        square = _pad_to_square(pixels, size, fill, pil)
    else:
        square = _centre_crop_square(pixels, size, pil)
    x = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _is_extreme(h: int, w: int) -> bool:
    return max(h, w) > _EXACT_ROUTE_MAX_ASPECT * min(h, w)


def _pad_to_square(pixels: np.ndarray, size: int, fill: np.ndarray, pil: Image.Image | None = None) -> np.ndarray:
    """The image centred on a ``fill``-coloured square, at ``size`` × ``size``."""
    h, w = pixels.shape[:2]
    if _is_extreme(h, w):
        # Shrink first, then pad: the same picture without a full-size square in memory.
        nh, nw = longest_side_shape(h, w, size)
        content, side, pil = _resize(pixels, (nh, nw), Image.BICUBIC, pil), size, None
    else:
        # LLaVA's expand2square, then one resize of the whole square.
        content, side = pixels, max(h, w)
    top, left = (side - content.shape[0]) // 2, (side - content.shape[1]) // 2
    factor = int(side / size / _REDUCING_GAP) or 1
    if factor > 1:
        return _reduced_square_resize(content, side, top, left, fill, factor, size, pil)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    canvas[top : top + content.shape[0], left : left + content.shape[1]] = content
    return _resize(canvas, (size, size), Image.BICUBIC)


def _reduced_square_resize(
    content: np.ndarray, side: int, top: int, left: int, fill: np.ndarray, factor: int, size: int, pil: Image.Image | None = None
) -> np.ndarray:
    """What ``_resize`` gives for ``content`` placed at (top, left) on a ``fill`` square of
    ``side`` pixels, pixel for pixel, without building that square.

    For a large square ``_resize`` first averages ``factor`` × ``factor`` blocks (Pillow's
    ``reducing_gap`` step), then resamples the reduced square over the box that maps back to the
    original. Blocks that hold only fill average to the fill colour, so only the blocks that touch
    the content need computing: the block-aligned window around it is reduced here and placed on
    a reduced square of fill. A 28 MP photo (5953 px side) then needs a ≈ 400 px square and one
    copy of the image instead of a 106 MB canvas.
    """
    h, w = content.shape[:2]
    y0, x0 = (top // factor) * factor, (left // factor) * factor
    y1, x1 = min(side, -(-(top + h) // factor) * factor), min(side, -(-(left + w) // factor) * factor)
    if (y0, x0, y1, x1) == (top, left, top + h, left + w):
        window = pil or Image.fromarray(content)
    else:
        padded = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        padded[:] = fill
        padded[top - y0 : top - y0 + h, left - x0 : left - x0 + w] = content
        window = Image.fromarray(padded)
    reduced = np.asarray(window.reduce(factor))
    n = -(-side // factor)
    small = np.empty((n, n, 3), dtype=np.uint8)
    small[:] = fill
    small[y0 // factor : y0 // factor + reduced.shape[0], x0 // factor : x0 // factor + reduced.shape[1]] = reduced
    box = (0.0, 0.0, side / factor, side / factor)
    return np.array(Image.fromarray(small).resize((size, size), Image.BICUBIC, box=box))


def _centre_crop_square(pixels: np.ndarray, size: int, pil: Image.Image | None = None) -> np.ndarray:
    """The shortest side resized to ``size`` and the centre ``size`` × ``size`` cut out."""
    h, w = pixels.shape[:2]
    if _is_extreme(h, w):
        # Cut the centre square first, then resize it: the same window without resizing the
        # whole strip (a 1×5000 image would become 224×1120000).
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _resize(pixels[top : top + side, left : left + side], (size, size), Image.BICUBIC)
    # the long side truncated, as CLIPImageProcessor (and so LISA and llava-hf) computes it
    nh, nw = (size, max(size, int(size * w / h))) if h <= w else (max(size, int(size * h / w)), size)
    resized = _resize(pixels, (nh, nw), Image.BICUBIC, pil)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


def sample_pixels(sample: SegSample, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A record's image as upright uint8 (H, W, 3): in memory, or read from its path."""
    if sample.image_array is not None:
        return np.asarray(sample.image_array, dtype=np.uint8)
    return load_image(sample.image_path, max_pixels).pixels


@dataclass
class ImageInputs:
    """One image, made ready for both towers once (all its queries share it)."""

    pixels: np.ndarray
    """uint8 (H, W, 3), upright."""
    sam_image: torch.Tensor
    """(3, S, S) float."""
    clip_image: torch.Tensor
    """(3, C, C) float."""
    input_size: tuple[int, int]
    """(h, w) of the image inside SAM's padded square."""
    sam_digest: str = ""
    """A digest of SAM's input (its resized pixels and normalisation), for the embedding cache;
    "" unless the processor was asked for digests."""

    @property
    def original_size(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


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
    """(R, S, S) uint8 in {0, 1, 255}; None when there is no target (prediction)."""
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    questions: list[str]
    answers: list[str] | None
    exemplars_used: int = 0
    query_truncated: bool = False
    meta: dict = field(default_factory=dict)
    image_key: str = ""
    """Rows with the same non-empty key share one image (one SAM encoder pass); "" = own image."""
    sam_digest: str = ""
    """:attr:`ImageInputs.sam_digest` of the image."""

    def with_answer(self, input_ids: list[int], answer: str) -> EncodedSample:
        """This prompt continued by a generated answer, to be run teacher-forced (no labels)."""
        return dataclasses.replace(self, input_ids=input_ids, labels=[IGNORE_INDEX] * len(input_ids), answers=[answer])


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
        sam_digests: bool = False,
    ) -> None:
        self.cfg = cfg
        self.sam_digests = sam_digests
        self.encoder = encoder
        self.sampler = sampler
        self.clip_size = clip_size
        self.train = train
        self.rng = random.Random(seed) if train else None
        self.with_targets = with_targets
        self.max_pixels = max_pixels

    @classmethod
    def for_model(
        cls,
        model: CoresModel,
        exemplars: ExemplarSampler | None = None,
        *,
        train: bool = False,
        seed: int | None = None,
        with_targets: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sam_digests: bool = False,
    ) -> SampleTransform:
        """The processor of ``model``: its tokenizer, prompt, chain, image token count and
        tower sizes. ``with_targets=False`` skips drawing target masks (prediction);
        ``sam_digests`` gives each image a :attr:`ImageInputs.sam_digest` (embedding cache)."""
        encoder = ConversationEncoder.for_model(model)
        return cls(
            model.cfg, encoder, exemplars, model.clip_size, train=train, seed=seed, with_targets=with_targets, max_pixels=max_pixels, sam_digests=sam_digests
        )

    def reseed(self, answers: int | str | None = None, exemplars: int | str | None = None) -> None:
        """Restart the answer-phrasing draw (training) and the exemplar draw from these seeds,
        so that what a sample gets depends on the seed alone, not on what came before."""
        if answers is not None and self.train:
            self.rng = random.Random(answers)
        if exemplars is not None and self.sampler is not None:
            self.sampler.reseed(exemplars)

    def pixels(self, sample: SegSample) -> np.ndarray:
        return sample_pixels(sample, self.max_pixels)

    def image(self, pixels: np.ndarray) -> ImageInputs:
        """uint8 (H, W, 3) → both towers' inputs."""
        sam = self.cfg.sam
        pil = Image.fromarray(pixels)  # once for both towers
        small = sam_resized(pixels, sam.image_size, pil)
        s_img, input_size = sam_normalise(small, sam.image_size, sam.pixel_mean, sam.pixel_std)
        m = self.cfg.mllm
        c_img = clip_image(pixels, self.clip_size, m.image_mean, m.image_std, m.image_mode, pil)
        digest = sam_input_digest(small, sam.image_size, sam.pixel_mean, sam.pixel_std) if self.sam_digests else ""
        return ImageInputs(pixels, s_img, c_img, input_size, digest)

    def __call__(self, sample: SegSample, pixels: np.ndarray | None = None, generate: bool = False, exemplar_key: str | None = None) -> EncodedSample:
        """Encode all rounds of ``sample`` as one conversation, with its target masks (unless
        ``generate`` or ``with_targets=False``).

        ``exemplar_key`` makes the exemplar draw a function of that key alone (evaluation: the
        same exemplars for a query whatever the batch order or the number of processes).
        """
        image = self.image(self.pixels(sample) if pixels is None else pixels)
        questions = [(r.query, r.style) for r in sample.rounds]
        enc = self.encode_queries(image, questions, sample.sample_id, generate=generate, exemplar_key=exemplar_key, meta=sample.meta)
        if self.with_targets and not generate:
            enc.targets = self._targets(sample, image)
        return enc

    def encode_queries(
        self,
        image: ImageInputs,
        queries: Sequence[tuple[str, QueryStyle]],
        sample_id: str,
        *,
        generate: bool = False,
        exemplar_key: str | None = None,
        image_key: str = "",
        meta: dict | None = None,
    ) -> EncodedSample:
        """One conversation asking ``queries`` (text, style) about ``image``, without targets.
        ``generate`` ends the text where the model's answer begins."""
        cfg = self.cfg
        template = cfg.prompt.template
        questions = [format_question(text, style, template) for text, style in queries]
        answers = None if generate else pick_answers(cfg.chain, len(questions), self.rng, cfg.prompt.answer_template, template)
        k = cfg.prompt.in_context_k
        exemplars = []
        if self.sampler is not None and k > 0:
            exemplars = self.sampler.sample_for(exemplar_key, k) if exemplar_key is not None else self.sampler.sample(k)
        enc = self.encoder.encode(questions, answers, exemplars, sample_id)
        return EncodedSample(
            sample_id=sample_id,
            sam_image=image.sam_image,
            clip_image=image.clip_image,
            input_ids=enc.input_ids,
            labels=enc.labels,
            targets=None,
            original_size=image.original_size,
            input_size=image.input_size,
            questions=questions,
            answers=answers,
            exemplars_used=enc.exemplars_used,
            query_truncated=enc.query_truncated,
            meta=dict(meta or {}),
            image_key=image_key,
            sam_digest=image.sam_digest,
        )

    def _targets(self, sample: SegSample, image: ImageInputs) -> torch.Tensor:
        """(R, S, S) uint8: each round's mask drawn at the image's size, then resized as SAM's input."""
        h, w = image.original_size
        masks = []
        for r in sample.rounds:
            m = r.target.rasterize(h, w)
            if self.train:
                m = np.where(m == IGNORE, 0, m).astype(np.uint8)
            masks.append(sam_target(m, image.input_size, self.cfg.sam.image_size))
        return torch.stack(masks)


def collate(samples: list[EncodedSample], pad_token_id: int, chains_per_sample: list[int] | None = None, padding_side: str = "right") -> Batch:
    """Pad token sequences (right for teacher forcing, left for generation) and stack.

    ``chains_per_sample`` defaults to one target per question of each sample.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
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
    digests: list[str] = []
    slot: dict[str, int] = {}
    row_image = []
    for s in samples:
        if not s.image_key or s.image_key not in slot:
            if s.image_key:
                slot[s.image_key] = len(images)
            row_image.append(len(images))
            images.append(s.sam_image)
            digests.append(s.sam_digest)
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
        sam_digests=digests if all(digests) else None,
    )

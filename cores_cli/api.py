"""The Python API: load a model once, then ask questions about images.

    import cores_cli

    model = cores_cli.load()  # the tiny model shipped with cores; or a checkpoint dir / Hub id
    result = model.predict("photo.jpg", "what gives dogs their sense of smell?")
    result.mask          # bool (H, W) at the image's size, EXIF orientation applied
    result.level_masks   # one mask per chain level ([LOC], ..., [SEG]); the last is result.mask
    result.answer        # the answer text
    result.record        # the record `cores predict --json` prints (no "outputs": nothing written)

An image is a path, a PIL image or a uint8 (H, W, 3) RGB array. Everything goes through the same
:class:`~cores_cli.engine.predictor.Predictor` as ``cores predict`` and ``cores eval``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import numpy as np

from .bundled import EMBEDDED_SOURCE, is_synthetic_scene_size, synthetic_only_warning
from .errors import CoresError
from .images import DEFAULT_MAX_PIXELS, LoadedImage, as_image, check_image

if TYPE_CHECKING:
    from PIL import Image

    from .engine.predictor import Prediction, Predictor
    from .model.cores import CoresModel

ImageLike = Union[str, Path, "Image.Image", np.ndarray]
Style = Literal["auto", "sentence", "phrase"]
Mode = Literal["teacher", "generate"]
STYLES = ("auto", "sentence", "phrase")
MODES = ("teacher", "generate")


@dataclass
class Result:
    """One question's answer about one image."""

    mask: np.ndarray
    """bool (H, W) at the image's (upright) size: the final level."""
    level_masks: list[np.ndarray]
    """One bool (H, W) mask per chain level, outermost first."""
    level_tokens: list[str]
    """The chain token behind each level (``[LOC]``, ``[POS]``, ``[SEG]``)."""
    answer: str
    question: str
    """The question as the model was asked it (a phrase is wrapped in the template)."""
    record: dict
    """What ``cores predict --json`` prints for this item, ``outputs`` empty."""
    prediction: Prediction


class Segmenter:
    """A loaded model and its prediction settings. Build one with :func:`cores_cli.load`."""

    def __init__(self, predictor: Predictor, source: str, model_info: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.predictor = predictor
        self.source = source
        """Where the weights came from: a directory, ``embedded:tiny-synthetic``, or a preset."""
        self.model_info = model_info
        self.max_pixels = max_pixels
        self._cautioned = source != EMBEDDED_SOURCE  # only the shipped model needs the caution

    @property
    def model(self) -> CoresModel:
        return self.predictor.model

    def __repr__(self) -> str:
        cfg = self.model.cfg
        return f"Segmenter(source={self.source!r}, preset={cfg.preset!r}, chain={list(cfg.chain.tokens)}, device={self.predictor.param.device})"

    def predict(self, image: ImageLike, query: str, *, style: Style = "auto", mode: Mode = "teacher") -> Result:
        """The mask of what ``query`` refers to in ``image``.

        ``style``: ``phrase`` wraps the query as "What is X in this image?", ``sentence`` uses it
        as written, ``auto`` decides by its form. ``mode="generate"`` lets the model write its
        answer (the template is used when that answer holds no chain).
        """
        return self._predict_pairs([(image, query)], style, mode, 1, numbered=False)[0]

    def predict_batch(
        self,
        items: Iterable[tuple[ImageLike, str]],
        *,
        style: Style = "auto",
        mode: Mode = "teacher",
        batch_size: int = 8,
    ) -> list[Result]:
        """:meth:`predict` for many (image, query) pairs, ``batch_size`` of them per forward
        pass (teacher-forced mode); the results in the same order. Every query and every image
        is checked before the model runs (paths exist, arrays have the right shape), so a bad
        item fails the call early; images are decoded a batch at a time.

        In bf16 a few pixels at a mask's edge may differ from one-at-a-time :meth:`predict`:
        the queries of a batch are padded to one length, which changes bf16 rounding (fp32 gives
        the same masks)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CoresError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        if isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], str):
            raise CoresError("predict_batch takes a list of (image, query) pairs; for one pair use predict(image, query)")
        return self._predict_pairs(items, style, mode, batch_size, numbered=True)

    def _predict_pairs(self, items: Iterable[object], style: Style, mode: Mode, batch_size: int, numbered: bool) -> list[Result]:
        _check_choice("style", style, STYLES)
        _check_choice("mode", mode, MODES)
        where = (lambda i: f"item {i}: ") if numbered else (lambda i: "")
        pairs = [self._check(item, where(i)) for i, item in enumerate(items)]
        results: list[Result] = []
        for start in range(0, len(pairs), batch_size):
            chunk = [(i, self._decode(image, where(i)), query) for i, (image, query) in enumerate(pairs[start : start + batch_size], start)]
            results.extend(self._run(chunk, style, mode))
        return results

    def _check(self, item: object, where: str) -> tuple[ImageLike, str]:
        """The (image, query) of one item, refused now if it cannot run."""
        from .engine.predictor import reserved_token_in

        if not isinstance(item, (tuple, list)) or len(item) != 2:
            size = f" of {len(item)}" if isinstance(item, (tuple, list)) else ""
            raise CoresError(f"{where}expected an (image, query) pair, got {type(item).__name__}{size}")
        image, query = item
        if not isinstance(query, str):
            raise CoresError(f"{where}the query must be a string, got {type(query).__name__}")
        if not query.strip():
            raise CoresError(f"{where}the query is empty")
        token = reserved_token_in(query, self.predictor.reserved_tokens())
        if token is not None:
            raise CoresError(f"{where}the query contains {token}, a token the model reserves for itself; rephrase it without {token}")
        try:
            check_image(image, self.max_pixels)  # decoded later, a batch at a time
        except CoresError as exc:
            raise type(exc)(f"{where}{exc}") from None
        return image, query

    def _decode(self, image: ImageLike, where: str) -> LoadedImage:
        try:
            return as_image(image, self.max_pixels)
        except CoresError as exc:
            raise type(exc)(f"{where}{exc}") from None

    def _run(self, chunk: Sequence[tuple[int, LoadedImage, str]], style: Style, mode: Mode) -> list[Result]:
        from .engine.batch_predict import prediction_record
        from .engine.predictor import Query

        predictions = self.predictor.predict_images([(img.pixels, [Query(query, style, f"item {i}")]) for i, img, query in chunk], mode)
        out = []
        for (index, img, query), (pred,) in zip(chunk, predictions):
            if not self._cautioned and not is_synthetic_scene_size(*img.size):
                self._cautioned = True
                warnings.warn(synthetic_only_warning(f"an image of {img.size[1]}×{img.size[0]}"), stacklevel=4)
            # an in-memory image has no name: the item's place in the call stands for it
            item_id = Path(img.path).stem if img.path[:1] != "<" else f"item-{index}"
            record = prediction_record(item_id, img.path, query, img, pred, {}, self.model_info)
            out.append(Result(pred.mask, pred.level_masks, pred.level_tokens, pred.answer, pred.question, record, pred))
        return out


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CoresError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def load(
    checkpoint: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    preset: str | None = None,
    overrides: Sequence[str] = (),
    context_library: str | Path | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quantize: str | None = None,
    device_map: str | None = None,
) -> Segmenter:
    """Load a model for prediction.

    ``checkpoint``: None for the tiny model shipped with cores (trained on the synthetic
    benchmark), a cores checkpoint directory (``cores train`` / ``cores export`` writes them), or
    a Hugging Face Hub id ``org/name[@revision]`` holding one. ``preset`` instead builds a preset
    with random weights (smoke tests only). ``device``: ``auto`` (the first GPU, else the CPU),
    ``cpu``, ``cuda``, ``cuda:N``; ``dtype``: ``auto`` (bf16 on a GPU, fp32 on the CPU), ``fp32``,
    ``bf16``, ``fp16``. ``overrides``: model settings as on the command line
    (``["prompt.in_context_k=0"]``). ``seed`` fixes the in-context exemplar draw.
    ``quantize``: ``8bit`` or ``4bit`` loads the LLaVA through bitsandbytes (CUDA only, the
    ``quantize`` extra); ``device_map="auto"`` spreads it over the visible GPUs.
    """
    from .engine.loading import load_predictor

    if checkpoint is not None and preset is not None:
        raise CoresError("give either checkpoint or preset, not both")
    if isinstance(checkpoint, str) and not checkpoint.strip():
        raise CoresError("checkpoint is an empty string: give a directory, a Hub id, or None for the shipped model")
    if isinstance(overrides, str):
        raise CoresError(f"overrides is a list of 'key=value' strings, got the string {overrides!r}: write [{overrides!r}]")
    for name, value in (("max_pixels", max_pixels), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CoresError(f"{name} must be a whole number of at least 1, got {value!r}")
    predictor, loaded, model_info = load_predictor(checkpoint, preset, list(overrides), device, dtype, context_library, seed, max_new_tokens, quantize, device_map)
    if loaded.random_weights:
        warnings.warn(f"{loaded.source}: masks are meaningless; pass a checkpoint for real predictions", stacklevel=2)
    if loaded.report is not None and loaded.report.unexpected:
        warnings.warn(f"checkpoint has tensors the model does not use: {loaded.report.summary()}", stacklevel=2)
    return Segmenter(predictor, loaded.source, model_info, max_pixels)

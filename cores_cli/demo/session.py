"""One demo request: image + question + mode → overlay, per-level views, answer, mask PNG and record."""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import CoresError
from ..fileio import atomic_write_json, save_image_atomic
from ..images import as_image
from ..visualize import overlay

if TYPE_CHECKING:
    from ..api import Segmenter

MODES = ("teacher", "generate")
MAX_QUESTION_CHARS = 2000


@dataclass
class DemoAnswer:
    overlay: np.ndarray
    """uint8 (H, W, 3): the final mask filled, earlier levels outlined, a legend."""
    levels: list[tuple[np.ndarray, str]]
    """One overlay per chain level (that level's mask alone) and its caption."""
    answer: str
    question: str
    mask_png: Path
    record_json: Path


class DemoSession:
    """Answers demo requests with one loaded model. Each request's files go into a new folder of
    their own inside ``files``, a folder this session creates under ``workdir``: the page may
    serve ``files`` and nothing else of ``workdir`` (which may be any folder of the user's)."""

    def __init__(self, segmenter: Segmenter, workdir: str | Path) -> None:
        self.segmenter = segmenter
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.files = Path(tempfile.mkdtemp(prefix="cores-demo-", dir=self.workdir))
        # Gradio's queue already runs one request at a time; the lock keeps direct callers
        # (tests, embedding apps) from sharing the model between threads too.
        self._lock = threading.Lock()

    def ask(self, image: str | Path | np.ndarray | None, question: str | None, mode: str = "teacher") -> DemoAnswer:
        """The answer to one request; a CoresError with a message for the page on bad input."""
        if image is None or (isinstance(image, str) and not image):
            raise CoresError("upload an image (or pick an example) first")
        question = (question or "").strip()
        if not question:
            raise CoresError("type a question about the image")
        if len(question) > MAX_QUESTION_CHARS:
            raise CoresError(f"the question is {len(question)} characters long; keep it under {MAX_QUESTION_CHARS}")
        if mode not in MODES:
            raise CoresError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        try:
            loaded = as_image(image, self.segmenter.max_pixels)
        except CoresError as exc:
            raise CoresError(f"that upload cannot be used: {exc}") from None
        with self._lock:
            result = self.segmenter.predict(loaded.pixels, question, mode=mode)
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.files))
        labels = list(result.level_tokens)
        mask_png = folder / "mask.png"
        save_image_atomic(Image.fromarray(result.mask.astype(np.uint8) * 255), mask_png, format="PNG")
        record = dict(result.record)
        record["outputs"] = {"mask": mask_png.name}
        record_json = folder / "record.json"
        atomic_write_json(record_json, record)
        levels = [(overlay(loaded.pixels, [mask], [label]), f"level {i + 1}: {label}") for i, (mask, label) in enumerate(zip(result.level_masks, labels))]
        return DemoAnswer(
            overlay=overlay(loaded.pixels, result.level_masks, labels),
            levels=levels,
            answer=result.answer,
            question=result.question,
            mask_png=mask_png,
            record_json=record_json,
        )


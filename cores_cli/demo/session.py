"""One demo request: image + question + mode → overlay, per-level views, answer, mask PNG and record."""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

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
    overlay_png: Path | None = None
    """``overlay`` as a PNG in the request's folder (what the page serves)."""
    level_pngs: list[Path] = field(default_factory=list)
    """Each of ``levels`` as a PNG in the request's folder."""


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
        _save_png(Image.fromarray(result.mask.astype(np.uint8) * 255), mask_png)
        record = dict(result.record)
        record["outputs"] = {"mask": mask_png.name}
        record["request"] = folder.name
        record_json = folder / "record.json"
        atomic_write_json(record_json, record)
        levels = [(overlay(loaded.pixels, [mask], [label]), f"level {i + 1}: {label}") for i, (mask, label) in enumerate(zip(result.level_masks, labels))]
        picture = overlay(loaded.pixels, result.level_masks, labels)
        overlay_png = folder / "overlay.png"
        _save_png(Image.fromarray(picture), overlay_png)
        level_pngs = [folder / f"level-{i + 1}.png" for i in range(len(levels))]
        for (pixels, _), path in zip(levels, level_pngs):
            _save_png(Image.fromarray(pixels), path)
        return DemoAnswer(
            overlay=picture,
            levels=levels,
            answer=result.answer,
            question=result.question,
            mask_png=mask_png,
            record_json=record_json,
            overlay_png=overlay_png,
            level_pngs=level_pngs,
        )


def _save_png(image: Image.Image, path: Path) -> None:
    """A request's PNG, naming its request in a text chunk. Gradio caches what it serves under a
    hash of the content and rewrites that file in place for each request: two requests with the
    same answer would share one cache file, and one could download it while the other rewrites it
    (a truncated image). The request's name makes every file's content its own."""
    info = PngInfo()
    info.add_text("cores-request", path.parent.name)
    save_image_atomic(image, path, format="PNG", pnginfo=info)

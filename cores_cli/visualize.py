"""Overlays: the final mask filled, the chain's intermediate masks as outlines, and a legend.

What makes them readable:

- the legend (and any caption) is a strip below the picture, never drawn over it, so no part of
  the image is hidden; long captions wrap onto more lines instead of being cut;
- the fill colour is chosen per mask, the one of :data:`FILL_COLOURS` farthest from the mean
  colour of the region it covers (a green fill on grass is invisible);
- images of at most :data:`SMALL_SIDE` pixels on the long side are enlarged by a whole factor,
  nearest neighbour, so each source pixel stays a sharp block and mask edges fall on its edges;
- images above ``max_side`` on the long side are shrunk to it (:data:`DEFAULT_MAX_SIDE`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .ignore_values import IGNORE

Colour = tuple[int, int, int]

FILL_COLOURS: tuple[Colour, ...] = ((0, 220, 90), (255, 0, 200), (0, 200, 255), (255, 230, 0), (255, 110, 0), (40, 70, 255))
"""Fill candidates (RGB), saturated and far apart; the final mask takes the one farthest from the
mean colour of the pixels it covers."""
FINAL_COLOUR = FILL_COLOURS[0]
"""The fill of an empty mask (no region to contrast with)."""
LEVEL_COLOURS: tuple[Colour, ...] = ((30, 144, 255), (255, 170, 0), (220, 60, 220))
GT_COLOUR: Colour = (255, 40, 40)

SMALL_SIDE = 256
"""Images this small or smaller (long side, pixels) are enlarged for display."""
SMALL_TARGET = 512
"""An enlarged image's long side reaches at least this (by a whole factor)."""
DEFAULT_MAX_SIDE = 1280
"""Longest side of an overlay by default. A 28 MP photo (LISA's wash_hands.jpg, 4793×5953) gives
a 1.36 MB PNG at this size and 1.88 MB at 1536 (PNG at compression 1, as cores predict writes
them; a JPEG is about 7 times smaller; ``benchmarks/overlay_size.py``), so 1280 keeps such
overlays under ~2 MB with a margin while staying sharp on a common screen. Masks keep the
image's full size; only the overlay is shrunk."""

STRIP_BACKGROUND: Colour = (24, 24, 24)
TEXT_COLOUR: Colour = (255, 255, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def display_size(height: int, width: int, max_side: int | None = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """The (height, width) an image of this size is shown at in an overlay."""
    long = max(height, width)
    if 0 < long <= SMALL_SIDE:
        k = math.ceil(SMALL_TARGET / long)
        if max_side is not None:
            k = max(1, min(k, max_side // long))
        return height * k, width * k
    if max_side is not None and long > max_side:
        s = max_side / long
        return max(1, round(height * s)), max(1, round(width * s))
    return height, width


def overlay(
    pixels: np.ndarray,
    masks: list[np.ndarray],
    labels: list[str],
    alpha: float = 0.45,
    max_side: int | None = DEFAULT_MAX_SIDE,
    caption: str | None = None,
) -> np.ndarray:
    """uint8 (H', W', 3): the image at its display size (:func:`display_size`) with ``masks``
    (bool (H, W), final last) drawn on it, and below it a strip with the legend and ``caption``.

    The final mask is a translucent fill with an outline; each earlier level is an outline in
    its own colour, so the chain's narrowing stays visible on top of the result.
    """
    shown, scaled = _for_display(pixels, masks, max_side)
    final = scaled[-1]
    avoid = LEVEL_COLOURS[: len(scaled) - 1]
    colour = fill_colour(shown, final, avoid)
    image = _fill(shown, final, colour, alpha)
    thickness = _thickness(image)
    entries = []
    for i, mask in enumerate(scaled[:-1]):
        c = LEVEL_COLOURS[i % len(LEVEL_COLOURS)]
        _outline(image, mask, c, thickness)
        entries.append((labels[i], c))
    _outline(image, final, colour, thickness)
    entries.append((labels[-1] + " (final)", colour))
    return _with_strip(image, entries, caption, max_side)


def comparison(
    pixels: np.ndarray, pred: np.ndarray, target: np.ndarray, caption: str, max_side: int | None = DEFAULT_MAX_SIDE
) -> np.ndarray:
    """For looking at what went wrong on a sample: the prediction filled, the ground truth
    outlined (red), ignore pixels (255) greyed, and below the image a legend and the whole
    ``caption`` (wrapped)."""
    ignore = target == IGNORE
    greyed = pixels.copy()
    greyed[ignore] = (greyed[ignore] * 0.4 + 80).astype(np.uint8)
    shown, (truth, predicted) = _for_display(greyed, [target == 1, pred.astype(bool)], max_side)
    colour = fill_colour(shown, predicted, (GT_COLOUR,))
    image = _fill(shown, predicted, colour, 0.45)
    thickness = _thickness(image)
    _outline(image, predicted, colour, thickness)
    _outline(image, truth, GT_COLOUR, thickness)
    entries = [("ground truth (outline)", GT_COLOUR), ("prediction (fill)", colour)]
    return _with_strip(image, entries, caption, max_side)


def fill_colour(pixels: np.ndarray, mask: np.ndarray, avoid: tuple[Colour, ...] = ()) -> Colour:
    """The colour of :data:`FILL_COLOURS` farthest from the mean colour of ``pixels`` under
    ``mask``, among those not close to a colour of ``avoid`` (the other colours drawn: an outline
    must not look like the fill)."""
    candidates = [c for c in FILL_COLOURS if all(_distance(c, a) > AVOID_DISTANCE for a in avoid)] or list(FILL_COLOURS)
    if not mask.any():
        return candidates[0]
    mean = pixels[mask].reshape(-1, 3).mean(axis=0)
    return max(candidates, key=lambda c: float(np.sum((np.array(c, np.float64) - mean) ** 2)))


def _for_display(pixels: np.ndarray, masks: list[np.ndarray], max_side: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = pixels.shape[:2]
    dh, dw = display_size(h, w, max_side)
    if (dh, dw) == (h, w):
        return pixels.copy(), [m.astype(bool) for m in masks]
    if dh > h:  # enlarged: whole blocks, for the pixels and the masks alike
        k = dh // h
        return np.repeat(np.repeat(pixels, k, 0), k, 1), [np.repeat(np.repeat(m.astype(bool), k, 0), k, 1) for m in masks]
    shown = cv2.resize(pixels, (dw, dh), interpolation=cv2.INTER_AREA)
    # a mask pixel covers the display pixel where at least half of what it stands for is inside
    scaled = [cv2.resize(m.astype(np.float32), (dw, dh), interpolation=cv2.INTER_AREA) >= 0.5 for m in masks]
    return shown, scaled


def _fill(pixels: np.ndarray, mask: np.ndarray, colour: Colour, alpha: float) -> np.ndarray:
    out = pixels.copy()
    blended = out[mask].astype(np.float32) * (1 - alpha) + np.array(colour, np.float32) * alpha
    out[mask] = np.round(blended).astype(np.uint8)
    return out


def _thickness(img: np.ndarray) -> int:
    return max(1, round(max(img.shape[:2]) / 300))


def _outline(img: np.ndarray, mask: np.ndarray, colour: Colour, thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, colour, thickness)


def _text_scale(width: int) -> float:
    # about 60 characters across a wide image, never smaller than legible
    return min(1.2, max(0.4, width / 1300))


MIN_STRIP_WIDTH = 360
"""A narrower image gets a strip this wide (the picture then sits at its left), so that the
legend stays legible beside a tall thin image."""


def legend_strip(width: int, entries: list[tuple[str, Colour]], caption: str | None = None) -> np.ndarray:
    """uint8 (h, width, 3): a swatch and a label per entry, flowing into as many rows as the
    width needs, then ``caption`` wrapped at word boundaries (a word wider than the strip is
    broken). Nothing is cut; the strip is as tall as its text."""
    scale = _text_scale(width)
    (_, th), base = cv2.getTextSize("Hg", _FONT, scale, 1)
    line = th + base + max(4, th // 2)
    pad = max(4, th // 2)
    box = th
    usable = max(1, width - 2 * pad)
    # each row: (x, swatch colour or None, text)
    rows: list[list[tuple[int, Colour | None, str]]] = [[]]
    x = 0
    for text, colour in entries:
        parts = _wrap(_ascii(text), max(1, usable - box - pad), scale)
        item = box + pad + _text_width(parts[0], scale)
        if rows[-1] and (x + item > usable or len(parts) > 1):
            rows.append([])
            x = 0
        rows[-1].append((x, colour, parts[0]))
        for more in parts[1:]:  # a label too long for one row goes on below its swatch
            rows.append([(0, None, more)])
        x += item + 3 * pad
    rows += [[(-box - pad, None, text)] for text in (_wrap(_ascii(caption), usable, scale) if caption else [])]
    strip = np.empty((2 * pad + line * len(rows), width, 3), np.uint8)
    strip[:] = STRIP_BACKGROUND
    for i, row in enumerate(rows):
        y = pad + i * line
        for x, colour, text in row:
            if colour is not None:
                top = y + (line - box) // 2
                cv2.rectangle(strip, (pad + x, top), (pad + x + box, top + box), colour, -1)
            cv2.putText(strip, text, (pad + x + box + pad, y + th + (line - th - base) // 2), _FONT, scale, TEXT_COLOUR, 1, cv2.LINE_AA)
    return strip


def _with_strip(image: np.ndarray, strip_entries: list[tuple[str, Colour]], caption: str | None, max_side: int | None) -> np.ndarray:
    """``image`` at the top left, the legend strip below it (as wide as the image, or
    :data:`MIN_STRIP_WIDTH` within ``max_side``)."""
    h, w = image.shape[:2]
    width = max(w, MIN_STRIP_WIDTH if max_side is None else min(MIN_STRIP_WIDTH, max_side))
    strip = legend_strip(width, strip_entries, caption)
    canvas = np.empty((h + strip.shape[0], width, 3), np.uint8)
    canvas[:h] = STRIP_BACKGROUND
    canvas[:h, :w] = image
    canvas[h:] = strip
    return canvas


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only; anything else would come out as "?" anyway
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in " ".join(text.split()))


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def _wrap(text: str, width: int, scale: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels; every character kept."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, scale) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while _text_width(current, scale) > width and len(current) > 1:
            # a word wider than the strip: as many characters as fit, then the rest
            cut = max([1] + [n for n in range(2, len(current)) if _text_width(current[:n], scale) <= width])
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    return lines or [""]


def bbox(mask: np.ndarray) -> dict[str, int] | None:
    """Tight box of a bool mask as {x, y, width, height} in pixels, or None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return {"x": x0, "y": y0, "width": int(xs.max()) - x0 + 1, "height": int(ys.max()) - y0 + 1}


AVOID_DISTANCE = 120.0
"""RGB distance under which two colours are taken for the same at a glance."""


def _distance(a: Colour, b: Colour) -> float:
    return float(np.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))))

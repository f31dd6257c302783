"""Overlays: the final mask filled, the chain's intermediate masks as outlines, a legend."""

from __future__ import annotations

import cv2
import numpy as np

from .ignore_values import IGNORE

FINAL_COLOUR = (0, 220, 90)
LEVEL_COLOURS = [(30, 144, 255), (255, 170, 0), (220, 60, 220)]


def overlay(pixels: np.ndarray, masks: list[np.ndarray], labels: list[str], alpha: float = 0.45) -> np.ndarray:
    """uint8 (H, W, 3) image with ``masks`` (bool (H, W), final last) drawn in distinct colours.

    The final mask is a translucent fill with an outline; each earlier level is an outline in
    its own colour, so the chain's narrowing stays visible on top of the result.
    """
    out = pixels.astype(np.float32)
    final = masks[-1]
    colour = np.array(FINAL_COLOUR, np.float32)
    out[final] = out[final] * (1 - alpha) + colour * alpha
    out = out.astype(np.uint8)
    h, w = out.shape[:2]
    thickness = max(1, round(max(h, w) / 300))
    entries = []
    for i, mask in enumerate(masks[:-1]):
        c = LEVEL_COLOURS[i % len(LEVEL_COLOURS)]
        _outline(out, mask, c, thickness)
        entries.append((labels[i], c))
    _outline(out, final, FINAL_COLOUR, thickness)
    entries.append((labels[-1] + " (final)", FINAL_COLOUR))
    _legend(out, entries)
    return out


def _outline(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, colour, thickness)


def _legend(img: np.ndarray, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    h, w = img.shape[:2]
    scale = max(0.35, min(h, w) / 900)
    line = int(22 * scale) + 4
    box = int(12 * scale) + 2
    for i, (text, colour) in enumerate(entries):
        y = 6 + i * line
        if y + line > h:
            break
        cv2.rectangle(img, (6, y), (6 + box, y + box), colour, -1)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, 1)
        cv2.rectangle(img, (10 + box, y - 1), (14 + box + tw, y + max(box, th) + 2), (0, 0, 0), -1)
        cv2.putText(img, text, (12 + box, y + box - 1), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.6, (255, 255, 255), 1, cv2.LINE_AA)


def bbox(mask: np.ndarray) -> dict[str, int] | None:
    """Tight box of a bool mask as {x, y, width, height} in pixels, or None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return {"x": x0, "y": y0, "width": int(xs.max()) - x0 + 1, "height": int(ys.max()) - y0 + 1}


GT_COLOUR = (255, 40, 40)


def comparison(pixels: np.ndarray, pred: np.ndarray, target: np.ndarray, caption: str) -> np.ndarray:
    """The prediction filled (green), the ground truth outlined (red), ignore pixels (255)
    greyed, and a caption: for looking at what went wrong on a sample."""
    out = pixels.copy()
    ignore = target == IGNORE
    out[ignore] = (out[ignore] * 0.4 + 80).astype(np.uint8)
    out = overlay(out, [pred.astype(bool)], ["prediction"])
    h, w = out.shape[:2]
    _outline(out, target == 1, GT_COLOUR, max(1, round(max(h, w) / 300)))
    _legend_line(out, caption)
    return out


def _legend_line(img: np.ndarray, text: str) -> None:
    h, w = img.shape[:2]
    scale = max(0.35, min(h, w) / 900) * 0.6
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    y = h - 6
    cv2.rectangle(img, (4, y - th - 4), (8 + tw, y + base), (0, 0, 0), -1)
    cv2.putText(img, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)

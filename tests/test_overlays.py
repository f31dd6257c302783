"""Overlays people can read (issue 15, item 3): the legend in a strip outside the picture, a fill
that contrasts with what it covers, small images enlarged, large ones shrunk to a size that
keeps the file small, and captions that wrap instead of being cut."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from cores_cli import visualize
from cores_cli.visualize import DEFAULT_MAX_SIDE, FILL_COLOURS, comparison, display_size, fill_colour, legend_strip, overlay


def noise(h: int, w: int, seed: int = 0, base=(0, 0, 0), spread: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, spread, (h, w, 3)) + np.array(base)).clip(0, 255).astype(np.uint8)


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def away_from(masks: list[np.ndarray], margin: int) -> np.ndarray:
    """Pixels at least ``margin`` away from every mask's region (so from its outline too)."""
    near = np.zeros(masks[0].shape, np.uint8)
    for m in masks:
        near |= m.astype(np.uint8)
    return cv2.dilate(near, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)) == 0


def test_the_legend_is_a_strip_below_and_the_picture_is_only_changed_by_the_drawing():
    pixels = noise(300, 400)
    final, level = box(300, 400, 100, 200, 150, 250), box(300, 400, 60, 240, 100, 300)
    out = overlay(pixels, [level, final], ["[LOC]", "[SEG]"])
    assert out.shape[1] == 400 and out.shape[0] > 300  # the strip adds rows, no column
    picture, strip = out[:300], out[300:]
    untouched = away_from([level, final], margin=4)
    assert (picture[untouched] == pixels[untouched]).all()  # the legend covers none of it
    inside = final & ~cv2.dilate(~final.astype(np.uint8) & 1, np.ones((9, 9), np.uint8)).astype(bool)
    assert (picture[inside] != pixels[inside]).any(axis=-1).all()  # the fill
    # the strip shows the final colour's swatch and text
    colour = fill_colour(pixels, final, visualize.LEVEL_COLOURS[:1])
    assert (strip == colour).all(axis=-1).any() and (strip == visualize.TEXT_COLOUR).all(axis=-1).any()


def test_the_fill_contrasts_with_the_region_it_covers():
    green = noise(100, 100, base=(20, 180, 30), spread=30)
    magenta = noise(100, 100, base=(220, 20, 190), spread=30)
    mask = box(100, 100, 20, 80, 20, 80)
    on_green, on_magenta = fill_colour(green, mask), fill_colour(magenta, mask)
    assert on_green != FILL_COLOURS[0]  # not green on grass
    assert on_magenta != (255, 0, 200)
    mean = green[mask].mean(axis=0)
    dist = lambda c: np.sum((np.array(c) - mean) ** 2)  # noqa: E731
    assert dist(on_green) == max(dist(c) for c in FILL_COLOURS)
    # the colour chosen is the one drawn: the filled pixels moved towards it
    out = overlay(green, [mask], ["[SEG]"])
    inner = box(100, 100, 30, 70, 30, 70)
    before = np.abs(green[inner].astype(int) - on_green).mean()
    shown = display(inner, out)
    after = np.abs(out[: shown.shape[0]][shown].astype(int) - on_green).mean()
    assert after < before


def display(mask: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``mask`` at the display size of ``out``'s picture (a whole-factor enlargement)."""
    k = out.shape[1] // mask.shape[1]
    return np.repeat(np.repeat(mask, k, 0), k, 1)


def test_small_images_are_enlarged_by_whole_blocks():
    pixels = noise(60, 100)
    mask = box(60, 100, 10, 30, 20, 50)
    assert display_size(60, 100) == (360, 600)  # 6 × 100 reaches 512 on the long side
    out = overlay(pixels, [mask], ["[SEG]"])
    picture = out[:360]
    blocks = picture.reshape(60, 6, 100, 6, 3)
    outside = away_from([mask], 2)
    # away from the outline, every source pixel is a sharp 6×6 block of itself
    assert (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3, 4))[outside].all()
    assert (blocks[:, 0, :, 0][outside] == pixels[outside]).all()
    # and the fill covers whole blocks: the mask's edges fall on the pixels' edges
    inside = box(60, 100, 12, 28, 22, 48)
    assert (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3, 4))[inside].all()
    assert display_size(256, 200) == (512, 400) and display_size(257, 200) == (257, 200)


def test_large_images_are_shrunk_to_the_max_side_and_masks_follow():
    pixels = noise(1000, 2000)
    mask = box(1000, 2000, 0, 500, 0, 1000)  # the top-left quarter
    out = overlay(pixels, [mask], ["[SEG]"], max_side=400)
    assert out.shape[1] == 400 and display_size(1000, 2000, 400) == (200, 400)
    filled = (out[:200] != cv2.resize(pixels, (400, 200), interpolation=cv2.INTER_AREA)).any(axis=-1)
    assert filled[10:90, 10:190].all() and not filled[110:, 210:].any()
    assert overlay(pixels, [mask], ["[SEG]"], max_side=None)[:1000].shape == (1000, 2000, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_28_megapixel_overlay_stays_under_2_mb(fmt):
    """A photo-like 28 MP image (smooth shading and mild grain, as a camera's): the default
    max side keeps its overlay small in either format."""
    h, w = 5953, 4793
    yy, xx = np.mgrid[0:h:8, 0:w:8]
    small = np.stack([(yy * 255 // h), (xx * 255 // w), ((yy + xx) * 127 // (h + w) + 60)], -1).astype(np.int16)
    small += np.random.default_rng(0).integers(-6, 7, small.shape, dtype=np.int16)
    photo = cv2.resize(small.clip(0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = box(h, w, 1000, 4000, 1500, 3500)
    out = overlay(photo, [mask, mask], ["[LOC]", "[SEG]"])
    assert max(out.shape[:2]) < DEFAULT_MAX_SIDE * 1.2 and max(display_size(h, w)) == DEFAULT_MAX_SIDE
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 90}))
    assert len(buf.getvalue()) < 2_000_000


def test_a_long_caption_wraps_instead_of_being_cut():
    words = [f"word{i:02d}" for i in range(60)]
    caption = " ".join(words) + " " + "x" * 120  # and one word wider than the strip
    short = legend_strip(400, [("[SEG]", (0, 220, 90))], "IoU 0.5: short")
    long = legend_strip(400, [("[SEG]", (0, 220, 90))], caption)
    assert long.shape[0] > 4 * short.shape[0]  # more lines, not a longer single line
    lines = visualize._wrap(caption, 380, visualize._text_scale(400))
    assert " ".join(lines).replace(" ", "") == caption.replace(" ", "")  # every character kept
    assert all(visualize._text_width(line, visualize._text_scale(400)) <= 380 for line in lines)


def test_the_eval_comparison_shows_truth_prediction_legend_and_the_whole_query():
    pixels = noise(200, 300)
    truth = np.zeros((200, 300), np.uint8)
    truth[40:120, 50:150] = 1
    truth[180:, :] = 255
    pred = box(200, 300, 60, 140, 80, 200)
    query = "what would a person grab to stay upright on a moving bus, " * 3
    out = comparison(pixels, pred, truth, f"IoU 0.25: {query}")
    h = display_size(200, 300)[0]
    picture, strip = out[:h], out[h:]
    assert (picture == visualize.GT_COLOUR).all(axis=-1).any()  # the ground truth outline
    assert (strip == visualize.GT_COLOUR).all(axis=-1).any()  # and its swatch in the legend
    one_line = comparison(pixels, pred, truth, "IoU 0.25: short")
    assert strip.shape[0] > one_line.shape[0] - h  # the long query took more lines


def test_a_tall_thin_image_keeps_a_legible_strip():
    out = overlay(noise(2000, 10), [box(2000, 10, 0, 100, 0, 10)], ["[SEG]"])
    assert out.shape[1] == visualize.MIN_STRIP_WIDTH  # the picture at the left, 6 px wide

"""LLaVA-1.5's padded-square CLIP input made without the full-size square: pixel for pixel what
the square gives (issue 16 item 4: no canvas larger than needed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cores_cli.processing import transform

FILL = np.array([122, 116, 104], np.uint8)


def via_full_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """LLaVA's expand2square: the image centred on a fill-coloured square of its longest side,
    then one resize of the whole square (written out here as the reference)."""
    h, w = pixels.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = FILL
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = pixels
    return np.array(Image.fromarray(canvas).resize((size, size), Image.BICUBIC, reducing_gap=3.0))


@pytest.mark.parametrize(
    "shape",
    [(2000, 1500), (1500, 2000), (1001, 2003), (2003, 1001), (2100, 2100), (777, 3000), (3000, 777), (2017, 2016), (4000, 3001)],
)
@pytest.mark.parametrize("size", [160, 100])
def test_the_padded_square_equals_the_full_size_canvas(shape, size):
    pixels = np.random.default_rng(sum(shape) + size).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert int(max(shape) / size / 3.0) > 1  # the reduced route is the one under test
    got = transform._pad_to_square(pixels, size, FILL)
    assert np.array_equal(got, via_full_square(pixels, size))
    assert np.array_equal(transform._pad_to_square(pixels, size, FILL, Image.fromarray(pixels)), got)


def test_a_photo_whose_content_is_block_aligned_equals_it_too():
    # square image: no padding at all, the content is the whole (reduced) square
    pixels = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    assert np.array_equal(transform._pad_to_square(pixels, 100, FILL), via_full_square(pixels, 100))


def test_small_images_keep_the_canvas_route():
    pixels = np.random.default_rng(1).integers(0, 256, (500, 300, 3), dtype=np.uint8)
    assert int(500 / 336 / 3.0) <= 1
    assert np.array_equal(transform._pad_to_square(pixels, 336, FILL), via_full_square(pixels, 336))


def test_lisas_28_megapixel_photo_at_clips_336(realdata):
    from cores_cli.images import load_image

    pixels = load_image(realdata / "lisa_demo/imgs/wash_hands.jpg").pixels  # 4793 × 5953
    assert np.array_equal(transform._pad_to_square(pixels, 336, FILL), via_full_square(pixels, 336))

"""Image reading: EXIF orientation, every common mode to 8-bit RGB, size limits, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cores_cli.errors import InputImageError
from cores_cli.images import load_image


def test_exif_orientations_give_the_upright_image(realdata):
    d = realdata / "quirks" / "exif_orientation"
    ref = load_image(d / "Landscape_1.jpg")
    assert ref.size == (1200, 1800) and not ref.exif_rotated
    for name in ("Landscape_6.jpg", "Landscape_8.jpg"):
        img = load_image(d / name)
        assert img.size == (1200, 1800) and img.exif_rotated  # stored 1200 wide, shown 1800 wide
        # the upright pixels agree with the orientation-1 photo of the same scene
        diff = np.abs(img.pixels.astype(int) - ref.pixels.astype(int)).mean()
        assert diff < 20, (name, diff)
    portrait = load_image(d / "Portrait_3.jpg")
    assert portrait.exif_rotated and portrait.size == (1800, 1200)


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("L", 128, (128, 128, 128)),
        ("LA", 200, (200, 200, 200)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, as cv2.imread does for LISA
        ("P", 1, (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),  # 16-bit scaled by 255/65535, not stretched
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_modes_become_8bit_rgb(tmp_path, mode, value, expected):
    if mode == "P":
        img = Image.new("P", (20, 10), value)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    else:
        img = Image.new(mode, (20, 10), value)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    loaded = load_image(path)
    assert loaded.pixels.dtype == np.uint8 and loaded.pixels.shape == (10, 20, 3)
    assert tuple(int(v) for v in loaded.pixels[5, 5]) == expected
    assert loaded.converted_from is not None


def test_sixteen_bit_png_written_by_numpy(tmp_path):
    a = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(a).save(path)
    loaded = load_image(path)
    assert loaded.pixels[0, 0, 0] == 0 and loaded.pixels[-1, -1, 0] == 255
    assert loaded.converted_from in ("I;16", "I")


def test_size_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(path)
    with pytest.raises(InputImageError, match=r"2000×1500 \(3.0 MP\), above the limit of 1 MP"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=3_000_000).size == (1500, 2000)


def test_large_real_photo_is_read_whole(realdata):
    img = load_image(realdata / "lisa_demo" / "imgs" / "wash_hands.jpg")
    assert img.size == (5953, 4793)  # 28.5 MP


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "image not found"),
        ("directory", "not a file"),
        ("text", "not a recognised image format"),
        ("truncated", "cannot read image"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, realdata, setup, message):
    path = tmp_path / "bad.jpg"
    if setup == "directory":
        path.mkdir()
    elif setup == "text":
        path.write_text("hello, I am not a picture")
    elif setup == "truncated":
        data = (realdata / "lisa_demo" / "imgs" / "example2.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputImageError, match=message):
        load_image(path)

"""Reading images the way people see them: EXIF orientation applied, any mode made RGB.

Masks line up with the upright image (what a viewer shows, and what ``cv2.imread`` gives LISA).
Grayscale, palette, RGBA, 16-bit (grey or colour) and CMYK images are converted to 8-bit RGB;
every conversion is reported so a caller can tell the user. Size is checked from the header,
before decoding, so a huge image fails fast with a clear message instead of exhausting memory.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputImageError

DEFAULT_MAX_PIXELS = 150_000_000
_pil_limit_lock = threading.Lock()


@dataclass
class LoadedImage:
    """``pixels``: uint8 (H, W, 3), upright. ``converted_from``: the source mode when it was
    not 8-bit RGB (e.g. ``"I;16"``, ``"RGBA"``, ``"RGB;16"`` for 16 bits per channel), else None."""

    path: str
    pixels: np.ndarray
    converted_from: str | None
    exif_rotated: bool

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, limit_hint: str = "raise it with --max-pixels") -> LoadedImage:
    p = _require_file(path)
    with _pil_limit_lock:
        # Our own limit replaces PIL's decompression-bomb check (which warns at 89 MP and
        # fails at 179 MP, whatever the user asked for).
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return _read(p, max_pixels, limit_hint)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputImageError(f"image not found: {p}")
    if not p.is_file():
        raise InputImageError(f"not a file: {p}")
    return p


def _read(p: Path, max_pixels: int, limit_hint: str) -> LoadedImage:
    try:
        with Image.open(p) as img:
            w, h = img.size
            if w * h > max_pixels:
                size, limit = _pixel_counts(w * h, max_pixels)
                raise InputImageError(f"image {p} is {w}×{h} ({size}), above the limit of {limit} ({limit_hint})")
            pixels, converted, rotated = _upright_rgb(img)
    except InputImageError:
        raise
    except UnidentifiedImageError:
        raise InputImageError(f"cannot read image {p}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"cannot read image {p}: {str(exc).splitlines()[0] if str(exc) else 'corrupt or truncated file'}") from None
    return LoadedImage(str(p), pixels, converted, rotated)


_API_LIMIT_HINT = "raise it with max_pixels="


def check_image(image: object, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise what :func:`as_image` would for ``image``'s kind, shape and size, without decoding
    it (a path only has to be a file: its header is read when it is loaded)."""
    if isinstance(image, (str, Path)):
        if not str(image):
            raise InputImageError("the image path is empty")
        _require_file(image)
        return
    if isinstance(image, Image.Image):
        w, h = image.size
        what = "the PIL image"
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputImageError(f"an image array must be uint8 of shape (H, W, 3) in RGB order, got {image.dtype} {tuple(image.shape)}")
        h, w = image.shape[:2]
        what = "the image array"
    else:
        raise InputImageError(f"an image is a path, a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")
    if w < 1 or h < 1:
        raise InputImageError(f"{what} is empty: {w}×{h}")
    if w * h > max_pixels:
        size, limit = _pixel_counts(w * h, max_pixels)
        raise InputImageError(f"{what} is {w}×{h} ({size}), above the limit of {limit} ({_API_LIMIT_HINT})")


def as_image(image: str | Path | Image.Image | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """A path (read as :func:`load_image` reads it), a PIL image (EXIF orientation applied, mode
    converted, as for a file) or a uint8 (H, W, 3) RGB array (used as it is)."""
    check_image(image, max_pixels)
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels, _API_LIMIT_HINT)
    if isinstance(image, np.ndarray):
        return LoadedImage("<array>", np.array(image, copy=True, order="C"), None, False)  # the caller keeps theirs
    try:
        pixels, converted, rotated = _upright_rgb(image)
    except (OSError, SyntaxError, ValueError, AssertionError) as exc:
        # PIL asserts on an image whose file was closed before it was loaded
        detail = str(exc).splitlines()[0] if str(exc) else "its file was closed before it was read, or the data is truncated"
        raise InputImageError(f"cannot read the PIL image: {detail}") from None
    return LoadedImage("<PIL image>", pixels, converted, rotated)


def _upright_rgb(img: Image.Image) -> tuple[np.ndarray, str | None, bool]:
    """Decoded, EXIF orientation applied, made 8-bit RGB: (pixels, source mode or None, rotated).
    The source mode ends in ``;16`` when the file held 16 bits per channel that PIL shows as 8."""
    sixteen_bit = _stored_with_16_bit_channels(img)  # read before load() drops the tile list
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img.load()
        upright = ImageOps.exif_transpose(img)
    rotated = upright.size != img.size or _orientation(img) not in (None, 1)
    pixels, converted = to_rgb8(upright)
    if sixteen_bit and not (converted or "").startswith("I"):  # "I;16" says it already
        converted = f"{converted or 'RGB'};16"  # no conversion: it was RGB
    return pixels, converted, rotated


def _pixel_counts(pixels: int, limit: int) -> tuple[str, str]:
    """An image's pixel count and the limit, in words that show the one is above the other:
    megapixels for a round limit of 1 MP or more (``3.0 MP``, ``1 MP``), exact counts otherwise
    (``1,200 pixels``, ``1,000 pixels``), never a limit rounded to ``0 MP``."""
    if limit >= 1_000_000 and limit % 100_000 == 0 and round(pixels / 1e6, 1) > limit / 1e6:
        return f"{pixels / 1e6:.1f} MP", f"{limit / 1e6:g} MP"
    return f"{pixels:,} pixels", f"{limit:,} pixels"


def _stored_with_16_bit_channels(img: Image.Image) -> bool:
    """Whether the file holds 16 bits per channel even though PIL shows 8-bit RGB(A).

    PIL opens a 48-bit RGB PNG or TIFF as mode ``"RGB"``, keeping the high byte of each sample;
    only the decoder's raw mode (``"RGB;16B"``, ``"RGBA;16N"``) tells, so the loss of depth
    would otherwise go unreported.
    """
    for tile in getattr(img, "tile", None) or []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        rawmode = args if isinstance(args, str) else next((a for a in args or () if isinstance(a, str)), "")
        if ";16" in rawmode:
            return True
    return False


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except (AttributeError, OSError, ValueError):
        return None


def to_rgb8(img: Image.Image) -> tuple[np.ndarray, str | None]:
    """8-bit RGB pixels (H, W, 3) from any PIL mode, and the source mode if it was not RGB.

    16-bit data is scaled by 255/65535 (the full range, not stretched to the image's own
    min/max, so brightness is preserved). Alpha is dropped as ``cv2.imread`` drops it, which is
    what LISA-trained models saw.
    """
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy(), None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        scale = 255.0 / 65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), mode
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        a = np.clip(np.rint(a / hi * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy(), mode

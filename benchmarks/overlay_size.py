"""Overlay file sizes at several ``--overlay-max-side`` values, on a real 28 MP photo.

    python benchmarks/overlay_size.py --image ../shared/realdata/lisa_demo/imgs/wash_hands.jpg

Draws the overlay ``cores predict`` writes (a final mask filled and one earlier level outlined,
here two fixed rectangles standing in for a prediction) and encodes it as ``cores predict`` does:
PNG at compression level 1, or JPEG at its quality. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cores_cli.engine.batch_predict import JPEG_QUALITY  # noqa: E402
from cores_cli.images import load_image  # noqa: E402
from cores_cli.visualize import overlay  # noqa: E402


def encoded_bytes(pixels: np.ndarray, fmt: str) -> int:
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--sides", type=int, nargs="+", default=[1024, 1280, 1536, 2048])
    args = ap.parse_args()
    pixels = load_image(args.image).pixels
    h, w = pixels.shape[:2]
    outer = np.zeros((h, w), bool)
    outer[h // 5 : 4 * h // 5, w // 5 : 4 * w // 5] = True
    inner = np.zeros((h, w), bool)
    inner[2 * h // 5 : 3 * h // 5, 2 * w // 5 : 3 * w // 5] = True
    for side in args.sides:
        drawn = overlay(pixels, [outer, inner], ["[LOC]", "[SEG]"], max_side=side)
        print(json.dumps({"image": args.image.name, "pixels": [w, h], "max_side": side, "overlay": list(drawn.shape[1::-1]),
                          "png_mb": round(encoded_bytes(drawn, "png") / 1e6, 2), "jpg_mb": round(encoded_bytes(drawn, "jpg") / 1e6, 2)}))


if __name__ == "__main__":
    main()

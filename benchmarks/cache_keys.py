"""Cost of an embedding-cache key per image: named by the processor's digest of SAM's input
(what the cache does now) against hashing the preprocessed float tensor (what it did before).

    python benchmarks/cache_keys.py --repeats 7 --markdown

Images: the real photos in ``../shared/realdata`` (every JPEG and PNG there, 0.1 to 28 MP), made
ready for SAM at the real size (1024² input, SAM's normalisation). For each image and each way,
the median over ``--repeats`` of the time to produce the key from what the processor hands over:

- ``tensor``: ``EmbeddingCache.key(image)``: the (3, 1024, 1024) float tensor's bytes hashed.
- ``digest``: ``sam_input_digest`` of the resized uint8 pixels (computed once per image by the
  processor) plus ``EmbeddingCache.key(image, digest)``.

It also checks, over every pair of images (with a copy of one and a one-pixel change of
another), that the two ways agree on which inputs are the same: the same hits and misses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from cores_cli.config import SAM_PIXEL_MEAN, SAM_PIXEL_STD  # noqa: E402
from cores_cli.engine.embedding_cache import EmbeddingCache  # noqa: E402
from cores_cli.images import load_image  # noqa: E402
from cores_cli.processing.transform import sam_input_digest, sam_normalise, sam_resized  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SIZE = 1024


def photos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REALDATA, help="folder searched for photos (default: ../shared/realdata)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp, "fingerprint")
        rows, inputs = [], []
        for path in photos(args.root):
            pixels = load_image(path).pixels
            small = sam_resized(pixels, SIZE)
            tensor, _ = sam_normalise(small, SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD)
            old = timed(lambda: cache.key(tensor), args.repeats)
            new = timed(lambda: cache.key(tensor, sam_input_digest(small, SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD)), args.repeats)
            rows.append({"image": str(path.relative_to(args.root)), "megapixels": pixels.shape[0] * pixels.shape[1] / 1e6, "tensor_ms": old * 1e3, "digest_ms": new * 1e3})
            inputs.append((small, tensor))
        # same hits and misses: a copy is the same input, a one-pixel change is another
        changed = inputs[0][0].copy()
        changed[0, 0, 0] ^= 1
        inputs += [(inputs[1][0].copy(), inputs[1][1].clone()), (changed, sam_normalise(changed, SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD)[0])]
        by_tensor = [cache.key(t) for _, t in inputs]
        by_digest = [cache.key(t, sam_input_digest(s, SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD)) for s, t in inputs]
        agree = all((by_tensor[i] == by_tensor[j]) == (by_digest[i] == by_digest[j]) for i in range(len(inputs)) for j in range(len(inputs)))
    tensor_ms = [r["tensor_ms"] for r in rows]
    digest_ms = [r["digest_ms"] for r in rows]
    summary = {
        "images": len(rows),
        "tensor_ms_median": statistics.median(tensor_ms),
        "tensor_ms_range": [min(tensor_ms), max(tensor_ms)],
        "digest_ms_median": statistics.median(digest_ms),
        "digest_ms_range": [min(digest_ms), max(digest_ms)],
        "same_hits_and_misses": agree,
    }
    if args.json:
        print(json.dumps({"summary": summary, "rows": rows}))
    elif args.markdown:
        print("| image | MP | tensor key (ms) | digest key (ms) |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['image']} | {r['megapixels']:.1f} | {r['tensor_ms']:.1f} | {r['digest_ms']:.2f} |")
        print(
            f"\n{len(rows)} images: tensor key median {summary['tensor_ms_median']:.1f} ms ({min(tensor_ms):.1f}–{max(tensor_ms):.1f}), "
            f"digest key median {summary['digest_ms_median']:.2f} ms ({min(digest_ms):.2f}–{max(digest_ms):.2f}); same hits and misses: {agree}"
        )
    else:
        print(json.dumps(summary, indent=2))
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())

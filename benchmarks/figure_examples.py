"""A figure like the paper's Fig. 5: image, depth-1 (LISA-like) mask, CoReS's first-level
([LOC]) mask, CoReS's final mask, ground truth, for a few synthetic scenes.

    python benchmarks/figure_examples.py --lisa runs/ablations/depth1-s0 --cores runs/ablations/cores-s0 \\
        --out docs/figures/examples.png --n 6

Rows are the first ``--n`` scenes of ``synthetic:test`` (``--start`` to move on), not picked for
looking good; each row's caption gives the query and both models' IoU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores_cli.data.registry import load_samples  # noqa: E402
from cores_cli.engine.checkpoint import load_checkpoint  # noqa: E402
from cores_cli.engine.loading import exemplar_sampler  # noqa: E402
from cores_cli.engine.predictor import Predictor  # noqa: E402
from cores_cli.engine.train_state import find_resume_checkpoint  # noqa: E402
from cores_cli.metrics import intersection_union, target_iou  # noqa: E402

SCALE = 2
COLOURS = {"lisa": (255, 160, 0), "loc": (30, 144, 255), "final": (0, 200, 90), "gt": (230, 40, 40)}


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint, or a run directory (its latest checkpoint)."""
    return find_resume_checkpoint(path / "checkpoints") or path


def tint(pixels: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = pixels.astype(np.float32)
    out[mask] = out[mask] * 0.4 + np.array(colour, np.float32) * 0.6
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def panel(pixels: np.ndarray, title: str) -> np.ndarray:
    big = cv2.resize(pixels, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
    bar = np.full((22, big.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, big], 0)


def caption(text: str, width: int) -> np.ndarray:
    bar = np.full((24, width, 3), 235, np.uint8)
    cv2.putText(bar, text[:140], (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lisa", type=Path, required=True, help="depth-1 checkpoint or run directory")
    ap.add_argument("--cores", type=Path, required=True, help="depth-2 CoReS checkpoint or run directory")
    ap.add_argument("--out", type=Path, default=Path("docs/figures/examples.png"))
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()

    models = {}
    for key in ("lisa", "cores"):
        model, _ = load_checkpoint(checkpoint_dir(getattr(args, key)))
        models[key] = Predictor(model.eval(), exemplar_sampler(model, None, 0))
    samples = load_samples(f"synthetic:{args.split}", n=args.start + args.n)[args.start :]
    rows = []
    for s in samples:
        rnd = s.rounds[0]
        px = s.image_array
        gt = rnd.target.rasterize(*px.shape[:2])
        lisa = models["lisa"].predict(px, rnd.query, style=rnd.style)
        cor = models["cores"].predict(px, rnd.query, style=rnd.style)
        ious = {k: target_iou(*intersection_union(p.mask, gt)) for k, p in (("lisa", lisa), ("cores", cor))}
        panels = [
            panel(px, "image"),
            panel(tint(px, lisa.mask, COLOURS["lisa"]), f"depth 1 (IoU {ious['lisa']:.2f})"),
            panel(tint(px, cor.level_masks[0], COLOURS["loc"]), "CoReS [LOC] level"),
            panel(tint(px, cor.mask, COLOURS["final"]), f"CoReS final (IoU {ious['cores']:.2f})"),
            panel(tint(px, gt == 1, COLOURS["gt"]), "ground truth"),
        ]
        strip = np.concatenate([np.concatenate([p, np.full((p.shape[0], 4, 3), 255, np.uint8)], 1) for p in panels], 1)
        rows.append(np.concatenate([caption(f'"{rnd.query}"', strip.shape[1]), strip, np.full((6, strip.shape[1], 3), 255, np.uint8)], 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()

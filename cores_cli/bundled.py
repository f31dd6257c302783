"""What ships inside the package: the example image and its query, and the tiny model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# synthetic:test scene 106 (seed 0): a car beside a tree, with a loose dark disc that looks like
# a wheel; the shipped model never saw it in training
EXAMPLE_QUERY = "What does this car roll on when it moves forward?"


def example_image() -> Path:
    """The bundled example image (``cores predict --example``)."""
    return Path(str(resources.files("cores_cli") / "assets" / "example.png"))


def embedded_checkpoint() -> Path | None:
    """The tiny checkpoint shipped in the package (trained on the synthetic benchmark with the
    ``tiny-synthetic`` recipe; docs/RESULTS.md), used when no model is named."""
    path = Path(str(resources.files("cores_cli") / "assets" / "demo"))
    return path if (path / "config.json").is_file() else None

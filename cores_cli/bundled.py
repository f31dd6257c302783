"""What ships inside the package: the example image and its query, and the tiny model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# synthetic:test scene 106 (seed 0): a car beside a tree, with a loose dark disc that looks like
# a wheel; the shipped model never saw it in training
EXAMPLE_QUERY = "What does this car roll on when it moves forward?"


EMBEDDED_SOURCE = "embedded:tiny-synthetic"
"""How a model loaded from :func:`embedded_checkpoint` names its source."""

SYNTHETIC_SCENE_SIZE = (128, 128)
"""(height, width) of the synthetic scenes the shipped model was trained on."""


def synthetic_only_warning(what: str) -> str:
    """The one line a user sees when the shipped model meets ``what`` it never learned."""
    return (
        f"the default model was trained only on synthetic 128×128 scenes, so on {what} its masks mean little; "
        "pass a real checkpoint with -c/--checkpoint (README: Models and configuration)"
    )


def is_synthetic_scene_size(height: int, width: int) -> bool:
    return (height, width) == SYNTHETIC_SCENE_SIZE


def example_image() -> Path:
    """The bundled example image (``cores predict --example``)."""
    return Path(str(resources.files("cores_cli") / "assets" / "example.png"))


def embedded_checkpoint() -> Path | None:
    """The tiny checkpoint shipped in the package (trained on the synthetic benchmark with the
    ``tiny-synthetic`` recipe; docs/RESULTS.md), used when no model is named."""
    path = Path(str(resources.files("cores_cli") / "assets" / "demo"))
    return path if (path / "config.json").is_file() else None

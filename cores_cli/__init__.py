"""cores: CoReS reasoning segmentation (chain of reasoning in LLaVA, chain of segmenting in SAM).

    import cores_cli
    model = cores_cli.load()                      # or load("runs/x/best"), load("org/name")
    result = model.predict("photo.jpg", "what gives dogs their sense of smell?")
    result.mask                                   # bool (H, W)

See :mod:`cores_cli.api`. Importing the package is cheap: torch loads on the first ``load``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"
__all__ = ["EXAMPLE_QUERY", "Result", "Segmenter", "example_image", "load", "__version__"]

from .bundled import EXAMPLE_QUERY, example_image

if TYPE_CHECKING:
    from .api import Result, Segmenter, load


def __dir__() -> list[str]:
    # tab completion in a notebook lists the API before it is loaded
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    # the API (and torch behind it) loads on first use, so `cores --help` stays fast
    if name in ("load", "Result", "Segmenter"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cores_cli' has no attribute {name!r}")

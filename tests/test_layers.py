"""The layers of docs/ARCHITECTURE.md, checked on the source: which folder may import which.

Every import counts, at the top of a module or inside a function or a TYPE_CHECKING block: a
lazy import still ties the two layers together.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ABOVE_THE_LEAVES = {"model", "data", "processing", "engine", "builders", "cli", "api", "demo"}
LEAVES = ("config", "configio", "contexts", "metrics", "images", "fileio", "runtime", "ignore_values", "bundled", "errors", "visualize", "hub", "rle", "threads")

# layer (a folder of cores_cli, or a top-level module) -> the layers it must never import
FORBIDDEN = {
    "model": {"data", "processing", "engine", "builders", "cli", "api", "demo"},
    "data": {"model", "processing", "engine", "builders", "cli", "api", "demo"},
    "processing": {"engine", "builders", "cli", "api", "demo"},
    "engine": {"builders", "cli", "api", "demo"},
    "builders": {"model", "processing", "engine", "cli", "api", "demo"},
    "api": {"builders", "cli", "demo"},
    "demo": {"builders", "cli"},
    # the shared leaves are imported by every layer and import none of them
    **{leaf: ABOVE_THE_LEAVES for leaf in LEAVES},
}
ONLY_FROM_CLI = "cli"


def _layer(module: str) -> str:
    """``cores_cli.model.cores`` -> ``model``, ``cores_cli.api`` -> ``api``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute names of the cores_cli modules that ``path`` (under ``root``) imports."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # an __init__'s package is its own folder, as for any other module
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import engine`
    return {m for m in found if m == "cores_cli" or m.startswith("cores_cli.")}


def violations(root: Path) -> list[str]:
    """Every import under ``root/cores_cli`` that crosses a layer the wrong way."""
    wrong = []
    for path in sorted((root / "cores_cli").rglob("*.py")):
        rel = path.relative_to(root / "cores_cli")
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for module in sorted(imported_modules(path, root)):
            layer = _layer(module)
            if layer in FORBIDDEN.get(own, ()) or (layer == ONLY_FROM_CLI and own not in (ONLY_FROM_CLI, "__main__")):
                wrong.append(f"cores_cli/{rel} imports {module}")
    return wrong


def test_no_module_imports_a_layer_it_must_not():
    assert violations(REPO) == []


def test_the_check_reports_imports_that_cross_the_wrong_way(tmp_path):
    planted = {
        "model/planted.py": "from ..data.records import SegSample\nfrom ..config import ModelConfig\n",
        "data/planted.py": "def f():\n    from cores_cli.model import sam\n",
        "engine/planted.py": "from ..cli.common import fail\nfrom ..model.cores import CoresModel\n",
        "processing/planted.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import engine\n",
        "images.py": "from .engine.predictor import Predictor\n",
        "api.py": "from .builders import reasonpart\n",
    }
    for name, text in planted.items():
        (tmp_path / "cores_cli" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cores_cli" / name).write_text(text)
    assert violations(tmp_path) == [
        "cores_cli/api.py imports cores_cli.builders",
        "cores_cli/api.py imports cores_cli.builders.reasonpart",
        "cores_cli/data/planted.py imports cores_cli.model",
        "cores_cli/data/planted.py imports cores_cli.model.sam",
        "cores_cli/engine/planted.py imports cores_cli.cli.common",
        "cores_cli/engine/planted.py imports cores_cli.cli.common.fail",
        "cores_cli/images.py imports cores_cli.engine.predictor",
        "cores_cli/images.py imports cores_cli.engine.predictor.Predictor",
        "cores_cli/model/planted.py imports cores_cli.data.records",
        "cores_cli/model/planted.py imports cores_cli.data.records.SegSample",
        "cores_cli/processing/planted.py imports cores_cli.engine",
    ]

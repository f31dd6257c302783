"""Docstrings and comments point at documents that exist in the repository."""

from __future__ import annotations

import re

from conftest import REPO

DOC_REFERENCE = re.compile(r"\bdocs/[A-Za-z0-9_]+\.md\b")


def cited_documents() -> dict[str, set[str]]:
    """``docs/NAME.md`` -> the source files that name it."""
    cited: dict[str, set[str]] = {}
    for path in sorted((REPO / "cores_cli").rglob("*.py")):
        for ref in DOC_REFERENCE.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(ref, set()).add(str(path.relative_to(REPO)))
    return cited


def test_every_document_the_code_cites_exists():
    cited = cited_documents()
    assert "docs/EVAL.md" in cited and "docs/ARCHITECTURE.md" in cited
    missing = {ref: sorted(files) for ref, files in cited.items() if not (REPO / ref).is_file()}
    assert missing == {}


def test_no_module_cites_a_design_note_outside_the_repository():
    # "DESIGN §N" pointed at a file only the founding team had
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "cores_cli").rglob("*.py") if "DESIGN §" in p.read_text(encoding="utf-8")]
    assert offenders == []

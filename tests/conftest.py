"""Shared test fixtures. Tests run on the CPU with tiny presets and no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _realdata_dir() -> Path | None:
    env = os.environ.get("CORES_REALDATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "realdata", REPO / ".." / ".." / "shared" / "realdata"]:
        if cand.is_dir():
            return cand.resolve()
    return None


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real third-party sample files (../shared/realdata), read in place, never copied."""
    path = _realdata_dir()
    if path is None:
        pytest.skip("../shared/realdata not found (set CORES_REALDATA)")
    return path

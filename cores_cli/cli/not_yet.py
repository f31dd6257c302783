"""Commands whose implementation lands in a later release say so and exit non-zero."""

from __future__ import annotations

from ..errors import NotYetAvailable


def not_yet(command: str, issue: int) -> None:
    raise NotYetAvailable(f"`cores {command}` is not available in this version yet (tracked in issue #{issue})")

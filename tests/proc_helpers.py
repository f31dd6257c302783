"""Interrupting a real run: start a command, SIGKILL it once its output file holds enough lines."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

HANG_GUARD_S = 1800.0
"""Only a guard against a hung command, never a time budget: the wait is for an event (lines in a
file, or the command's exit), however slow the machine is."""


def kill_after_lines(cmd: list[str], watched: Path, lines: int, env: dict[str, str], cwd: Path) -> bytes:
    """Run ``cmd`` until ``watched`` has ``lines`` newlines, then SIGKILL it, so that no clean-up
    code runs; returns its stdout + stderr.

    Fails the test (with the command's output) if the command ends first or appears hung: a kill
    at the wrong moment would make the caller's resume check test nothing.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + HANG_GUARD_S
    reached = False
    while proc.poll() is None and time.monotonic() < deadline:
        if watched.exists() and watched.read_bytes().count(b"\n") >= lines:
            reached = True
            break
        time.sleep(0.01)
    proc.kill()
    stdout, stderr = proc.communicate()
    if not reached:
        why = f"exited with {proc.returncode}" if proc.returncode != -9 else "seemed hung"
        raise AssertionError(f"{cmd[:4]} {why} before {watched} held {lines} lines:\n{(stdout + stderr).decode(errors='replace')[-3000:]}")
    return stdout + stderr

"""Interrupting a real run: start a command, SIGKILL it once its output file holds enough lines."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def kill_after_lines(cmd: list[str], watched: Path, lines: int, env: dict[str, str], cwd: Path, timeout: float = 60) -> bytes:
    """Run ``cmd`` until ``watched`` has ``lines`` newlines (or the command ends, or ``timeout``),
    then SIGKILL it, so that no clean-up code runs; returns its stdout + stderr."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if watched.exists() and watched.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.01)
    proc.kill()
    stdout, stderr = proc.communicate()
    return stdout + stderr

"""A model command ends without Python's teardown of torch and transformers (issue 16 item 1),
and loses nothing by it: exit status, exit handlers, buffered output."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys, threading
from cores_cli.cli.app import exit_without_teardown
atexit.register(lambda: print("handler ran", flush=True))
print("buffered", end=" ")
sys.stderr.write("to stderr ")
{before}
exit_without_teardown({code!r})
print("not ended", end=" ")
{after}
"""


def run(code, before: str = "", after: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(code=code, before=before, after=after)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (2, 2), (130, 130)])
def test_the_status_the_handlers_and_the_buffers_survive(code, status):
    out = run(code)
    assert out.returncode == status
    assert out.stdout == "buffered handler ran\n"
    assert out.stderr == "to stderr "


def test_a_message_as_exit_code_is_printed_with_status_1():
    out = run("bad input")
    assert out.returncode == 1 and out.stderr == "to stderr bad input\n"


def test_a_running_thread_keeps_the_normal_exit():
    gate = "gate = threading.Event(); threading.Thread(target=gate.wait).start()"
    out = run(3, gate, "gate.set()")
    # not ended by exit_without_teardown: the script goes on and ends normally (status 0)
    assert out.returncode == 0 and out.stdout == "buffered not ended handler ran\n"


def test_predict_writes_everything_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cores_cli", "predict", "--example", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["example.json", "example.mask.png", "example.overlay.png"]
    assert "example.mask.png" in out.stdout and "leaked" not in out.stderr and "Traceback" not in out.stderr


def test_a_profiler_keeps_the_normal_exit(tmp_path):
    # cProfile writes its file at the normal exit; ending before it would lose the profile
    out = run(4, "import cProfile; profiler = cProfile.Profile(); profiler.enable()", f"profiler.disable(); profiler.dump_stats({str(tmp_path / 'p.prof')!r})")
    assert out.returncode == 0 and out.stdout == "buffered not ended handler ran\n"
    assert (tmp_path / "p.prof").is_file()

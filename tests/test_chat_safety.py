"""Chat-driven commands against servers that misbehave, and build-context against bad outputs.

Every request has a deadline for the whole of it (a server that trickles bytes or never answers
cannot hold a run), the run gives up after a bounded streak of failed attempts and at once on a
refused connection, naming the URL; the same for ``make-reasonpart --questions chat``, which
shares the request loop. One build-context run at a time may write a library file; an output
that is a folder or not UTF-8 is one line naming it.

No test measures time. A run that must give up on a misbehaving server is shown to have ended
while the server was still holding or trickling its replies (``server.pending``); on code
without a deadline these tests hang instead of passing.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cores_cli.builders.context_library import BuildOptions, build_context
from cores_cli.builders.reasonpart import ReasonPartOptions, make_reasonpart
from cores_cli.cli.app import app
from cores_cli.contexts import load_library, object_key
from cores_cli.errors import CoresError

from fixtures_reasonpart import partimagenet_fixture
from openai_server import (
    ChatRequest,
    OpenAIServer,
    error_reply,
    held,
    json_reply,
    no_reply,
    refused_url,
    trickle_reply,
)

KEY = "canary-key-0b7d2e"
REPO = Path(__file__).resolve().parents[1]
GUARD_S = 120.0  # only against a hang of the code under test; every wait is for an event


def requested(request: ChatRequest) -> list[str]:
    return json.loads(request.last_user_content)["objects"]


def entry(obj: str) -> dict:
    return {"object": obj, "appears_on": "a test backdrop", "location": "in the middle of the picture", "appearance": "a plain test shape"}


def answer_all(request: ChatRequest):
    return json_reply({"exemplars": [entry(o) for o in requested(request)]})


@pytest.fixture
def server():
    with OpenAIServer(answer_all) as srv:
        yield srv


def options(tmp_path: Path, url: str, n: int, **kw) -> BuildOptions:
    base = dict(n=n, out=tmp_path / "lib.jsonl", base_url=url, backoff=0.001, timeout=30.0, concurrency=1)
    base.update(kw)
    return BuildOptions(**base)


def invoke(*args) -> object:
    return CliRunner().invoke(app, ["build-context", *map(str, args)], env={"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": None})


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- item 8: one writer per library file ---------------------------------------------------------


def test_a_second_run_on_the_same_out_is_refused_while_the_first_is_running(tmp_path, server):
    asked, release = threading.Event(), threading.Event()

    def hold_the_first(request: ChatRequest):
        if len(server.chat_requests) > 1:
            return answer_all(request)
        asked.set()
        return held(answer_all(request), release)

    server.handler = hold_the_first
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(summary=build_context(options(tmp_path, server.url, 5), KEY)))
    worker.start()
    try:
        assert asked.wait(GUARD_S), "the first run never sent its request"
        # the first run is waiting for its reply: a second writer of the same file is refused
        with pytest.raises(CoresError) as refused:
            build_context(options(tmp_path, server.url, 5), KEY)
        assert str(tmp_path / "lib.jsonl") in str(refused.value)
        assert f"is being written by process {os.getpid()}" in str(refused.value)
        assert len(server.chat_requests) == 1  # the second run asked nothing
    finally:
        release.set()
        worker.join(GUARD_S)
    assert first["summary"].complete
    keys = [object_key(e.object) for e in load_library(tmp_path / "lib.jsonl")]
    assert len(keys) == 5 == len(set(keys))  # no duplicate exemplars


def test_the_cli_names_the_process_that_holds_the_library(tmp_path, server):
    from cores_cli.fileio import exclusive_lock

    out = tmp_path / "lib.jsonl"
    out.write_bytes(load_library(REPO / "contexts" / "seeds.jsonl")[0].to_json().encode() + b"\n")
    before = out.read_bytes()
    with exclusive_lock(out):  # as a running build-context holds it
        result = invoke("--n", "3", "--out", out, "--base-url", server.url)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"is being written by process {os.getpid()}" in one_line(result.stderr)
    assert server.requests == [] and out.read_bytes() == before


# ---- item 11: a deadline per request, a bounded streak of failures, refused connections ----------


@pytest.mark.parametrize("head", [False, True], ids=["body", "status-line"])
def test_a_server_that_trickles_bytes_cannot_outlast_the_deadline(tmp_path, server, head):
    server.handler = lambda r: trickle_reply(0.01, head=head)  # a byte every 10 ms, for ever
    summary = build_context(options(tmp_path, server.url, 2, timeout=0.5, retries=1, max_failed_requests=1), KEY)
    assert server.wait_for_pending(2)  # the run is over while both replies are still trickling in
    assert not summary.complete and summary.failed == {"timeout": 1} and summary.retried == {"timeout": 1}
    assert summary.message() == "stopped at 0/2: 1 requests failed after 1 retry (timeout: 1)"


def test_a_server_that_never_answers_stops_the_run_at_the_default_streak_limit(tmp_path, server):
    server.handler = lambda r: no_reply()
    o = BuildOptions(n=20, out=tmp_path / "lib.jsonl", base_url=server.url, timeout=0.3, backoff=0.001)
    summary = build_context(o, KEY)  # the defaults otherwise: 4 in flight, 5 retries, 10 failed requests
    assert server.wait_for_pending(o.max_consecutive_failures, at_least=True)  # none was ever answered
    assert not summary.complete and summary.accepted == 0
    streak = o.max_consecutive_failures
    assert summary.stop_reason.startswith(f"{streak} attempts in a row got no usable answer from {server.url} (timeout: {streak})")
    assert "raise --timeout (now 0.3 s)" in summary.stop_reason
    # the requests in flight when the streak was reached were abandoned, and nothing more was sent
    assert len(server.chat_requests) < streak + o.concurrency


def test_a_reply_breaks_the_streak_and_429_does_not_count(tmp_path, server):
    # six failures and a 429, but never three failures in a row without an answer between them
    script = ["500", "429", "503", "answer", "500", "500", "answer", "503", "500", "answer"]

    def scripted(request: ChatRequest):
        step = script.pop(0)
        return answer_all(request) if step == "answer" else error_reply(int(step), retry_after=0)

    server.handler = scripted
    summary = build_context(options(tmp_path, server.url, 3, batch_size=1, max_consecutive_failures=3), KEY)
    assert summary.complete and summary.failed == {} and script == []
    assert summary.retried == {"HTTP 500": 4, "HTTP 503": 2, "HTTP 429": 1}


def test_a_refused_connection_fails_fast_with_one_line_naming_the_url(tmp_path):
    out = tmp_path / "lib.jsonl"
    with refused_url() as url:
        result = invoke("--n", "3", "--out", out, "--base-url", url, "--backoff", "0.001", "--concurrency", "1", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: stopped at 0/3: cannot connect to {url}: connection refused 2 times" in one_line(result.stderr)
    summary = json.loads(result.stdout)
    assert summary["requests"] == 2 and summary["failed"] == {"connection refused": 1}  # not 5 retries × 10 requests


def reasonpart_options(tmp_path: Path, url: str, **kw) -> ReasonPartOptions:
    fixture = partimagenet_fixture(tmp_path / "pin", n_images=2)
    base = dict(source="partimagenet", ann=fixture.ann, images=fixture.images, out=tmp_path / "rp", base_url=url,
                model="test-model", backoff=0.001, concurrency=1)
    base.update(kw)
    return ReasonPartOptions(**base)


def manifest_lines(out: Path) -> list[str]:
    path = out / "manifest.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_make_reasonpart_gives_up_on_a_trickling_server_at_the_deadline(tmp_path, server):
    server.handler = lambda r: trickle_reply(0.01)
    summary = make_reasonpart(reasonpart_options(tmp_path, server.url, timeout=0.5, retries=1, max_failed_requests=1), "k")
    assert server.wait_for_pending(2)
    assert not summary.complete and summary.failed == {"timeout": 1}
    assert "1 requests failed after 1 retry (timeout: 1)" in summary.message()
    assert manifest_lines(tmp_path / "rp") == []


def test_make_reasonpart_stops_on_a_server_that_never_answers(tmp_path, server):
    server.handler = lambda r: no_reply()
    o = reasonpart_options(tmp_path, server.url, timeout=0.3, max_consecutive_failures=2)
    summary = make_reasonpart(o, "k")
    assert not summary.complete and "2 attempts in a row got no usable answer" in summary.message()
    assert server.wait_for_pending(2) and len(server.chat_requests) == 2
    assert manifest_lines(tmp_path / "rp") == []


def test_make_reasonpart_fails_fast_on_a_refused_connection(tmp_path):
    with refused_url() as url:
        summary = make_reasonpart(reasonpart_options(tmp_path, url), "k")
    assert not summary.complete and summary.requests == 2
    assert f"cannot connect to {url}: connection refused" in summary.message()


# ---- item 12: outputs that cannot be a library -----------------------------------------------------


def test_an_out_that_is_a_folder_is_one_line_naming_it(tmp_path, server):
    folder = tmp_path / "library"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = invoke("--n", "2", "--out", folder, "--base-url", server.url)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: --out {folder} is a folder" in one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library"] and (folder / "notes.txt").read_text() == "mine"
    assert server.requests == []


def test_an_out_that_is_not_utf8_is_one_line_naming_it_and_kept(tmp_path, server):
    out = tmp_path / "lib.jsonl"
    good = load_library(REPO / "contexts" / "seeds.jsonl")[0].to_json().encode()
    out.write_bytes(good + b"\n" + b'{"object": "caf\xe9"}\n')  # Latin-1, as an editor might save it
    before = out.read_bytes()
    result = invoke("--n", "3", "--out", out, "--base-url", server.url)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {out}, line 2: not UTF-8 text" in one_line(result.stderr)
    assert out.read_bytes() == before and server.requests == []


def test_an_out_that_is_the_seeds_file_is_refused(tmp_path, server):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes((REPO / "contexts" / "seeds.jsonl").read_bytes())
    before = seeds.read_bytes()
    os.link(seeds, tmp_path / "hard.jsonl")
    for out in (seeds, tmp_path / "hard.jsonl"):  # the same file under another name, too
        result = invoke("--n", "50", "--out", out, "--seeds", seeds, "--base-url", server.url)
        assert result.exit_code == 1 and "is the --seeds file" in one_line(result.stderr)
    assert seeds.read_bytes() == before and server.requests == []


def test_an_out_that_is_a_fifo_is_one_line_not_a_hang(tmp_path, server):
    fifo = tmp_path / "lib.jsonl"
    os.mkfifo(fifo)  # opening it to write would wait for a reader for ever
    result = invoke("--n", "3", "--out", fifo, "--base-url", server.url)
    assert result.exit_code == 1 and "is not a regular file" in one_line(result.stderr)
    assert server.requests == []


def test_the_lock_holds_for_every_spelling_of_the_output(tmp_path, server):
    from cores_cli.fileio import exclusive_lock

    out = tmp_path / "lib.jsonl"
    out.write_bytes(load_library(REPO / "contexts" / "seeds.jsonl")[0].to_json().encode() + b"\n")
    (tmp_path / "link.jsonl").symlink_to(out)
    with exclusive_lock(out):  # as a running build-context holds it
        result = invoke("--n", "3", "--out", tmp_path / "link.jsonl", "--base-url", server.url)
    assert result.exit_code == 1 and "is being written by process" in one_line(result.stderr)
    assert server.requests == []

"""`cores build-context` against a real OpenAI-compatible HTTP server on 127.0.0.1.

The real ``openai`` client talks HTTP to ``tests/openai_server.py``; nothing of the client is
mocked. Back-offs are milliseconds so the whole file runs in seconds. No test measures time: a
reply that must be abandoned is held back by the server until the test releases it after the
build returned, and the interrupted run is killed once the server holds its next request.
(Deadlines, give-up rules, the output lock and bad files: ``test_chat_safety.py``.)
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cores_cli.builders.chat_requests import backoff_delay
from cores_cli.builders.chat_settings import NO_KEY_PLACEHOLDER, redact
from cores_cli.builders.context_library import BuildOptions, build_context, parse_reply
from cores_cli.cli.app import app
from cores_cli.contexts import ExemplarError, load_library, load_vocabulary, object_key

from proc_helpers import kill_after_lines
from openai_server import ChatRequest, OpenAIServer, chat_reply, error_reply, held, json_reply

KEY = "canary-key-5e1f0c9a7d"  # not sk-shaped, so only exact redaction can hide it; never to be seen
REPO = Path(__file__).resolve().parents[1]


def requested(request: ChatRequest) -> list[str]:
    """The objects build-context asked for in this request (its last user message)."""
    return json.loads(request.last_user_content)["objects"]


def entry(obj: str, look: str = "a plain test shape") -> dict:
    return {"object": obj, "appears_on": "a test backdrop", "location": "in the middle of the picture", "appearance": look}


def answer_all(request: ChatRequest) -> object:
    return json_reply({"exemplars": [entry(o) for o in requested(request)]})


@pytest.fixture
def server():
    with OpenAIServer(answer_all) as srv:
        yield srv


def options(tmp_path: Path, server: OpenAIServer, n: int, **kw) -> BuildOptions:
    # the timeout is a deadline for a whole request: generous, so that a loaded machine answering
    # slowly is not mistaken for a dead server (tests of timeouts hold replies back instead)
    base = dict(n=n, out=tmp_path / "lib.jsonl", base_url=server.url, backoff=0.001, timeout=30.0, concurrency=1)
    base.update(kw)
    return BuildOptions(**base)


def invoke(args: list[str], key: str | None = KEY):
    env = {"OPENAI_API_KEY": key, "OPENAI_BASE_URL": None}
    return CliRunner().invoke(app, ["build-context", *args], env=env)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- happy path ---------------------------------------------------------------------------------


def test_happy_path_through_the_cli(tmp_path, server):
    out = tmp_path / "lib.jsonl"
    args = ["--n", "7", "--out", str(out), "--base-url", server.url, "--model", "test-model",
            "--batch-size", "3", "--concurrency", "2", "--temperature", "0.3", "--backoff", "0.001", "--json"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["accepted"] == 7 and summary["complete"] and summary["rejected"] == {} and summary["failed"] == {}
    assert "build-context summary" in result.stderr and "7/7" in result.stderr

    library = load_library(out)
    assert len(library) == 7 == len(lines(out))
    assert {e.source for e in library} == {"test-model"}
    vocab_keys = {object_key(o) for o in load_vocabulary().objects()}
    assert {object_key(e.object) for e in library} <= vocab_keys
    assert len({object_key(e.object) for e in library}) == 7

    chats = server.chat_requests
    assert len(chats) == 3  # 7 objects in batches of at most 3
    for r in chats:
        assert r.headers["authorization"] == f"Bearer {KEY}"
        assert r.body["model"] == "test-model" and r.body["temperature"] == 0.3
        assert r.body["response_format"] == {"type": "json_object"}
        roles = [m["role"] for m in r.messages]
        assert roles == ["system", "user", "assistant", "user"]  # rules, few-shot seeds, request
        assert 1 <= len(requested(r)) <= 3
    asked = [o for r in chats for o in requested(r)]
    assert sorted(asked) == sorted(e.object for e in library)


def test_a_library_already_at_n_needs_no_request(tmp_path, server):
    build_context(options(tmp_path, server, 3), KEY)
    before = len(server.requests)
    summary = build_context(options(tmp_path, server, 3), KEY)
    assert summary.complete and summary.existing == 3 and summary.accepted == 0
    assert len(server.requests) == before


# ---- rejections ---------------------------------------------------------------------------------


def test_malformed_json_and_duplicates_are_rejected_with_reasons(tmp_path, server):
    out = tmp_path / "lib.jsonl"
    seed_line = load_library(REPO / "contexts" / "seeds.jsonl")[0]  # "dog paw"
    out.write_text(seed_line.to_json() + "\n")

    def handler(request: ChatRequest):
        objs = requested(request)
        # every reply repeats its first object and adds one that is already in the file
        return json_reply({"exemplars": [entry(o) for o in objs] + [entry(objs[0]), entry(seed_line.object)]})

    server.handler = handler
    server.enqueue(chat_reply("Sure! Here are your exemplars: {not json"))
    summary = build_context(options(tmp_path, server, 5, batch_size=2), KEY)

    assert summary.complete and summary.existing == 1 and summary.accepted == 4
    assert summary.rejected["malformed JSON"] == 1
    replies_with_entries = len(server.chat_requests) - 1
    assert summary.rejected["duplicate"] == 2 * replies_with_entries
    keys = [object_key(d["object"]) for d in lines(out)]
    assert len(keys) == 5 == len(set(keys))


def small_vocabulary(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "vocabulary.json"
    classes = [{"name": n, "object": n} for n in names]
    path.write_text(json.dumps({"schema_version": 1, "datasets": {"d": {"classes": classes}}}))
    return path


def test_entries_that_fail_validation_are_rejected_and_asked_again(tmp_path, server):
    calls: dict[str, int] = {}

    def handler(request: ChatRequest):
        out = []
        for o in requested(request):
            calls[o] = calls.get(o, 0) + 1
            out.append(entry(o, look=f"clearly a {o}") if calls[o] == 1 else entry(o))  # first try names it
        out.append(entry("not asked for"))
        return json_reply({"exemplars": out})

    server.handler = handler
    vocab = small_vocabulary(tmp_path, "anvil", "kettle drum", "lantern", "sundial")
    summary = build_context(options(tmp_path, server, 4, batch_size=2, vocabulary=vocab), KEY)
    assert summary.complete
    assert summary.rejected["names the object"] == 4
    assert summary.rejected["not requested"] == len(server.chat_requests) == 4
    assert calls == {"anvil": 2, "kettle drum": 2, "lantern": 2, "sundial": 2}
    assert summary.dropped_objects == 0


def test_a_model_that_never_gets_it_right_stops_the_run(tmp_path, server):
    server.handler = lambda r: chat_reply("I cannot produce JSON today.")
    summary = build_context(options(tmp_path, server, 50, max_barren_replies=3), KEY)
    assert not summary.complete and len(server.chat_requests) == 3
    assert summary.message() == "stopped at 0/50: 3 replies in a row had no acceptable entry (malformed JSON: 3)"


def test_objects_rejected_on_every_try_are_dropped_and_the_run_says_why(tmp_path, server):
    vocab = small_vocabulary(tmp_path, "anvil", "kettle drum", "lantern")
    server.handler = lambda r: json_reply({"exemplars": [entry(o, look="it is round") for o in requested(r)]})
    summary = build_context(options(tmp_path, server, 2, vocabulary=vocab, object_attempts=2), KEY)
    assert not summary.complete and summary.total == 0
    assert summary.dropped_objects == 3 and summary.rejected["bad clause"] == 6
    assert "ran out of objects" in summary.message() and "bad clause: 6" in summary.message()


# ---- transient failures ------------------------------------------------------------------------


def test_429_and_5xx_are_retried_with_backoff(tmp_path, server):
    server.enqueue(error_reply(429, retry_after=0), error_reply(500), error_reply(503))
    summary = build_context(options(tmp_path, server, 3, batch_size=3, retries=3), KEY)
    assert summary.complete and summary.failed == {}
    assert summary.retried == {"HTTP 429": 1, "HTTP 500": 1, "HTTP 503": 1}
    assert summary.requests == 4 == len(server.chat_requests)
    assert len({json.dumps(r.body, sort_keys=True) for r in server.chat_requests}) == 1  # the same request, resent


def test_a_reply_slower_than_the_timeout_is_abandoned_and_retried(tmp_path, server):
    release = threading.Event()
    server.enqueue(held(error_reply(500), release))  # the first request gets no reply until released
    # the held attempt times out on any machine; the deadline only has to leave the answered
    # retry enough time on a loaded one
    try:
        summary = build_context(options(tmp_path, server, 2, batch_size=2, timeout=3.0), KEY)
        # the build is over while the slow reply is still held back: it did not wait for it
        assert server.wait_for_pending(1)
    finally:
        release.set()
    assert summary.complete and summary.accepted == 2
    assert summary.retried.get("timeout", 0) >= 1 and summary.failed == {}


def test_failing_requests_stop_the_run_with_a_non_zero_exit_and_the_reason(tmp_path, server):
    server.handler = lambda r: error_reply(500, "upstream exploded")
    out = tmp_path / "lib.jsonl"
    args = ["--n", "3", "--out", str(out), "--base-url", server.url, "--retries", "2",
            "--max-failures", "2", "--backoff", "0.001", "--concurrency", "1"]
    result = invoke(args)
    assert result.exit_code == 1
    assert "error: stopped at 0/3: 2 requests failed after 2 retries (HTTP 500: 2)" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert len(server.chat_requests) == 2 * 3  # two requests, each tried 1 + 2 times


def test_timeouts_past_the_retries_are_reported_as_such(tmp_path, server):
    release = threading.Event()
    server.handler = lambda r: held(answer_all(r), release)
    try:
        summary = build_context(options(tmp_path, server, 2, timeout=0.2, retries=1, max_failed_requests=1), KEY)
        assert server.wait_for_pending(2)  # both attempts were given up while their replies were held back
    finally:
        release.set()
    assert not summary.complete and summary.failed == {"timeout": 1} and summary.retried == {"timeout": 1}
    assert summary.message() == "stopped at 0/2: 1 requests failed after 1 retry (timeout: 1)"


# ---- resume -------------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_to_exactly_n_unique_valid_entries(tmp_path, server):
    n, answered = 12, 4
    out = tmp_path / "lib.jsonl"
    holding = tmp_path / "holding.txt"  # a line per request the server holds back
    release = threading.Event()

    def first_four_then_hold(request: ChatRequest):
        if len(server.chat_requests) <= answered:
            return answer_all(request)
        with open(holding, "a") as fh:
            fh.write("held\n")
        return held(answer_all(request), release)

    server.handler = first_four_then_hold
    cmd = [sys.executable, "-m", "cores_cli", "build-context", "--n", str(n), "--out", str(out),
           "--base-url", server.url, "--batch-size", "1", "--concurrency", "1", "--backoff", "0.001"]
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    env.pop("OPENAI_BASE_URL", None)
    try:
        # SIGKILL (no clean-up code runs) while the server holds the fifth request: four lines written
        printed = kill_after_lines(cmd, holding, 1, env, tmp_path)
    finally:
        release.set()
    assert KEY.encode() not in printed
    written = lines(out)
    assert len(written) == answered
    with open(out, "ab") as fh:  # what a write cut short by a crash would leave
        fh.write(b'{"schema_version": 1, "object": "torn')
    before = {object_key(d["object"]) for d in written}
    requests_before = len(server.chat_requests)
    server.handler = answer_all

    summary = build_context(options(tmp_path, server, n), KEY)

    assert summary.torn_tail_removed and summary.existing == len(written)
    assert summary.accepted == n - len(written) and summary.complete
    library = load_library(out)
    assert len(library) == n == len(out.read_text().splitlines())
    assert len({object_key(e.object) for e in library}) == n
    asked_after = [o for r in server.chat_requests[requests_before:] for o in requested(r)]
    assert len(asked_after) == n - len(written)
    assert not {object_key(o) for o in asked_after} & before  # nothing already done was asked again
    assert out.read_bytes().endswith(b"\n")


def test_an_invalid_complete_line_stops_the_resume_with_its_line_number(tmp_path, server):
    out = tmp_path / "lib.jsonl"
    build_context(options(tmp_path, server, 2), KEY)
    with open(out, "a") as fh:
        fh.write('{"schema_version": 1}\n')
    result = invoke(["--n", "4", "--out", str(out), "--base-url", server.url])
    assert result.exit_code == 1
    assert "line 3" in result.stderr and "fix or remove that line" in result.stderr


# ---- the key ------------------------------------------------------------------------------------


def test_the_key_never_appears_in_files_logs_or_messages(tmp_path, server):
    out = tmp_path / "lib.jsonl"
    ok = invoke(["--n", "3", "--out", str(out), "--base-url", server.url, "--json"])
    assert ok.exit_code == 0

    # a server that echoes the key in its error message, as OpenAI's 401 does
    refusing = OpenAIServer(lambda r: error_reply(401, f"Incorrect API key provided: {KEY}")).start()
    try:
        bad = invoke(["--n", "5", "--out", str(out), "--base-url", refusing.url, "--backoff", "0.001", "--json"])
        refused_requests = len(refusing.chat_requests)
    finally:
        refusing.stop()
    assert bad.exit_code == 1
    assert "HTTP 401" in bad.stderr and "check OPENAI_API_KEY" in " ".join(bad.stderr.split())
    assert refused_requests == 1  # a refusal is not retried

    assert server.chat_requests[0].headers["authorization"] == f"Bearer {KEY}"  # the key was really used
    printed = ok.stdout + ok.stderr + bad.stdout + bad.stderr
    assert KEY not in printed and KEY[8:] not in printed
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_missing_key_is_a_clear_error_unless_the_server_is_local(tmp_path, server):
    result = invoke(["--n", "2", "--out", str(tmp_path / "x.jsonl"), "--base-url", "https://api.example.invalid/v1"], key=None)
    assert result.exit_code == 1
    assert "OPENAI_API_KEY is not set" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.jsonl").exists()

    local = invoke(["--n", "2", "--out", str(tmp_path / "y.jsonl"), "--base-url", server.url], key=None)
    assert local.exit_code == 0, local.output
    assert server.chat_requests[-1].headers["authorization"] == f"Bearer {NO_KEY_PLACEHOLDER}"


def test_n_beyond_the_vocabulary_is_refused_before_any_request(tmp_path, server):
    vocab = small_vocabulary(tmp_path, "anvil")
    result = invoke(["--n", "2", "--out", str(tmp_path / "x.jsonl"), "--base-url", server.url, "--vocabulary", str(vocab)])
    assert result.exit_code == 1
    assert "only 1 vocabulary objects" in result.stderr
    assert server.requests == []


# ---- small pieces -------------------------------------------------------------------------------


def test_parse_reply_accepts_the_usual_shapes_and_rejects_the_rest():
    e = entry("anvil")
    assert parse_reply(json.dumps({"exemplars": [e]})) == [e]
    assert parse_reply("```json\n" + json.dumps([e]) + "\n```") == [e]
    assert parse_reply(json.dumps(e)) == [e]
    for bad in ("", "plain words", json.dumps({"items": []})):
        with pytest.raises(ExemplarError):
            parse_reply(bad)


def test_redact_and_backoff():
    assert redact(f"bad key {KEY}!", KEY) == "bad key ***!"
    assert "sk-" not in redact("Incorrect API key provided: sk-proj-abc***wxyz", None)
    import random

    opts = BuildOptions(n=1, out=Path("x"), backoff=1.0, max_backoff=5.0)
    rng = random.Random(0)
    assert 0.5 <= backoff_delay(0, opts, None, rng) <= 1.0
    assert backoff_delay(10, opts, None, rng) <= 5.0
    assert backoff_delay(3, opts, 2.0, rng) == 2.0 and backoff_delay(0, opts, 99.0, rng) == 5.0

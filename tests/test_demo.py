"""`cores demo`: the request handler in-process, the Gradio page through its HTTP API, and (where a
Chromium is installed) the real page driven in a headless browser."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cores_cli
import cores_cli.demo
from cores_cli.bundled import EXAMPLE_QUERY, example_image
from cores_cli.demo.session import DemoSession
from cores_cli.errors import CoresError


@pytest.fixture(scope="module")
def segmenter():
    return cores_cli.load(device="cpu", max_pixels=1_000_000)


@pytest.fixture
def session(segmenter, tmp_path):
    return DemoSession(segmenter, tmp_path / "requests")


def bad_uploads(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(example_image().read_bytes()[:200])
    text = folder / "notes.png"
    text.write_text("not an image at all")
    huge = folder / "huge.png"
    Image.new("RGB", (1500, 1000)).save(huge)  # 1.5 MP against the 1 MP limit of these tests
    return {"corrupt": corrupt, "text": text, "huge": huge}


def test_a_request_gives_the_overlay_every_level_the_answer_and_files_to_download(session, segmenter):
    answer = session.ask(str(example_image()), EXAMPLE_QUERY, "teacher")
    direct = segmenter.predict(example_image(), EXAMPLE_QUERY)
    assert answer.answer == direct.answer and answer.question == direct.question
    # the overlay (small images are upscaled for display, the legend sits beside them)
    assert answer.overlay.ndim == 3 and answer.overlay.dtype == np.uint8
    assert answer.overlay.shape[0] >= direct.mask.shape[0] and answer.overlay.shape[1] >= direct.mask.shape[1]
    assert [caption for _, caption in answer.levels] == [f"level {i + 1}: {t}" for i, t in enumerate(direct.level_tokens)]
    saved = np.array(Image.open(answer.mask_png)) > 0
    assert np.array_equal(saved, direct.mask)
    record = json.loads(answer.record_json.read_text())
    assert record["answer"] == direct.answer and record["outputs"] == {"mask": "mask.png"}
    # each request has its own folder inside the session's own: two requests never share a file
    again = session.ask(str(example_image()), EXAMPLE_QUERY, "generate")
    assert again.mask_png.parent != answer.mask_png.parent and answer.mask_png.is_file()
    assert answer.mask_png.parent.parent == session.files and session.files.parent == session.workdir
    # what the page serves: the overlay and the levels as the request's own PNGs, whose content
    # differs between two requests with the same answer (Gradio caches files by content hash)
    assert np.array_equal(np.array(Image.open(answer.overlay_png).convert("RGB")), answer.overlay)
    assert [np.array_equal(np.array(Image.open(p).convert("RGB")), px) for p, (px, _) in zip(answer.level_pngs, answer.levels)] == [True] * len(answer.levels)
    twin = session.ask(str(example_image()), EXAMPLE_QUERY, "teacher")
    for a, b in [(answer.overlay_png, twin.overlay_png), (answer.mask_png, twin.mask_png), (answer.record_json, twin.record_json), *zip(answer.level_pngs, twin.level_pngs)]:
        assert a.read_bytes() != b.read_bytes(), a.name


def test_a_restarted_demo_with_the_same_workdir_keeps_answering(segmenter, tmp_path):
    first = DemoSession(segmenter, tmp_path)
    first.ask(str(example_image()), EXAMPLE_QUERY)
    second = DemoSession(segmenter, tmp_path)
    answer = second.ask(str(example_image()), EXAMPLE_QUERY)
    assert answer.mask_png.is_file() and second.files != first.files


@pytest.mark.parametrize(
    "image,question,mode,message",
    [
        (None, "q", "teacher", "upload an image"),
        ("EXAMPLE", "   ", "teacher", "type a question"),
        ("EXAMPLE", "q", "dream", "mode must be one of teacher, generate"),
        ("EXAMPLE", "x" * 3000, "teacher", "keep it under 2000"),
    ],
)
def test_a_bad_request_is_one_clear_message(session, image, question, mode, message):
    image = str(example_image()) if image == "EXAMPLE" else image
    with pytest.raises(CoresError, match=message):
        session.ask(image, question, mode)


@pytest.mark.parametrize("kind", ["corrupt", "text", "huge"])
def test_a_bad_upload_is_one_clear_message(session, tmp_path, kind):
    with pytest.raises(CoresError, match=r"that upload cannot be used: ") as err:
        session.ask(str(bad_uploads(tmp_path / "bad")[kind]), EXAMPLE_QUERY)
    assert "\n" not in str(err.value)


def test_the_command_says_how_to_install_the_extra_when_gradio_is_missing(monkeypatch):
    import sys

    from conftest import error_lines, invoke_cli

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    result = invoke_cli("demo")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert 'pip install "cores[demo]"' in line


# ------------------------------------------------------------------------------ the page

NEEDS_GRADIO = 'the web page needs the demo extra: pip install "cores[demo]"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(session):
    pytest.importorskip("gradio", reason=NEEDS_GRADIO)
    from cores_cli.demo.app import build_app, launch

    app = build_app(session, [(example_image(), EXAMPLE_QUERY)])
    port = free_port()
    launch(app, session, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_the_page_answers_queues_and_keeps_serving_after_bad_uploads(page, session, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(page, verbose=False, httpx_kwargs={"timeout": None})
    overlay, answer, levels, mask, record = client.predict(handle_file(str(example_image())), EXAMPLE_QUERY, "teacher", api_name="/segment")
    assert answer == "Sure, it appears on [LOC]. It is [SEG]."
    assert Image.open(overlay).size[0] >= Image.open(example_image()).size[0] and len(levels) == 2
    assert np.array_equal(np.array(Image.open(mask)) > 0, cores_cli.load(device="cpu").predict(example_image(), EXAMPLE_QUERY).mask)
    assert json.loads(Path(record).read_text())["answer"] == answer
    for kind, path in bad_uploads(tmp_path / "bad").items():
        with pytest.raises(Exception) as err:  # the page shows cores' message; the client raises it
            client.predict(handle_file(str(path)), EXAMPLE_QUERY, "teacher", api_name="/segment")
        message = str(err.value)
        assert "that upload cannot be used: " in message and "\n" not in message.strip(), (kind, message)
    # concurrent requests queue for the one model, and all are answered (each result is waited
    # for as long as it takes: no client-side time limit)
    patient = Client(page, verbose=False, httpx_kwargs={"timeout": None})
    jobs = [patient.submit(handle_file(str(example_image())), EXAMPLE_QUERY, "teacher", api_name="/segment") for _ in range(3)]
    assert [job.result()[1] for job in jobs] == [answer] * 3


def test_the_page_binds_to_localhost_serves_only_its_files_and_never_shares(session, monkeypatch):
    pytest.importorskip("gradio", reason=NEEDS_GRADIO)
    import inspect

    from cores_cli.cli.demo import demo
    from cores_cli.demo.app import build_app, launch

    assert inspect.signature(demo).parameters["host"].default.default == "127.0.0.1"
    app = build_app(session, [])
    seen = {}
    monkeypatch.setattr(app, "launch", lambda **kwargs: seen.update(kwargs))
    launch(app, session, "127.0.0.1", 7860)
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False
    assert seen["allowed_paths"] == [str(session.files)] and session.files != session.workdir
    # building the page wrote nothing into the package (a Gradio component subclass would: a .pyi)
    assert not list(Path(cores_cli.demo.__file__).parent.glob("*.pyi"))


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium: install Debian's chromium and chromium-driver (apt install chromium chromium-driver) and pip install selenium to run the browser test")
def test_the_real_page_in_a_headless_browser(page, tmp_path):
    selenium = pytest.importorskip("selenium", reason="pip install selenium to drive the browser")
    from browser_driver import segment_in_browser

    src, answer = segment_in_browser(page, example_image(), EXAMPLE_QUERY, BROWSER, tmp_path)
    assert src and answer == "Sure, it appears on [LOC]. It is [SEG]."
    del selenium

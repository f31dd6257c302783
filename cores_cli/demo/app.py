"""The Gradio page around a :class:`~cores_cli.demo.session.DemoSession`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CoresError

if TYPE_CHECKING:
    from .session import DemoSession

INSTALL_HINT = 'the web demo needs Gradio: pip install "cores[demo]"'
MAX_UPLOAD = "50mb"
"""Gradio refuses larger uploads before they reach the model (the pixel limit comes after)."""


def require_gradio():
    """The gradio module, or a CoresError saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise CoresError(INSTALL_HINT) from None
    return gradio


def _image_input(gr):
    """An image upload (with the page's own preview) whose file goes to cores as it is: Gradio's
    own decoding would answer a bad file with its multi-line error and decode an image fully
    before cores' size check reads only its header. (The preprocessing is replaced on the
    instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` beside this file.)"""
    image = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="cores-image")
    image.preprocess = lambda payload: None if payload is None else payload.path
    return image


def build_app(session: DemoSession, examples: list[tuple[Path, str]]):
    """The page: image + question + mode in, the overlay with every chain level, the answer
    and the mask PNG / JSON record to download out. Bad input shows an error in the page and
    the server keeps serving; requests queue for the one model."""
    gr = require_gradio()

    def segment(image: str | None, question: str, mode: str):
        try:
            answer = session.ask(image, question, mode)
        except CoresError as exc:
            raise gr.Error(str(exc)) from None
        # the request's own files, not arrays: Gradio would cache equal arrays of two requests in
        # one file and rewrite it in place while the other is downloading it
        levels = [(str(path), caption) for path, (_, caption) in zip(answer.level_pngs, answer.levels)]
        return str(answer.overlay_png), answer.answer, levels, str(answer.mask_png), str(answer.record_json)

    model = session.segmenter
    with gr.Blocks(title="cores: reasoning segmentation", analytics_enabled=False) as app:
        gr.Markdown(
            f"## cores: ask about an image, get the mask of the answer\n"
            f"Model: `{model.source}` (chain {' → '.join(model.model.cfg.chain.tokens)})"
        )
        with gr.Row():
            with gr.Column():
                image = _image_input(gr)
                question = gr.Textbox(label="Question", placeholder="what gives dogs their sense of smell?", elem_id="cores-question")
                mode = gr.Radio(list(("teacher", "generate")), value="teacher", label="Mode", info="teacher: the fixed answer template; generate: the model writes its answer")
                submit = gr.Button("Segment", variant="primary", elem_id="cores-submit")
                if examples:
                    gr.Examples(examples=[[str(path), text] for path, text in examples], inputs=[image, question])
            with gr.Column():
                result = gr.Image(label="Result: final mask filled, earlier levels outlined", type="numpy", interactive=False, elem_id="cores-result")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="cores-answer")
                levels = gr.Gallery(label="Chain levels", columns=3, height="auto")
                mask_file = gr.File(label="Mask (PNG)", elem_id="cores-mask")
                record_file = gr.File(label="Record (JSON)", elem_id="cores-record")
        submit.click(segment, [image, question, mode], [result, answer, levels, mask_file, record_file], api_name="segment")
        question.submit(segment, [image, question, mode], [result, answer, levels, mask_file, record_file])
    app.queue(default_concurrency_limit=1)
    return app


def launch(app, session: DemoSession, host: str, port: int, *, block: bool = True):
    """Serve ``app`` on ``host:port`` (127.0.0.1 by default: nothing is exposed beyond this
    machine unless asked, and never through a public share link). Only the session's own files
    folder is served. ``block`` False returns once the server is up (tests)."""
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=MAX_UPLOAD,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=True,
        allowed_paths=[str(session.files)],
    )

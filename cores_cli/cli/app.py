"""The `cores` command: one Typer app, one module per subcommand."""

from __future__ import annotations

import atexit
import os
import sys
import threading

import typer

from .. import __version__
from .build_context import build_context
from .demo import demo
from .evaluate import evaluate
from .export import export
from .import_cmd import import_source
from .make_reasonpart import make_reasonpart
from .predict import predict
from .train import train

app = typer.Typer(
    name="cores",
    help="CoReS reasoning segmentation: ask a question about an image, get the mask of the answer.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("build-context", short_help="Ask a chat model for question/answer exemplars and append them to a library.")(build_context)
app.command("train", short_help="Train CoReS (LoRA, chain tokens, β, refiner, SAM mask decoder) on a dataset mixture.")(train)
app.command("eval", short_help="Evaluate a checkpoint on a dataset: gIoU, cIoU and the protocol behind them.")(evaluate)
app.command("predict", short_help="Segment what a question refers to in images: mask, overlay and JSON record.")(predict)
app.command("make-reasonpart", short_help="Write reasoning questions about object parts in ReasonSeg format (ReasonPart).")(make_reasonpart)
app.command("export", short_help="Merge LoRA into a standalone HF LLaVA directory beside cores' other weights.")(export)
app.command("import", short_help="Convert a LISA or original-LLaVA checkpoint into a cores checkpoint.")(import_source)
app.command("demo", short_help="Serve a local web page to try a model (Gradio).")(demo)


def _version(value: bool) -> None:
    if value:
        print(f"cores {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """CoReS reasoning segmentation: ask a question about an image, get the mask of the answer."""


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        if sys.argv[1:2] and sys.argv[1] in _NO_TEARDOWN and "torch" in sys.modules:
            exit_without_teardown(exc.code)
        raise


# Commands that load a model, write their files and end. Not train (its processes and DeepSpeed
# clean up at exit) nor demo (a server, ended by Ctrl-C).
_NO_TEARDOWN = ("predict", "eval", "export", "import")


def exit_without_teardown(code: int | str | None) -> None:
    """End a command that loaded torch (and transformers) without Python's teardown of every
    module and object they made: 1.0–2.2 s of a model command's wall time on this project's
    machine (`benchmarks/model_startup.py`), spent after the work is done and its files are
    closed. The exit handlers still run (multiprocessing's workers, temporary files) and the
    output streams are flushed. With other threads still running (the normal exit waits for
    them), or under a profiler or tracer (cProfile, coverage: they write their results at the
    normal exit), the normal exit is kept."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more can reach it
            pass
    os._exit(status)

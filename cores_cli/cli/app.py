"""The `cores` command: one Typer app, one module per subcommand."""

from __future__ import annotations

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
    app()

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

app.command("build-context")(build_context)
app.command("train")(train)
app.command("eval")(evaluate)
app.command("predict")(predict)
app.command("make-reasonpart")(make_reasonpart)
app.command("export")(export)
app.command("import")(import_source)
app.command("demo")(demo)


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

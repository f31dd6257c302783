"""The `cores` command: its subcommands, their help, and placeholders that say so."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cores_cli.cli.app import app

runner = CliRunner()
COMMANDS = ["build-context", "train", "eval", "predict", "make-reasonpart", "export"]


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_its_own_help_with_an_example(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"cores {name}" in result.stdout


def test_a_missing_input_file_is_one_error_line(tmp_path):
    args = ["make-reasonpart", "--source", "partimagenet", "--ann", str(tmp_path / "a.json"), "--images", "i", "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "--questions", "template"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: partimagenet annotations (--ann): file not found: {tmp_path / 'a.json'}"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("cores ")


def test_user_text_in_errors_and_tables_is_printed_as_written(capsys):
    """Rich would turn ':train:' into an emoji and '[bold]' into a style; user text must survive."""
    from rich.table import Table

    from cores_cli.cli.common import err_console, fail, warn

    text = "dataset reasonseg:train: missing; path runs/[bold]x[/bold]/a :smile:"
    fail(text)
    warn(text)
    table = Table()
    table.add_column("what")
    table.add_row(text)
    with err_console.capture() as captured:
        err_console.print(table)
    err = capsys.readouterr().err
    assert f"error: {text}" in err and f"warning: {text}" in err
    assert "runs/[bold]x[/bold]/a :smile:" in captured.get().replace("\n", "")


def test_the_train_and_eval_commands_import_no_torch_until_they_run():
    """`cores --help` imports every command's module: the heavy imports wait for the command."""
    import subprocess
    import sys

    code = "import sys, cores_cli.cli.train, cores_cli.cli.evaluate; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'deepspeed')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

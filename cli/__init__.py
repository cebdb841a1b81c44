"""The `fedrec` command line, the one package that may import every other. Each subcommand
lives in its own module and imports heavy libraries (torch, opacus, flwr) only when it runs,
so `fedrec --help` stays fast."""

from __future__ import annotations

import os
import signal
import sys
from enum import StrEnum
from typing import Annotated

import click
import typer

from fedrec.cli import (
    audit_cmd,
    certs_cmd,
    client_cmd,
    data_cmd,
    server_cmd,
    simulate_cmd,
    train_cmd,
)
from fedrec.common import console

app = typer.Typer(
    help=(
        "fedrec: a federated, lifelong-learning, differentially private recommender.\n\n"
        "Every command runs on the built-in MovieTweetings 40K data unless told otherwise."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# exit statuses of a command stopped by SIGINT or SIGTERM (fedrec.cli.run_folder)
INTERRUPTED = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM})


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fedrec {version('fedrec')}")
        raise typer.Exit()


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.callback()
def global_options(
    log_level: Annotated[
        LogLevel | None,
        typer.Option(
            "--log-level",
            help="messages of fedrec's loggers to show, in this command and in the processes "
            "of the run it starts (their log) [default: info]",
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="only warnings and errors, and no progress (no bar, no per-round lines); the "
            "command's results are still printed",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="print the installed fedrec version and exit",
            callback=show_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    level = log_level.value if log_level else ("warning" if quiet else console.DEFAULT_LEVEL)
    if quiet and console.LEVELS.index(level) < console.LEVELS.index("warning"):
        raise typer.BadParameter(
            f"--quiet shows only warnings and errors: it contradicts --log-level {level}"
        )
    console.configure(level, quiet=quiet)


app.command("data")(data_cmd.data)
app.command("train")(train_cmd.train)
app.command("simulate")(simulate_cmd.simulate)
app.add_typer(client_cmd.app, name="client")
app.add_typer(certs_cmd.app, name="certs")
app.add_typer(server_cmd.app, name="server")
app.command("audit")(audit_cmd.audit)


def command() -> click.Command:
    """The `fedrec` command, its help strings escaped for Rich: Typer renders help as Rich
    markup, which took bracketed words ("[device] store", "[policy]": the TOML tables of a
    file) for style tags and dropped them. (Typer's plain-text mode is no way out: with Rich
    installed it prints every "[default: ...]" and "[required]" as "\\[default: ...]".)"""
    from rich.markup import escape

    root = typer.main.get_command(app)
    pending = [root]
    while pending:
        cmd = pending.pop()
        for item in (cmd, *cmd.params):
            if getattr(item, "help", None):
                item.help = escape(item.help)
        if isinstance(cmd, click.Group):
            pending += cmd.commands.values()
    return root


def main() -> None:
    try:
        command()()
    except SystemExit as done:
        if done.code in INTERRUPTED:
            # The run is stopped and its state is on disk: skip the interpreter's teardown,
            # slow with torch imported (Ctrl-C should be quick).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code)
        raise

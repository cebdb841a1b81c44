"""The `fedrec` command line, the one package that may import every other. Each subcommand
lives in its own module and imports heavy libraries (torch, opacus, flwr) only when it runs,
so `fedrec --help` stays fast."""

from __future__ import annotations

import os
import signal
import sys

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

app.command("data")(data_cmd.data)
app.command("train")(train_cmd.train)
app.command("simulate")(simulate_cmd.simulate)
app.add_typer(client_cmd.app, name="client")
app.add_typer(certs_cmd.app, name="certs")
app.add_typer(server_cmd.app, name="server")
app.command("audit")(audit_cmd.audit)


def main() -> None:
    try:
        app()
    except SystemExit as done:
        if done.code in INTERRUPTED:
            # The run is stopped and its state is on disk: skip the interpreter's teardown,
            # which took 3 s with torch imported on a loaded machine (Ctrl-C should be quick).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code)
        raise

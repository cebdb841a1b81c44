"""`fedrec server ...`: the server side of a deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedrec.cli.options import fail
from fedrec.cli.run_folder import hold_run_folder
from fedrec.common import console

app = typer.Typer(
    help="The server side of a deployment (a Flower SuperLink).", no_args_is_help=True
)


@app.command("start")
def start(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="run TOML: [server] address, certificates, ...; [run] settings"
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="interface to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port devices connect to")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (checkpoints, metrics)")] = None,
    certificates: Annotated[
        Path | None, typer.Option(help="folder from `fedrec certs` (ca.pem, server.pem, ...)")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no device authentication (testing only)")
    ] = False,
) -> None:
    """Start a SuperLink (persistent --database, TLS, device authentication), register the
    devices' public keys, and run the fedrec federation on it to the end. Restarted over the
    same run folder, it resumes after the last checkpointed round."""
    from fedrec.server.superlink import ServerConfigError, load_server_config
    from fedrec.server.superlink import start as start_server

    try:
        server = load_server_config(
            config, host=host, port=port, out=out and out.resolve(),
            certificates=certificates and certificates.resolve(),
            insecure=True if insecure else None,
        )  # fmt: skip
    except ServerConfigError as err:
        raise fail(str(err)) from err
    with hold_run_folder(
        server.out.resolve(), command="fedrec server start", rounds=int(server.run["rounds"]),
        resume_hint="start the server again over the same folder to resume",
    ) as lock:  # fmt: skip
        quiet = console.progress() == "none"  # --quiet: no progress, results still shown
        status = start_server(server, echo=typer.echo, quiet=quiet, lock=lock)
    raise typer.Exit(status)


@app.command("catalogue")
def catalogue(
    config: Annotated[
        Path | None, typer.Option("--config", help="the run TOML `fedrec server start` reads")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="where to write it")] = Path(
        "public-catalogue.npz"
    ),
) -> None:
    """Write the public catalogue of the run (item ids, texts, years, text features, the
    timeline's span) for devices to copy; `fedrec server start` writes the same file into its
    run folder. A device that names it ([device] catalogue) never loads a dataset."""
    from fedrec.server.superlink import ServerConfigError, load_server_config, write_run_catalogue

    try:
        digest = write_run_catalogue(load_server_config(config), out)
    except (ServerConfigError, ValueError, OSError) as err:
        raise fail(str(err)) from err
    typer.echo(f"wrote {out} (digest {digest[:12]})")

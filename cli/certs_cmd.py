"""`fedrec certs ...`: the deployment's CA, the server's TLS certificate, device key pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Certificates (TLS) and device keys (SuperNode authentication) for a deployment.",
    no_args_is_help=True,
)

OutOpt = Annotated[Path, typer.Option("--out", help="certificates folder")]


@app.command("server")
def server(
    host: Annotated[
        list[str],
        typer.Option("--host", help="DNS name or IP devices use to reach the server (repeatable)"),
    ],
    out: OutOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
) -> None:
    """Create the CA (if OUT has none) and a server certificate for HOST (localhost and
    127.0.0.1 are always included)."""
    from fedrec.common.certs import CA_CERT, create_server_cert

    new_ca = not (out / CA_CERT).exists()
    cert, key = create_server_cert(out, host, days=days)
    if new_ca:
        typer.echo(f"CA: {out / CA_CERT} (give it to every device), {out / 'ca.key'} (keep secret)")
    typer.echo(f"server certificate: {cert}, key: {key}")


@app.command("device")
def device(
    names: Annotated[list[str], typer.Argument(help="device names, e.g. phone-1 phone-2")],
    out: OutOpt = Path("certs"),
) -> None:
    """Create an EC key pair per device: <out>/devices/NAME.key goes to the device,
    NAME.pub is registered by the server (`fedrec server start` registers every .pub)."""
    from fedrec.common.certs import create_device_key

    for name in names:
        try:
            private, public = create_device_key(out, name)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        typer.echo(f"{name}: private {private}, public {public}")

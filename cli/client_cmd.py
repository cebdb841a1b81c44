"""`fedrec client ...`: what runs on a device (ingest, status, recommend, start)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedrec.cli.options import fail

app = typer.Typer(
    help="The device side: its interaction store, privacy spend, recommendations and SuperNode.",
    no_args_is_help=True,
)

StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="the device folder (store, ledger, state)")
]
DeviceConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="device TOML: [device] store, dataset; [policy] privacy policy"),
]


def _device(store: Path | None, config: Path | None):
    from fedrec.client.device import DeviceConfigError, load_device_config

    try:
        return load_device_config(config, store)
    except DeviceConfigError as err:
        raise fail(str(err)) from err


@app.command("ingest")
def ingest(
    source: Annotated[
        str, typer.Argument(help="CSV (item,timestamp) or JSON lines file; - for stdin")
    ],
    store: StoreOpt = None,
    config: DeviceConfigOpt = None,
) -> None:
    """Append interactions to the device's store. Each invalid line (unknown item, bad
    timestamp, duplicate) is reported and skipped; the valid ones are added in one transaction
    (the store is never left half-written). Exit status 1 if any line was rejected."""
    from fedrec.client.device import catalogue_items
    from fedrec.client.device import ingest as ingest_lines
    from fedrec.client.store import StoreError

    device = _device(store, config)
    try:
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise fail(f"{source}: {err}") from err
    from fedrec.common.data.public_catalogue import PublicCatalogueError

    try:
        known = set(catalogue_items(device.data, device.catalogue))
        report = ingest_lines(device.store, lines, known)
    except (StoreError, PublicCatalogueError) as err:
        raise fail(str(err)) from err
    for message in report.rejected:
        typer.secho(f"rejected {message}", err=True, fg=typer.colors.YELLOW)
    typer.echo(
        f"added {report.added} interaction(s), rejected {len(report.rejected)}"
        + (f" (cohort {report.cohort})" if report.cohort else "")
    )
    if report.rejected:
        raise typer.Exit(1)


@app.command("status")
def status(
    store: StoreOpt = None,
    config: DeviceConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The device's privacy spend from its ledger: per-interaction ε distribution, retired
    interactions, remaining budget."""
    from fedrec.client.device import status as device_status
    from fedrec.client.ledger import LedgerCorruptError
    from fedrec.client.store import StoreError

    device = _device(store, config)
    try:
        info = device_status(device.store, device.policy)
    except (StoreError, LedgerCorruptError) as err:
        raise fail(str(err)) from err
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    eps = info["epsilon"]
    typer.echo(f"store            {info['store']}  ({info['interactions']} interactions)")
    typer.echo(f"guarantee        {info['guarantee']}, δ = {info['delta']:g}")
    if eps:
        typer.echo(
            "ε / interaction  "
            + "  ".join(f"{k} {v:.3f}" for k, v in eps.items())
            + f"  (never trained on: {info['never_trained']})"
        )
    typer.echo(
        f"budget           ε = {info['budget_epsilon']:g}, spent (max) {info['max_epsilon']:.3f}, "
        f"remaining {info['remaining_epsilon']:.3f}"
    )
    typer.echo(
        f"retired          {info['retired_interactions']} interaction(s) "
        f"in {info['retired_cohorts']} cohort(s)"
    )
    typer.echo(
        f"ledger           {info['ledger_entries']} entries, rounds trained "
        f"{info['rounds_trained']}, head {info['ledger_head'][:16]}"
    )


@app.command("recommend")
def recommend(
    store: StoreOpt = None,
    config: DeviceConfigOpt = None,
    k: Annotated[int, typer.Option("-k", "--top", help="how many items")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Top-k items from the latest global model this device received plus its local state,
    excluding what the user already has."""
    from fedrec.client.device import recommend as device_recommend
    from fedrec.client.store import StoreError
    from fedrec.common.data.public_catalogue import PublicCatalogueError

    device = _device(store, config)
    try:
        top = device_recommend(device.store, k, catalogue=device.catalogue)
    except (StoreError, PublicCatalogueError) as err:
        raise fail(str(err)) from err
    if as_json:
        typer.echo(json.dumps([{"item": i, "score": s} for i, s in top]))
        return
    for rank, (item, score) in enumerate(top, start=1):
        typer.echo(f"{rank:3d}  {item}  {score:.4f}")


@app.command("start")
def start(
    store: StoreOpt = None,
    config: DeviceConfigOpt = None,
    superlink: Annotated[
        str | None, typer.Option(help="server address HOST:PORT ([connection] superlink)")
    ] = None,
    root_certificates: Annotated[
        Path | None,
        typer.Option("--root-certificates", help="the deployment's CA (ca.pem from fedrec certs)"),
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="this device's private key (devices/NAME.key)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="local port of the SuperNode's own API (default 9094)")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no authentication (testing only)")
    ] = False,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm/--cold",
            help="warm: a long-lived executor forks each message with torch and the catalogue "
            "already loaded, and the SuperNode polls every --poll-s; cold: stock Flower (a new "
            "process per message, 3 s polls)",
        ),
    ] = True,
    poll_s: Annotated[
        float | None,
        typer.Option(
            "--poll-s",
            help="warm: how often the SuperNode asks the server for work (default 0.25 s; 0.1 s "
            "cuts a message's latency at 2.5x the requests to the server: README, Deployment)",
        ),
    ] = None,
) -> None:
    """Start this device's Flower SuperNode. Its ClientApp reads the store at --store and
    enforces the privacy policy of --config, whatever the server asks. Runs until stopped."""
    import os
    import shutil

    from fedrec.client.device import connection_settings
    from fedrec.client.store import ClientStore, StoreError

    device = _device(store, config)
    conn = connection_settings(config)
    superlink = superlink or conn.get("superlink")
    root_certificates = root_certificates or conn.get("root-certificates")
    key = key or conn.get("key")
    if not superlink:
        raise fail("no server address: pass --superlink HOST:PORT or set [connection] superlink")
    if insecure:
        from fedrec.client.supernode import insecure_against_tls_message, speaks_tls

        if speaks_tls(superlink, timeout=2.0):  # a server not up yet: the SuperNode checks later
            raise fail(insecure_against_tls_message(superlink))
    try:
        with ClientStore(device.store, verify=True):
            pass
    except StoreError as err:  # start anyway: each round replies with this error
        typer.secho(f"warning: {err}", err=True, fg=typer.colors.YELLOW)
    store_path = device.store.resolve()
    node_config = f'store="{store_path}"'
    if config is not None:
        node_config += f' device-config="{config.resolve()}"'
    cmd = ["flower-supernode", "--superlink", superlink, "--node-config", node_config]
    port = port or 9094
    cmd += ["--port", str(port)]
    if warm:
        cmd += ["--isolation", "process"]
    if insecure:
        from fedrec.server.superlink import INSECURE_WARNING

        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.YELLOW)
        cmd.append("--insecure")
    else:
        if not root_certificates or not key:
            raise fail("TLS needs --root-certificates (ca.pem) and --key (this device's key)")
        cmd += ["--root-certificates", str(root_certificates), "--auth-supernode-private-key",
                str(key)]  # fmt: skip
    exe = shutil.which("flower-supernode", path=str(Path(sys.executable).parent))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    sys.stdout.flush()
    if not warm:
        os.execv(exe or "flower-supernode", cmd)  # this process becomes the SuperNode (same PID)
    from fedrec.client.supernode import supernode_settings

    if poll_s is not None:  # the SuperNode inherits it
        os.environ["FEDREC_SUPERNODE_POLL_S"] = repr(poll_s)
    try:
        supernode_settings()  # checked here, before anything starts
    except ValueError as err:
        raise fail(str(err)) from err
    supernode_cmd = [sys.executable, "-m", "fedrec.client.supernode", *cmd[1:]]
    raise typer.Exit(_supervise(supernode_cmd, port, device.catalogue))


def _supervise(supernode_cmd: list[str], port: int, catalogue: Path | None = None) -> int:
    """Run the SuperNode and the warm executor beside it; stop both when either ends or
    when this process is asked to stop. Returns the SuperNode's exit status."""
    import os
    import shutil
    import signal
    import subprocess
    import tempfile

    from fedrec.client.supernode import EXECUTOR_PIDFILE_ENV, SUPERVISOR_PID_ENV

    # the SuperNode wakes the executor when a message arrives: it needs the executor's PID;
    # it stops when this process dies, even by SIGKILL (and the executor follows it)
    folder = Path(tempfile.mkdtemp(prefix="fedrec-node-"))
    pidfile = folder / "executor.pid"
    env = os.environ | {EXECUTOR_PIDFILE_ENV: str(pidfile), SUPERVISOR_PID_ENV: str(os.getpid())}
    node = subprocess.Popen(supernode_cmd, env=env, preexec_fn=_die_with_parent())
    executor = subprocess.Popen(
        [sys.executable, "-m", "fedrec.client.warm_exec", "--runtime-api-address",
         f"127.0.0.1:{port}", "--parent-pid", str(node.pid), "--pidfile", str(pidfile),
         *(["--catalogue", str(catalogue.resolve())] if catalogue else [])],
        preexec_fn=_die_with_parent(),
    )  # fmt: skip

    def stop(signum, _frame):
        for proc in (node, executor):
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = node.wait()
    if executor.poll() is None:
        executor.terminate()
        try:
            executor.wait(10)
        except subprocess.TimeoutExpired:
            executor.kill()
    shutil.rmtree(folder, ignore_errors=True)
    return code


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """A `preexec_fn` that has the kernel send the child SIGTERM when this process dies, by
    SIGKILL too (Linux; None elsewhere). The children also watch for it themselves
    (`stop_with_supervisor`, the executor's --parent-pid), but only once their imports are
    done, which takes seconds: a device killed before then must not leave them running."""
    import ctypes
    import os
    import signal

    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the line above: nobody will signal
            os._exit(1)

    return set_death_signal

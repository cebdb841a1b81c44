"""`fedrec server start`: a Flower SuperLink with persistent state and TLS, the devices' keys
registered, and the fedrec app submitted to it with `flwr run`.

Processes are started in their own sessions and carry the launch's token, by which they are
stopped, by us or, if we are killed, by our watchdog (`fedrec.common.processes`); the run
folder is locked meanwhile (`fedrec.common.run_lock`). The SuperLink's PID is written to
<out>/flower/superlink.pid.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common.certs import CA_CERT, SERVER_CERT, SERVER_KEY, device_public_keys
from fedrec.common.deployment import DeploymentSettings, split_run_config
from fedrec.common.flower_launch import (
    final_status,
    flower_env,
    flwr_json,
    run_config_arg,
    wait_healthy,
    write_app,
)
from fedrec.common.plain_log import PlainLog
from fedrec.common.processes import run_env, stop_run_processes, watched_run
from fedrec.common.run_config import TRANSPORT_DEFAULTS, SimulationConfig
from fedrec.common.run_lock import RunLock

CONNECTION = "fedrec"
INSECURE_WARNING = (
    "WARNING: --insecure: traffic between devices and server is NOT encrypted and devices are "
    "NOT authenticated. Use it only on a trusted network for testing."
)
# Deployment defaults that differ from the simulation's: a handful of real devices, and no
# secure aggregation by default (it needs K_min devices per round: `secure-aggregation-
# protocol = "secagg"` with dp 'distributed'), so the per-interaction guarantee is the LOCAL one. Its settings come
# with it (simulations/local_dp.toml: a device's own noise drowns every per-item parameter,
# so only the content popularity and the year table train, at server lr 0.3). The
# simulation's defaults (every parameter, server lr 15) are tuned for 2,700 devices per round
# under distributed noise: one device's noisy update, stepped up 15x, diverges
# (docs/deployment.md).
RUN_DEFAULTS = {
    "dp": "user+local",
    "clients-per-round": 10,
    "rounds": 10,
    "model-text-bias": True,
    "model-train-only": "text_bias.weight,year_table.weight",
    "server-lr": 0.3,
}

FLWR_TIMEOUT_S = 120  # a `flwr` CLI call against our own SuperLink
# SIGTERM first: the SuperLink closes its database; Ray is not involved here.
STOP_GRACE_S = 10.0


class ServerConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"  # interface the SuperLink listens on
    port: int = 9092
    address: str = ""  # how `flwr` on this machine reaches it; default 127.0.0.1:port
    certificates: Path = Path("certs")  # ca.pem, server.pem, server.key, devices/*.pub
    devices: Path | None = None  # device public keys to register; default certificates/devices
    insecure: bool = False
    database: Path = Path("server/state.db")
    out: Path = Path("runs/deploy")
    run: dict[str, Any] = field(default_factory=dict)  # the run's settings (flat, kebab-case)

    @property
    def connect(self) -> str:
        return self.address or f"127.0.0.1:{self.port}"


def load_server_config(path: Path | None, **overrides: Any) -> ServerConfig:
    """[server] and [run] tables of a TOML file; relative paths are relative to the file."""
    table: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ServerConfigError(f"{path}: {err}") from err
        base = Path(path).resolve().parent
    server = {str(k).replace("-", "_"): v for k, v in table.get("server", {}).items()}
    server |= {k: v for k, v in overrides.items() if v is not None}
    known = set(ServerConfig.__dataclass_fields__) - {"run"}
    if unknown := set(server) - known:
        raise ServerConfigError(f"{path}: unknown [server] keys {sorted(unknown)}")
    for key in ("certificates", "devices", "database", "out"):
        if server.get(key) is not None:
            p = Path(server[key])
            server[key] = p if p.is_absolute() else base / p
    for key, default in (("certificates", "certs"), ("database", "server/state.db")):
        server.setdefault(key, base / default)
    server.setdefault("out", base / "runs/deploy")
    run = RUN_DEFAULTS | dict(table.get("run", {}))
    try:
        settings, flat = split_run_config(run)
        parsed = SimulationConfig.from_flat(flat)  # fail here, not in the ServerApp
    except ValueError as err:
        raise ServerConfigError(f"{path}: [run]: {err}") from err
    if parsed.secure_aggregation and not parsed.secagg:
        raise ServerConfigError(
            f"{path}: [run] dp: 'distributed' needs secure aggregation: set "
            'secure-aggregation-protocol = "secagg" (SecAgg+ with the distributed discrete '
            "Gaussian, see README, Deployment), or use 'local' or 'user+local'"
        )
    del settings
    return ServerConfig(**server, run=run)


def superlink_command(config: ServerConfig) -> list[str]:
    cmd = ["flower-superlink", "--host", config.host, "--port", str(config.port),
           "--database", str(config.database), "--disable-runtime-dependency-installation"]  # fmt: skip
    if config.insecure:
        return [*cmd, "--insecure"]
    certs = config.certificates
    return [*cmd, "--ssl-certfile", str(certs / SERVER_CERT), "--ssl-keyfile",
            str(certs / SERVER_KEY), "--ssl-ca-certfile", str(certs / CA_CERT),
            "--enable-supernode-auth"]  # fmt: skip


def write_deployment_app(folder: Path) -> Path:
    """A Flower app folder pointing at the installed deployment apps, with every run key."""
    return write_app(
        folder,
        name="fedrec-deployment",
        generator="fedrec server start",
        serverapp="fedrec.server.app:app",
        clientapp="fedrec.client.app:app",
        config=SimulationConfig().to_flat()
        | {k.replace("_", "-"): v for k, v in DeploymentSettings().__dict__.items()}
        | TRANSPORT_DEFAULTS,
    )


def write_connection(home: Path, config: ServerConfig) -> None:
    lines = [f'[superlink]\ndefault = "{CONNECTION}"\n', f"[superlink.{CONNECTION}]"]
    lines.append(f'address = "{config.connect}"')
    if config.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{config.certificates / CA_CERT}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def health_check(config: ServerConfig) -> tuple[str, ssl.SSLContext | None]:
    """The SuperLink's health URL, and the TLS context that trusts its certificate."""
    if config.insecure:
        return f"http://{config.connect}/health", None
    context = ssl.create_default_context(cafile=str(config.certificates / CA_CERT))
    return f"https://{config.connect}/health", context


def register_devices(env: dict, config: ServerConfig) -> list[str]:
    """Register every device public key; one already registered (a restart) is fine."""
    folder = config.devices or config.certificates
    messages = []
    for key in device_public_keys(folder):
        answer = flwr_json(
            env, "supernode", "register", str(key), CONNECTION, timeout=FLWR_TIMEOUT_S
        )
        if answer.get("success"):
            messages.append(f"registered {key.stem}: node {answer['node-id']}")
        elif "already in use" in json.dumps(answer).lower():
            messages.append(f"{key.stem}: already registered")
        else:
            raise RuntimeError(f"could not register {key}: {answer}")
    return messages


def stop_stale_runs(env: dict) -> list[str]:
    """Stop every run the SuperLink still lists as unfinished: after a server was killed, its
    run stays "running" in the SuperLink's persisted state, but the message objects it had
    sent lived in the killed SuperLink's memory. A device that was fetching one when the
    server died keeps asking for it (Flower retries object pulls for up to 2 h), and its
    SuperNode takes no new message meanwhile, so the resumed round would get no reply from
    it. Stopped, the old run answers "Run is finished" and the device drops the message at
    its next try.

    A run may finish between the listing and its stop (the SuperLink ends a run whose
    ServerApp stopped reporting): Flower then refuses the stop ("Run is already finished"),
    and that is the state wanted, not an error to stop the restart on."""
    listing = flwr_json(env, "ls", CONNECTION, timeout=FLWR_TIMEOUT_S)
    if not listing.get("success"):
        raise RuntimeError(f"could not list the SuperLink's runs: {json.dumps(listing)[:500]}")
    stopped = []
    for run in listing.get("runs", []):
        if not str(run.get("status", "")).startswith("finished"):
            run_id = str(run["run-id"])
            answer = flwr_json(env, "stop", run_id, CONNECTION, timeout=FLWR_TIMEOUT_S)
            if answer.get("success"):
                stopped.append(
                    f"stopped run {run_id}, left {run.get('status')} by a previous server"
                )
                continue
            now = final_status(env, CONNECTION, run_id, timeout=FLWR_TIMEOUT_S)[0]
            if not now.startswith("finished"):
                raise RuntimeError(f"could not stop the stale run {run_id} ({now}): {answer}")
            stopped.append(f"run {run_id}, left {run.get('status')} by a previous server: {now}")
    return stopped


PUBLIC_CATALOGUE_FILE = "public-catalogue.npz"


def write_run_catalogue(config: ServerConfig, path: Path) -> str:
    """Write the public catalogue the run's model is built from (fedrec.common.data.
    public_catalogue) for devices to copy; returns its digest, which the run names."""
    from fedrec.common.data.public_catalogue import write_public_catalogue
    from fedrec.common.data.stream import load_stream
    from fedrec.common.run_model import public_catalogue

    _, flat = split_run_config(dict(config.run))
    run = SimulationConfig.from_flat(flat)
    public = public_catalogue(run.data, load_stream(run.data, run.rounds, run.stream_protocol))
    write_public_catalogue(path, public)
    return public.digest


def start(
    config: ServerConfig,
    *,
    timeout: float = 24 * 3600,
    echo=print,
    quiet: bool = False,
    lock: RunLock | None = None,
) -> int:
    """Start the SuperLink, register devices, run the federation to its end; 0 completed,
    2 failed, 124 timed out. Everything started here is stopped on the way out. `lock` is the
    run folder's, when the caller holds it (else taken here; RunLocked if held).

    `echo` shows the progress (the SuperLink, the devices registered, the run submitted, one
    line per round; none when `quiet`), warnings, errors and the result. Flower's processes
    log into OUT/flower/superlink.log and run.log, without terminal colour codes, at the
    fedrec loggers' level of this process (FEDREC_LOG_LEVEL, `fedrec.common.console`)."""
    with watched_run(config.out.resolve(), "fedrec server start", lock) as held:
        return _serve(config, held.token, timeout, echo, echo if not quiet else _silent)


def _silent(message: str) -> None:
    pass


def _serve(config: ServerConfig, token: str, timeout: float, echo, say) -> int:
    out = config.out.resolve()
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    digest = write_run_catalogue(config, out / PUBLIC_CATALOGUE_FILE)
    say(f"public catalogue for devices: {out / PUBLIC_CATALOGUE_FILE} (digest {digest[:12]})")
    config.database.parent.mkdir(parents=True, exist_ok=True)
    env = run_env(flower_env(work / "flwr-home", OMP_NUM_THREADS="1"), out, token)
    write_connection(Path(env["FLWR_HOME"]), config)
    app_dir = write_deployment_app(work / "app")
    if config.insecure:
        echo(INSECURE_WARNING)
    link_log = PlainLog(work / "superlink.log")
    link = link_log.popen(superlink_command(config), env=env, start_new_session=True)
    (work / "superlink.pid").write_text(f"{link.pid}\n")
    try:
        url, context = health_check(config)
        wait_healthy(url, link, context=context)
        say(f"SuperLink listening on {config.host}:{config.port} (pid {link.pid})")
        if not config.insecure:
            for message in register_devices(env, config):
                say(message)
        for message in stop_stale_runs(env):
            say(message)
        flat = dict(config.run) | {
            "deployment": True,
            "out": str(out),
            "resume": True,
            "catalogue-digest": digest,
            "run-token": token,
        }
        submitted = flwr_json(
            env,
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            run_config_arg(flat),
            timeout=FLWR_TIMEOUT_S,
        )
        if not submitted.get("success"):
            echo(f"error: flwr run failed: {submitted}")
            return 2
        run_id = str(submitted["run-id"])
        (work / "run-id").write_text(run_id + "\n")
        say(f"run {run_id} submitted; log: {work / 'run.log'}")
        run_log = PlainLog(work / "run.log")
        logs = run_log.popen(
            ["flwr", "log", run_id, CONNECTION, "--stream"], env=env, start_new_session=True
        )
        try:
            status = follow(out, env, run_id, timeout, say)
        finally:
            if logs.poll() is None:
                os.killpg(logs.pid, signal.SIGTERM)
                logs.wait(10)
            run_log.close()
        if status[0] == "timeout":
            flwr_json(env, "stop", run_id, CONNECTION, timeout=FLWR_TIMEOUT_S)
            return 124
        if not status[0].endswith("completed"):
            echo(f"error: run {run_id} ended {status[0]}: {status[1]}")
            return 2
        echo(f"run {run_id} completed: {out / 'summary.json'}")
        return 0
    finally:
        stop_run_processes(token, STOP_GRACE_S)
        link.wait()
        link_log.close()


def follow(out: Path, env: dict, run_id: str, timeout: float, echo) -> tuple[str, str]:
    metrics = out / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                row = json.loads(line)
                if row.get("discarded"):  # below K_min: its counters were never revealed
                    echo(
                        f"round {row['round']}: discarded (fewer than K_min survived secure "
                        f"aggregation), failed {row['failed']}"
                    )
                    continue
                echo(
                    f"round {row['round']}: summed {row['aggregated']}, declined "
                    f"{row['declined']}, failed {row['failed']}"
                )
            seen = len(lines)
        status = final_status(env, CONNECTION, run_id, timeout=FLWR_TIMEOUT_S)
        if status[0].startswith("finished"):
            return status
        time.sleep(2)
    return "timeout", ""

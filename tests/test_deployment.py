"""The deployed run as plain code: the server loop over a transport that calls real device
rounds in this process (no Flower), with failures, declines and a restart."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedrec.client.device import DeviceConfig, PrivacyPolicy, ingest, status
from fedrec.client.device_round import device_round, reply_metrics
from fedrec.client.store import StoreError
from fedrec.common.config import DataConfig
from fedrec.common.deployment import DeploymentSettings, split_run_config
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.server.deployment import UnsupportedDeployment, run_deployment
from fedrec.server.superlink import ServerConfigError, load_server_config

RUN = {
    "dataset": "synthetic",
    "synthetic": "num_users=30,num_items=60",
    "dp": "local",
    "local-noise-multiplier": 1.0,
    "model-dim": 8,
    "model-text-dim": 8,
    "num-negatives": 5,
    "clients-per-round": 10,
    "local-steps": 2,
}


@pytest.fixture(scope="module")
def items() -> list[str]:
    data = DataConfig(dataset="synthetic", synthetic={"num_users": "30", "num_items": "60"})
    return [str(i) for i in data.load().catalogue.item_ids]


def make_devices(tmp_path, items, n=3):
    devices = {}
    for node in range(1, n + 1):
        folder = tmp_path / f"device{node}"
        ingest(folder, [f"{items[node * 5 + k]},{1000 + k}" for k in range(6)], set(items))
        devices[node] = DeviceConfig(store=folder, policy=PrivacyPolicy(epsilon=100.0))
    return devices


def transport(devices, run_flat, down=()):
    """Calls each sampled device's round as its ClientApp would (errors become replies)."""

    def send(nodes, params, round_):
        out = []
        for node in nodes:
            if node in down:
                out.append((DeviceReply(node, None, 0, error="no reply in 1s"), None))
                continue
            try:
                result = device_round(devices[node], run_flat, round_, params)
            except StoreError as err:
                out.append((DeviceReply(node, None, 0, error=f"StoreError: {err}"), None))
                continue
            metrics = reply_metrics(result, devices[node].policy)
            out.append((DeviceReply(node, result.params, 1, metrics), result.declined))
        return out

    return send


def test_rounds_failures_declines_and_a_restart(tmp_path, items):
    devices = make_devices(tmp_path, items, 4)
    devices[3] = DeviceConfig(devices[3].store, policy=PrivacyPolicy(min_noise_multiplier=2.0))
    (devices[4].store / "store.sqlite").write_bytes(b"not a database" * 200)
    settings = DeploymentSettings(deployment=True, min_nodes=2)
    run_flat = RUN | {"rounds": 2, "out": str(tmp_path / "run"), "resume": True}
    config = SimulationConfig.from_flat(run_flat)
    run_deployment(config, settings, lambda: [1, 2, 3, 4], transport(devices, run_flat))
    log = [json.loads(x) for x in (tmp_path / "run" / "devices.jsonl").read_text().splitlines()]
    assert [e["round"] for e in log] == [1, 2] and all(e["summed"] == 2 for e in log)
    outcome = {d["node"]: d for d in log[0]["devices"]}
    assert outcome["3"]["outcome"] == "declined" and "below" in outcome["3"]["reason"]
    assert outcome["4"]["outcome"] == "failed" and "store.sqlite" in outcome["4"]["reason"]
    assert status(devices[1].store, devices[1].policy)["rounds_trained"] == [1, 2]
    assert status(devices[3].store, devices[3].policy)["ledger_entries"] == 0  # declined: untouched
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["summed_per_round"] == {"1": 2, "2": 2} and not summary["secure_aggregation"]

    # restart with more rounds, device 2 down: resumes at round 3, completes without it
    run_flat = run_flat | {"rounds": 3}
    config = SimulationConfig.from_flat(run_flat)
    run_deployment(config, settings, lambda: [1, 2, 3, 4], transport(devices, run_flat, down={2}))
    rounds = [
        json.loads(x)["round"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rounds == [1, 2, 3]
    assert status(devices[1].store, devices[1].policy)["rounds_trained"] == [1, 2, 3]
    assert status(devices[2].store, devices[2].policy)["rounds_trained"] == [1, 2]


def test_devices_jsonl_records_the_servers_verdict_on_a_dropped_update(tmp_path, items):
    # devices.jsonl said "sent" and counted the update in "summed" though the server dropped it
    devices = make_devices(tmp_path, items, 3)
    run_flat = RUN | {"rounds": 1, "out": str(tmp_path / "run"), "resume": True}
    honest = transport(devices, run_flat)

    def send(nodes, params, round_):
        out = []
        for reply, declined in honest(nodes, params, round_):
            if reply.user == 2 and reply.params is not None:
                boosted = {k: v + np.float32(1e30) for k, v in reply.params.items()}
                reply = dataclasses.replace(reply, params=boosted)
            out.append((reply, declined))
        return out

    settings = DeploymentSettings(deployment=True, min_nodes=3)
    config = SimulationConfig.from_flat(run_flat | {"clients-per-round": 3})
    run_deployment(config, settings, lambda: [1, 2, 3], send)
    (entry,) = [
        json.loads(x) for x in (tmp_path / "run" / "devices.jsonl").read_text().splitlines()
    ]
    outcome = {d["node"]: d for d in entry["devices"]}
    assert outcome["2"]["outcome"] == "dropped" and "norm" in outcome["2"]["reason"]
    assert outcome["1"]["outcome"] == outcome["3"]["outcome"] == "sent"
    assert "reason" not in outcome["1"]
    assert entry["summed"] == 2
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["aggregated"] == 2 and row["dropped"] == 1


def test_the_deployment_refuses_distributed_without_secure_aggregation(tmp_path):
    config = SimulationConfig.from_flat(RUN | {"dp": "distributed", "out": str(tmp_path)})
    with pytest.raises(UnsupportedDeployment, match="secure aggregation"):
        run_deployment(config, DeploymentSettings(), lambda: [1], lambda *a: [])
    path = tmp_path / "run.toml"
    path.write_text('[run]\ndp = "user+distributed"\n')
    with pytest.raises(ServerConfigError, match="secure aggregation"):
        load_server_config(path)


def test_the_deployment_refuses_reproducible_noise(tmp_path):
    """Noise derived from the recorded seed is for simulations and tests: a deployment with
    it would publish models whose noise anyone with the run config can remove."""
    config = SimulationConfig.from_flat(RUN | {"reproducible-noise": True, "out": str(tmp_path)})
    with pytest.raises(UnsupportedDeployment, match="reproducible-noise"):
        run_deployment(config, DeploymentSettings(), lambda: [1], lambda *a: [])


def test_server_config_and_run_config_split(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[server]\nport = 9999\ncertificates = "c"\n[run]\nrounds = 3\nmin-nodes = 5\n')
    server = load_server_config(path)
    assert server.port == 9999 and server.certificates == tmp_path / "c"
    assert server.connect == "127.0.0.1:9999" and not server.insecure
    settings, flat = split_run_config(server.run | {"deployment": True})
    assert settings == DeploymentSettings(deployment=True, min_nodes=5)
    assert flat["rounds"] == 3 and "min-nodes" not in flat
    path.write_text("[server]\nportt = 1\n")
    with pytest.raises(ServerConfigError, match="unknown"):
        load_server_config(path)


def test_tls_and_device_authentication_are_the_default(tmp_path):
    from fedrec.server.superlink import ServerConfig, superlink_command

    secure = superlink_command(ServerConfig(certificates=tmp_path, database=tmp_path / "s.db"))
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert secure[secure.index("--database") + 1] == str(tmp_path / "s.db")
    insecure = superlink_command(ServerConfig(insecure=True))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_a_transient_superlink_error_while_pulling_replies_is_retried(monkeypatch):
    """A SuperLink under load answered a reply pull with HTTP 500 (`database is locked`),
    which ended the whole run: the ServerApp now polls again; a 4xx still raises."""
    from types import SimpleNamespace

    import httpx

    from fedrec.server import app

    monkeypatch.setattr(app, "REPLY_POLL_S", 0.0)
    request = httpx.Request("POST", "https://127.0.0.1:1/v1/runtime/pull-messages")

    def http_error(status: int) -> httpx.HTTPStatusError:
        response = httpx.Response(status, request=request)
        return httpx.HTTPStatusError(f"{status}", request=request, response=response)

    class Grid:
        def __init__(self, failures):
            self.failures, self.pulls = list(failures), 0

        def push_messages(self, messages):
            return [f"m{i}" for i in range(len(messages))]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.failures:
                raise self.failures.pop(0)
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]

    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 12)]
    grid = Grid([http_error(500), http_error(503)])
    replies = app.send_and_receive(grid, messages, timeout=5)
    assert sorted(node for node, _ in replies) == [11, 12]
    assert grid.pulls == 3
    with pytest.raises(httpx.HTTPStatusError):
        app.send_and_receive(Grid([http_error(404)]), messages, timeout=5)


def test_parameters_travel_as_one_bundle_and_a_malformed_one_is_a_clear_error():
    """A deployed message carries all tensors as one array (each Flower Array is several
    objects, each one request per hop); names, dtypes and shapes survive exactly."""
    import numpy as np

    from fedrec.common.deployment import MalformedParameters, pack_parameters, unpack_parameters

    params = {
        "item_table.weight": np.arange(12, dtype=np.float32).reshape(6, 2),
        "ctx/text.weight": np.full((2, 3), np.nan, dtype=np.float64),  # NaN kept: the server judges
    }
    packed = pack_parameters(params)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    back = unpack_parameters(packed)
    assert sorted(back) == sorted(params)
    for name, value in params.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
    with pytest.raises(MalformedParameters, match=r"not a readable \.npz"):
        unpack_parameters(packed[: len(packed) // 2])
    with pytest.raises(MalformedParameters, match="one uint8 byte array"):
        unpack_parameters(np.zeros(4, np.float32))
    # a malicious device's "zip bomb": 64 MB of zeros in a few kB, refused undecompressed
    import io

    bomb = io.BytesIO()
    np.savez_compressed(bomb, item_table=np.zeros((4096, 4096), np.float32))
    assert len(bomb.getvalue()) < 1_000_000
    with pytest.raises(MalformedParameters, match="compressed entries"):
        unpack_parameters(np.frombuffer(bomb.getvalue(), np.uint8))


def test_a_reply_with_malformed_parameters_is_dropped_with_its_reason(flower_task):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from fedrec.common.deployment import PARAMETERS_KEY, REPLY_KEY, reply_record, split_reply
    from fedrec.server.app import unpack

    record = reply_record({"num-examples": 1, "loss": 0.5}, {"error": "", "ledger_head": "ab"})
    assert split_reply(record) == (
        {"num-examples": 1.0, "loss": 0.5},
        {"error": "", "ledger_head": "ab"},
    )
    garbage = ArrayRecord({PARAMETERS_KEY: Array(np.frombuffer(b"not a zip", np.uint8))})
    reply = Message(
        RecordDict({REPLY_KEY: ConfigRecord(record), "arrays": garbage}),
        dst_node_id=7,
        message_type="train",
    )
    unpacked = unpack(7, reply)
    assert unpacked.params is None and "malformed parameters in the reply" in unpacked.error
    assert unpacked.num_examples == 1 and unpacked.metrics == {"loss": 0.5}
    no_record = Message(RecordDict({"arrays": garbage}), dst_node_id=7, message_type="train")
    assert "reply without" in unpack(7, no_record).error


def test_a_device_answers_malformed_global_parameters_with_an_error_reply(
    tmp_path, items, flower_task
):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedrec.client.device_app import train_on_device
    from fedrec.common.deployment import PARAMETERS_KEY, REPLY_KEY, split_reply

    ingest(tmp_path / "dev", ["1,1400000000"], set(items))
    before = sorted(p.name for p in (tmp_path / "dev").iterdir())
    message = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({PARAMETERS_KEY: Array(np.zeros(3, np.float32))}),
                "config": ConfigRecord({"round": 1}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(1, 1, {"store": str(tmp_path / "dev")}, RecordDict(), {})
    reply = train_on_device(message, context)
    metrics, status = split_reply(dict(reply.content[REPLY_KEY]))
    assert status["error"].startswith("MalformedParameters") and metrics["num-examples"] == 0
    assert "arrays" not in reply.content
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == before


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FEDREC_RETRY_MAX_S", "soon", "FEDREC_RETRY_MAX_S must be a number of seconds"),
        ("FEDREC_RETRY_MAX_S", "-1", "FEDREC_RETRY_MAX_S must be a finite number"),
        ("FEDREC_SUPERNODE_POLL_S", "nan", "FEDREC_SUPERNODE_POLL_S must be a finite number"),
        ("FEDREC_HEARTBEAT_S", "5", "FEDREC_HEARTBEAT_S must be a finite number of seconds >= 10"),
        ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "inf", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL must"),
    ],
)
def test_supernode_settings_from_the_environment_are_validated(monkeypatch, name, value, message):
    from fedrec.client.supernode import supernode_settings

    assert supernode_settings()["retry_max"] == 2.0  # defaults when unset
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        supernode_settings()


def test_the_supernode_wakes_the_warm_executor_when_a_message_arrives(tmp_path, monkeypatch):
    """The SuperNode signals the executor (SIGUSR1, PID from a file) after storing a message;
    the executor's poll sleep ends at once instead of at its next poll. A wake-up that comes
    before the sleep starts still ends it."""
    import os
    import signal
    import time

    from flwr.supernode import start_client_internal as loop

    from fedrec.client.supernode import is_warm_executor, wake_executor_on_message
    from fedrec.client.warm_exec import WakeableSleep

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        sleep = WakeableSleep()
        start = time.monotonic()
        sleep.sleep(0.05)  # nobody wakes it: the whole interval
        assert time.monotonic() - start >= 0.05
        pidfile = tmp_path / "executor.pid"
        pidfile.write_text(str(os.getpid()))
        arrivals = iter([None, 42])  # an empty pull, then a message of run 42
        monkeypatch.setattr(loop, "_pull_and_store_message", lambda **_: next(arrivals))
        assert not is_warm_executor(os.getpid())  # pytest: never signalled by a real SuperNode
        wake_executor_on_message(pidfile, is_executor=lambda pid: pid == os.getpid())
        assert loop._pull_and_store_message() is None  # nothing arrived: nobody woken
        start = time.monotonic()
        sleep.sleep(0.2)
        assert time.monotonic() - start >= 0.2
        assert loop._pull_and_store_message() == 42
        start = time.monotonic()
        sleep.sleep(30)
        assert time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_supernode_polls_fast_right_after_a_reply_then_slowly(monkeypatch):
    import time

    from flwr.supernode import start_client_internal as loop

    from fedrec.client.supernode import PollPacer

    monkeypatch.setattr(loop, "_push_messages", lambda **_: None)
    pacer = PollPacer(slow=0.25, local=0.01, fast=0.1, window=0.3)
    assert pacer.network_interval() == 0.25  # nothing sent yet
    pacer.track_replies()
    loop._push_messages()
    assert pacer.network_interval() == 0.1
    start = time.monotonic()
    pacer.sleep(0.5)  # a local wait (Flower asks 0.5 s): capped at `local`
    assert time.monotonic() - start < 0.2
    time.sleep(0.35)
    assert pacer.network_interval() == 0.25  # the window has passed


@pytest.fixture
def tls_server(tmp_path):
    """A TLS listener on loopback (a stand-in for a TLS SuperLink): it completes handshakes
    and drops a connection that speaks plain HTTP, as the SuperLink does."""
    import socket
    import ssl
    import threading

    from fedrec.common.certs import create_server_cert

    cert, key = create_server_cert(tmp_path / "certs", ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(2)
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except OSError:  # plain HTTP fails the handshake: the connection is dropped
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def test_a_tls_server_is_told_from_a_plain_one(tls_server):
    import socket

    from fedrec.client.supernode import speaks_tls

    assert speaks_tls(tls_server)
    with socket.create_server(("127.0.0.1", 0)) as plain:  # accepts, never answers a handshake
        assert not speaks_tls(f"127.0.0.1:{plain.getsockname()[1]}", timeout=0.5)
        closed = plain.getsockname()[1]
    assert not speaks_tls(f"127.0.0.1:{closed}")  # nothing listening


def test_an_insecure_device_against_a_tls_server_gives_up_naming_tls(tls_server, tmp_path):
    # it used to retry forever; the SuperNode itself gives up (the server may come up later
    # than `fedrec client start` checks) and `fedrec client start` refuses at once
    env = os.environ | {"FLWR_HOME": str(tmp_path / "flwr"), "FEDREC_RETRY_MAX_S": "0.2"}
    log = tmp_path / "node.log"
    with open(log, "w") as out:  # as `fedrec client start` runs it (its own executor)
        node = subprocess.Popen(
            [sys.executable, "-m", "fedrec.client.supernode", "--insecure", "--superlink",
             tls_server, "--port", str(free_port()), "--isolation", "process"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        assert node.wait(90) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
    assert f"the SuperLink at {tls_server} speaks TLS" in log.read_text()
    start = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", "client", "start", "--store",
         str(tmp_path / "device"), "--insecure", "--superlink", tls_server],
        capture_output=True, text=True, env=env, timeout=90,
    )  # fmt: skip
    assert start.returncode == 2 and "Traceback" not in start.stderr
    assert f"the SuperLink at {tls_server} speaks TLS" in start.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_client_start_takes_its_supernode_and_executor_along(tmp_path):
    """SIGKILL of `fedrec client start` (an OOM killer, `kill -9`) cannot be caught, so it could
    not stop its children: its SuperNode stayed up as an orphan, connected under the device's
    key, beside the one a restarted device started (faults benchmark). Now both follow it,
    from their first instant on (killed during their imports, they outlived it by over 15 s
    while only they watched for it). Here the SuperNode retries a server that is not there
    (as after a server crash), as long as it lives."""
    import psutil

    from fedrec.common.flower_launch import free_port

    port = free_port()
    node = [sys.executable, "-m", "fedrec.client.supernode", "--superlink",
            f"127.0.0.1:{free_port()}", "--insecure", "--port", str(port),
            "--isolation", "process"]  # fmt: skip
    supervisor = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedrec.cli.client_cmd import _supervise; "
         f"sys.exit(_supervise({node!r}, {port}))"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    children = []
    try:
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2  # the SuperNode and the warm executor, starting up
        supervisor.kill()
        supervisor.wait()
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], [p.cmdline()[:3] for p in alive]
    finally:
        for process in [supervisor, *children]:  # each by its PID, whatever happened
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                process.kill()
        supervisor.wait()


def test_a_stale_run_that_finished_before_its_stop_is_no_error(monkeypatch):
    """A restarted server stops the runs its killed predecessor left unfinished; one that the
    SuperLink finished between the listing and the stop made Flower refuse the stop ("Run is
    already finished") and the restart died on it (faults benchmark). A run still unfinished
    after a refused stop is an error."""
    from fedrec.common import flower_launch
    from fedrec.server import superlink

    status = {"7": "running"}

    def flwr_json(env, *args, timeout=0):
        if args[0] == "ls":
            wanted = args[args.index("--run-id") + 1] if "--run-id" in args else None
            runs = [{"run-id": k, "status": v} for k, v in status.items() if wanted in (None, k)]
            return {"success": True, "runs": runs}
        assert args[0] == "stop"
        status[args[1]] = finished
        return {"success": False, "error-message": "[code: 18] Run is already finished."}

    monkeypatch.setattr(superlink, "flwr_json", flwr_json)
    monkeypatch.setattr(flower_launch, "flwr_json", flwr_json)  # the final status's `flwr ls`
    finished = "finished:stopped"
    assert superlink.stop_stale_runs({}) == [
        "run 7, left running by a previous server: finished:stopped"
    ]
    status["7"], finished = "running", "running"
    with pytest.raises(RuntimeError, match="could not stop the stale run 7"):
        superlink.stop_stale_runs({})


def test_a_warm_executor_is_recognised_by_its_command_line_only_while_it_runs():
    """The PID in the executor's pidfile is signalled only if it is still the executor: a
    process whose command line names fedrec.client.warm_exec, found through psutil."""
    import subprocess
    import sys

    from fedrec.client.supernode import is_warm_executor

    code = "import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, "fedrec.client.warm_exec"])
    other = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert is_warm_executor(child.pid)
        assert not is_warm_executor(other.pid)
    finally:
        child.kill()
        other.kill()
        child.wait()
        other.wait()
    assert not is_warm_executor(child.pid)  # gone (and a process reusing its PID is not it)


def test_server_start_under_quiet_shows_no_progress_and_logs_without_colour_codes(
    tmp_path, monkeypatch
):
    """`fedrec server start --quiet` (start(quiet=True)) prints warnings, errors and results,
    not its progress; Flower's processes log into superlink.log without terminal colour
    codes (Flower colours its level names whatever its output is), in an environment that
    carries the fedrec loggers' level to the ServerApp. A real SuperLink; the run's
    submission is refused here, so nothing is trained."""
    from fedrec.common.console import LOG_LEVEL_ENV
    from fedrec.common.flower_launch import free_port
    from fedrec.server import superlink

    run = "\n".join(f"{key} = {json.dumps(value)}" for key, value in RUN.items())
    path = tmp_path / "run.toml"
    path.write_text(f"[server]\nport = {free_port()}\n\n[run]\n{run}\n")
    config = load_server_config(path, insecure=True, out=tmp_path / "run")
    stale = "stopped run 7, left running by a previous server"
    monkeypatch.setattr(superlink, "stop_stale_runs", lambda env: [stale])
    monkeypatch.setattr(superlink, "flwr_json", lambda env, *a, **k: {"success": False})
    monkeypatch.setenv(LOG_LEVEL_ENV, "warning")
    envs = []
    popen = superlink.PlainLog.popen

    def recording_popen(self, args, **kwargs):
        envs.append(kwargs["env"])
        return popen(self, args, **kwargs)

    monkeypatch.setattr(superlink.PlainLog, "popen", recording_popen)
    said: list[str] = []
    assert superlink.start(config, echo=said.append, quiet=True) == 2
    assert said == [superlink.INSECURE_WARNING, "error: flwr run failed: {'success': False}"]
    assert envs and all(env[LOG_LEVEL_ENV] == "warning" for env in envs)
    log = (tmp_path / "run" / "flower" / "superlink.log").read_bytes()
    assert b"SuperLink" in log and b"\x1b[" not in log

"""End to end on loopback with real processes: `fedrec server start` (a SuperLink with TLS,
node authentication and a database) and one `fedrec client start` SuperNode per device, each
device with its own store filled by `fedrec client ingest`.

One federation runs through the scenarios in order, so the suite pays for process start-up
once: rounds 1-2 with three healthy devices, a device whose store is corrupted (it replies
with the error, the rounds complete) and a device whose key was never registered (refused);
then the server is restarted over the same run folder (it resumes at round 3), a device is
killed during round 3 (the round completes with the others) and restarted (its ledger and
state continue), and the server is killed during round 4 and restarted (round 4 is redone
once, the numbering stays 1..4). Every process is started and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.common.flower_launch import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROUND_TIMEOUT_S = 45  # how long a round waits for a killed device


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found through /proc)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def running_clientapp(proc: subprocess.Popen) -> bool:
    """Whether a device is working on a message right now: a `flwr-clientapp` process, or a
    child forked by the warm executor."""
    for pid in descendants(proc.pid):
        cmd = _cmdline(pid)
        if b"flwr-clientapp" in cmd or (
            b"warm_exec" in cmd and b"warm_exec" in _cmdline(_parent(pid))
        ):
            return True
    return False


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process and every process it started (each by PID), then reap it."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        kill_tree(proc, signal.SIGKILL)


class Deployment:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.env = os.environ | {
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
        self.procs: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        self.devices: dict[str, subprocess.Popen] = {}

    def fedrec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "fedrec.cli", *args], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"fedrec {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedrec.cli", *args], cwd=self.root, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def write_run(self, rounds: int, min_nodes: int) -> None:
        (self.root / "run.toml").write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\ncertificates = "certs"\n'
            f'devices = "registered"\nout = "run"\ndatabase = "state.db"\n'
            f'[run]\nrounds = {rounds}\nclients-per-round = 10\ndp = "local"\n'
            f"local-steps = 2\nmin-nodes = {min_nodes}\n"
            f"round-timeout-s = {ROUND_TIMEOUT_S}\nwait-nodes-s = 240\n"
        )

    def start_server(self) -> subprocess.Popen:
        self.server = self.spawn("server", "server", "start", "--config", "run.toml")
        return self.server

    def wait_for(self, what, timeout: float, message: str, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            time.sleep(poll)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log"))
        )
        run_log = self.root / "run" / "flower" / "run.log"
        if run_log.exists():
            logs += f"\n--- run.log\n{run_log.read_text()[-4000:]}"
        raise AssertionError(f"timed out: {message}\n{logs}")

    def server_says(self, text: str) -> bool:
        log = self.root / "server.log"
        return log.exists() and log.read_text().count(text) > 0

    def start_device(self, name: str) -> subprocess.Popen:
        proc = self.spawn(name, "client", "start", "--config", f"{name}.toml", "--port",
                          str(free_port()))  # fmt: skip
        self.devices[name] = proc
        return proc

    def rounds(self) -> list[int]:
        path = self.root / "run" / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["round"] for line in path.read_text().splitlines()]

    def devices_log(self) -> list[dict]:
        path = self.root / "run" / "devices.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def status(self, name: str) -> dict:
        return json.loads(
            self.fedrec("client", "status", "--config", f"{name}.toml", "--json").stdout
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc, signal.SIGTERM)


def certified_deployment(
    root: Path, *, rounds: int, devices: list[str], registered: list[str]
) -> tuple[Deployment, list[str]]:
    """A Deployment in `root` with certificates for the server and `devices`, the public keys
    of `registered` moved to root/registered (the server registers those), and the built-in
    catalogue's item ids. The catalogue's text features are cached here, once, not by
    several device processes at once."""
    from fedrec.client.runtime import template_for
    from fedrec.common.data.loaders import load_builtin
    from fedrec.common.run_config import SimulationConfig

    template_for(SimulationConfig.from_flat({"rounds": rounds}))
    d = Deployment(root)
    items = [str(i) for i in load_builtin().catalogue.item_ids]
    d.fedrec("certs", "server", "--host", "127.0.0.1", "--out", "certs")
    d.fedrec("certs", "device", *devices, "--out", "certs")
    (root / "registered").mkdir()
    for name in registered:
        (root / "certs" / "devices" / f"{name}.pub").rename(root / "registered" / f"{name}.pub")
    return d, items


@pytest.fixture()
def deployment(tmp_path):
    d, items = certified_deployment(
        tmp_path,
        rounds=4,
        devices=["dev1", "dev2", "dev3", "dev4", "rogue"],
        registered=["dev1", "dev2", "dev3", "dev4"],  # the rogue device's key never is
    )
    # the devices read the run's public catalogue file and no dataset: the one they name
    # does not exist (the server writes the same file into its run folder and checks its
    # digest against each device's copy every round)
    d.write_run(rounds=2, min_nodes=4)
    d.fedrec("server", "catalogue", "--config", "run.toml", "--out", "public-catalogue.npz")
    for k, name in enumerate(("dev1", "dev2", "dev3", "dev4", "rogue")):
        (tmp_path / f"{name}.toml").write_text(
            f'[device]\nstore = "{name}"\ncatalogue = "public-catalogue.npz"\n'
            'dataset = "csv"\ndata-dir = "no-such-ratings.csv"\n'
            f"[policy]\nepsilon = 200.0\n"
            f'[connection]\nsuperlink = "127.0.0.1:{d.port}"\n'
            f'root-certificates = "certs/ca.pem"\nkey = "certs/devices/{name}.key"\n'
        )
        rnd = random.Random(k)
        lines = ["item,timestamp"] + [
            f"{item},{1_400_000_000 + 3600 * j}" for j, item in enumerate(rnd.sample(items, 16))
        ]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
        d.fedrec("client", "ingest", "--config", f"{name}.toml", f"{name}.csv")
    # dev4's store is corrupted on disk
    (tmp_path / "dev4" / "store.sqlite").write_bytes(b"\x00garbage" * 512)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "dev4" / f"store.sqlite{suffix}").unlink(missing_ok=True)
    yield d
    d.stop()


def test_deployment_end_to_end(deployment):
    d = deployment
    started = time.monotonic()
    # -- rounds 1-2: three healthy devices, one corrupted store, one unregistered device ------
    d.write_run(rounds=2, min_nodes=4)
    d.start_server()
    d.wait_for(lambda: d.server_says("run "), 120, "server started and devices registered")
    assert d.server_says("public catalogue for devices")
    for name in ("dev1", "dev2", "dev3", "dev4"):
        d.start_device(name)
    rogue = d.start_device("rogue")
    assert rogue.wait(60) == 1  # refused: its key is not registered (README: status 1)
    assert "Exit Code: 305" in (d.root / "rogue.log").read_text()
    assert "Failed to activate SuperNode" in (d.root / "rogue.log").read_text()
    assert d.server.wait(300) == 0, (d.root / "server.log").read_text()
    assert d.rounds() == [1, 2]
    checkpoints = d.root / "run" / "checkpoints"
    assert {p.name for p in checkpoints.glob("round-*.npz")} == {"round-0001.npz", "round-0002.npz"}
    assert json.loads((checkpoints / "latest.json").read_text())["round"] == 2
    for entry in d.devices_log():
        outcomes = sorted(x["outcome"] for x in entry["devices"])
        assert outcomes == ["failed", "sent", "sent", "sent"], entry
        assert entry["summed"] == 3
        failed = next(x for x in entry["devices"] if x["outcome"] == "failed")
        assert "store.sqlite" in failed["reason"]  # the corrupted store's clear error
    for name in ("dev1", "dev2", "dev3"):
        status = d.status(name)
        assert status["rounds_trained"] == [1, 2]
        assert 0 < status["max_epsilon"] <= status["budget_epsilon"]
    top = d.fedrec("client", "recommend", "--config", "dev1.toml", "-k", "5", "--json").stdout
    recommended = [r["item"] for r in json.loads(top)]
    seen = {line.split(",")[0] for line in (d.root / "dev1.csv").read_text().splitlines()[1:]}
    assert len(recommended) == 5 and not set(recommended) & seen
    # -- restart over the same folder with 4 rounds: resumes at round 3 ----------------------
    # every device back online before a round starts: after a restart a device counts as
    # online again only from its next heartbeat, and round 3 must include dev3
    d.write_run(rounds=4, min_nodes=4)
    d.start_server()
    d.wait_for(lambda: d.server_says("submitted"), 120, "server restarted")
    # the devices reconnect by themselves; dev3 is killed while it works on round 3
    dev3 = d.devices.pop("dev3")
    # a warm device's message lasts well under a second: look often, or it is missed
    d.wait_for(lambda: running_clientapp(dev3), 180, "dev3 working on round 3", poll=0.01)
    kill_tree(dev3)
    d.wait_for(lambda: d.rounds() == [1, 2, 3], 240, "round 3 completed without dev3")
    round3 = d.devices_log()[-1]
    assert round3["round"] == 3 and round3["summed"] >= 2
    # noticed through its missed heartbeats (10 s interval), not at the round's timeout
    failed = [x for x in round3["devices"] if x["outcome"] == "failed"]
    lost = [x for x in failed if "store.sqlite" not in x["reason"]]  # not the corrupted one
    assert len(lost) == 1 and "Node Unavailable" in lost[0]["reason"], round3
    # dev3 comes back; the server is killed during round 4 and restarted
    d.start_device("dev3")
    d.wait_for(lambda: running_clientapp(d.devices["dev1"]), 180, "round 4 running", poll=0.01)
    kill_tree(d.server)
    assert d.rounds() == [1, 2, 3]
    d.start_server()
    d.wait_for(lambda: d.server.poll() is not None, 300, "restarted server finished")
    assert d.server.returncode == 0, (d.root / "server.log").read_text()
    assert d.rounds() == [1, 2, 3, 4]  # resumed at the right round, each round once
    # the killed server's run was stopped first (devices fetching it would stall otherwise)
    assert "by a previous server" in (d.root / "server.log").read_text()
    assert json.loads((checkpoints / "latest.json").read_text())["round"] == 4
    for name in ("dev1", "dev2", "dev3"):
        status = d.status(name)
        assert status["max_epsilon"] <= status["budget_epsilon"]
        assert status["rounds_trained"][:2] == [1, 2]  # the ledger continued, never reset
    assert 4 in d.status("dev1")["rounds_trained"]
    # every device that sent an update reported its ledger head with it (for audits)
    sent = [o for r in d.devices_log() for o in r["devices"] if o["outcome"] == "sent"]
    assert sent and all(len(o.get("ledger_head", "")) == 64 for o in sent)
    for log in ("superlink.log", "run.log"):  # Flower's output, without its colour codes
        text = (d.root / "run" / "flower" / log).read_bytes()
        assert text and b"\x1b[" not in text, log
    print(f"deployment e2e: {time.monotonic() - started:.0f}s")


# -- SecAgg+ with the distributed discrete Gaussian over real devices --------------------------
SECAGG_DEVICES = tuple(f"sa{k}" for k in range(6))
SECAGG_STAGE_TIMEOUT_S = 30  # a stage waits this long for a stopped device (and a slow one)


def write_secagg_run(d: Deployment, out: str, *, rounds: int, min_survivors: int) -> None:
    (d.root / "run.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {d.port}\ncertificates = "certs"\n'
        f'devices = "registered"\nout = "{out}"\ndatabase = "state.db"\n'
        f"[run]\nrounds = {rounds}\nclients-per-round = {len(SECAGG_DEVICES)}\n"
        'dp = "user+distributed"\nsecure-aggregation-protocol = "secagg"\n'
        f"min-survivors = {min_survivors}\nuser-epsilon = 1000.0\nlocal-steps = 1\n"
        f"min-nodes = {len(SECAGG_DEVICES)}\nround-timeout-s = {SECAGG_STAGE_TIMEOUT_S}\n"
        "wait-nodes-s = 240\n"
    )


def executor_of(proc: subprocess.Popen) -> int:
    """The device's warm executor (it forks one worker per message)."""
    for pid in descendants(proc.pid):
        if b"warm_exec" in _cmdline(pid) and b"warm_exec" not in _cmdline(_parent(pid)):
            return pid
    raise AssertionError("no warm executor under the device")


def stages(d: Deployment, name: str) -> list[dict]:
    path = d.root / name / "secagg.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def secagg_deployment(tmp_path):
    d, items = certified_deployment(
        tmp_path, rounds=2, devices=list(SECAGG_DEVICES), registered=list(SECAGG_DEVICES)
    )
    for k, name in enumerate(SECAGG_DEVICES):
        (tmp_path / f"{name}.toml").write_text(
            f'[device]\nstore = "{name}"\n[policy]\nepsilon = 200.0\n'
            f'[connection]\nsuperlink = "127.0.0.1:{d.port}"\n'
            f'root-certificates = "certs/ca.pem"\nkey = "certs/devices/{name}.key"\n'
        )
        rnd = random.Random(100 + k)
        lines = ["item,timestamp"] + [
            f"{item},{1_400_000_000 + 3600 * j}" for j, item in enumerate(rnd.sample(items, 12))
        ]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
        d.fedrec("client", "ingest", "--config", f"{name}.toml", f"{name}.csv")
    yield d
    for proc in d.procs:  # SIGKILL: a device whose executor the test stopped ignores SIGTERM
        kill_tree(proc, signal.SIGKILL)


@pytest.mark.timeout(1500)  # three server runs; ~14 min measured at load average 12-14
def test_secagg_deployment_end_to_end(secagg_deployment):
    """(a) a user+distributed SecAgg+ run over 6 SuperNodes (TLS, node authentication)
    completes, its summary and the devices' ledgers describe the discrete mechanism and
    `fedrec audit` passes on a device; (b) a device stopped after sending its masked input
    and killed before unmasking leaves the round aggregated over all six (its self mask
    rebuilt from its neighbours' shares); (c) with two devices silent from the start, fewer
    than K_min = 5 advertise keys and the round is discarded, and the records say so."""
    d = secagg_deployment
    started = time.monotonic()
    # -- (a) two rounds, every device in the sum ------------------------------------------
    write_secagg_run(d, "run-a", rounds=2, min_survivors=4)
    d.start_server()
    d.wait_for(lambda: d.server_says("submitted"), 120, "server started")
    for name in SECAGG_DEVICES:
        d.start_device(name)
    assert d.server.wait(300) == 0, (d.root / "server.log").read_text()[-5000:]
    rows = [json.loads(x) for x in (d.root / "run-a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["aggregated"] for r in rows] == [6, 6] and not any(r["discarded"] for r in rows)
    log = [json.loads(x) for x in (d.root / "run-a" / "devices.jsonl").read_text().splitlines()]
    assert all(e["summed"] == 6 and len(e["devices"]) == 6 for e in log), log
    summary = json.loads((d.root / "run-a" / "summary.json").read_text())
    assert summary["secure_aggregation"] == "secagg" and summary["discarded_rounds"] == []
    per_interaction = summary["privacy"]["guarantees"][0]
    assert "discrete Gaussian under SecAgg+" in per_interaction["mechanism"]
    assert "K_min=4" in per_interaction["threat_model"]
    ledger = [json.loads(x) for x in (d.root / "sa0" / "ledger.jsonl").read_text().splitlines()]
    charged = [e for e in ledger if e.get("mechanism", {}).get("ddg")]
    assert charged and charged[-1]["mechanism"]["min_survivors"] == 4, ledger[-1]
    assert [s["stage"] for s in stages(d, "sa0")] == ["keys", "shares", "masked", "unmask"] * 2
    assert d.status("sa0")["guarantee"].startswith("distributed")  # the budget's view
    audit = d.fedrec("audit", "sa0", "--guarantee", "distributed", "--no-pld", check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # -- (b) sa5 sends its masked input, then stops answering and is killed --------------
    write_secagg_run(d, "run-b", rounds=1, min_survivors=4)
    d.start_server()
    victim = d.devices["sa5"]
    before = len(stages(d, "sa5"))
    d.wait_for(
        lambda: any(s["stage"] == "masked" for s in stages(d, "sa5")[before:]),
        240,
        "sa5 answered the masked-input stage",
        poll=0.01,
    )
    os.kill(executor_of(victim), signal.SIGSTOP)  # its worker still sends the masked input
    d.wait_for(
        lambda: run_says(d, "run-b", "secure aggregation masked: 6 of 6"), 60, "inputs collected"
    )
    kill_tree(d.devices.pop("sa5"))
    assert d.server.wait(300) == 0, (d.root / "server.log").read_text()[-5000:]
    (row,) = [json.loads(x) for x in (d.root / "run-b" / "metrics.jsonl").read_text().splitlines()]
    assert row["aggregated"] == 6 and not row["discarded"], row  # sa5's input is in the sum
    (entry,) = [
        json.loads(x) for x in (d.root / "run-b" / "devices.jsonl").read_text().splitlines()
    ]
    failed = [x for x in entry["devices"] if x["outcome"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"].startswith("unmask:"), entry
    assert stages(d, "sa5")[-1]["stage"] == "masked"  # it never answered the unmask request
    # -- (c) K_min = 5, two of the six devices silent (connected, never answering) --------
    d.start_device("sa5")
    for name in ("sa4", "sa5"):
        d.wait_for(lambda n=name: _has_executor(d.devices[n]), 120, f"{name} executor up")
        os.kill(executor_of(d.devices[name]), signal.SIGSTOP)
    write_secagg_run(d, "run-c", rounds=1, min_survivors=5)
    d.start_server()
    assert d.server.wait(300) == 0, (d.root / "server.log").read_text()[-5000:]
    for name in ("sa4", "sa5"):
        kill_tree(d.devices.pop(name))  # SIGKILL: a stopped process ignores SIGTERM
    (row,) = [json.loads(x) for x in (d.root / "run-c" / "metrics.jsonl").read_text().splitlines()]
    assert row["discarded"] and row["aggregated"] == 0, row
    assert run_says(d, "run-c", "secure aggregation aborted, nothing unmasked")
    assert d.server_says("round 1: discarded (fewer than K_min survived secure aggregation)")
    summary = json.loads((d.root / "run-c" / "summary.json").read_text())
    assert summary["discarded_rounds"] == [1]
    checkpoint = json.loads((d.root / "run-c" / "checkpoints" / "latest.json").read_text())
    assert checkpoint["round"] == 1  # the discarded round is committed as discarded
    print(f"secagg deployment e2e: {time.monotonic() - started:.0f}s")


def run_says(d: Deployment, out: str, text: str) -> bool:
    """Whether the server's or its ServerApp's output holds `text`."""
    logs = [d.root / "server.log", d.root / out / "flower" / "run.log"]
    return any(p.exists() and text in p.read_text() for p in logs)


def _has_executor(proc: subprocess.Popen) -> bool:
    try:
        executor_of(proc)
    except AssertionError:
        return False
    return True

"""Fault injection: SIGKILL a simulation and a deployment at random points, restart them, and
check what they left.

    python benchmarks/faults.py [--cycles 8] [--deployment-cycles 6] [--seed 0]
                                [--out benchmarks/results] [--work DIR] [--no-simulation]

Simulation: a small synthetic `fedrec simulate` through Flower is killed (SIGKILL to the
launcher, as an OOM killer or a power cut would) at a random moment of each cycle, then
continued with `--resume`, until it completes; then `fedrec audit` of its run folder.

Deployment: `fedrec server start` (TLS, device keys) and three `fedrec client start` devices
on loopback; each cycle SIGKILLs one launcher (a device's, then the server's, in turn) at a
random moment, mid-round half the time, lets the device's owner ingest new interactions
meanwhile, and starts the same command again; after the run, every device's folder is
audited against the ledger head it last sent the server.

Per cycle: processes of the killed launcher still alive ORPHAN_GRACE_S later (orphans). At
the end: ledgers whose rounds go backwards, ledgers charging a round more often than it was
run (a round a kill cut short is run again, and a device asked both times trained twice:
both releases are charged, rightly), interactions that should be in a device's store and are
not, and the audits' verdicts. Writes OUT/faults.json (DIR keeps the run folders).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import psutil

from fedrec.common.processes import RUN_DIR_ENV

SMALL = {
    "dataset": "synthetic",
    "synthetic": "num_users=120,num_items=60,mean_interactions_per_user=12,seed=2",
    "rounds": 12,
    "clients-per-round": 40,
    "min-survivors": 3,
}
ORPHAN_GRACE_S = 15.0  # the watchdog stops a killed launcher's processes within this


def environment(process: psutil.Process) -> dict[str, str]:
    """/proc/PID/environ read whole (Linux): psutil's parser stops at the first empty entry,
    and a process that renamed itself (Ray's agents) has zeroes there."""
    data = Path(f"/proc/{process.pid}/environ").read_bytes()
    pairs = (entry.partition(b"=") for entry in data.split(b"\0"))
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, sep, v in pairs if sep}


def run_processes(out: Path) -> list[psutil.Process]:
    """Live processes of the run: those the launcher marked with the run folder
    (FEDREC_RUN_DIR, `fedrec.common.processes`) or whose FLWR_HOME it put inside it."""
    found = []
    for process in psutil.process_iter():
        try:
            env = environment(process)
            if env.get(RUN_DIR_ENV) == str(out) or env.get("FLWR_HOME", "").startswith(f"{out}/"):
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


CLI = [sys.executable, "-m", "fedrec.cli"]
ENV = os.environ | {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
}


def simulate(out: Path, resume: bool) -> subprocess.Popen:
    args = [*CLI, "simulate", "--out", str(out)]
    for key, value in SMALL.items():
        args += [f"--{key}", str(value)]
    if resume:
        args.append("--resume")
    return subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # like a shell job: the kill reaches the launcher alone
        env=ENV | {"FEDREC_CACHE_DIR": str(out.parent / "cache")},
    )


def rounds_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def orphans_after(find: Callable[[], list[psutil.Process]]) -> list[str]:
    """What `find` still lists ORPHAN_GRACE_S after a kill (each then killed, so that the
    next cycle starts clean): `name pid` of each."""
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while time.monotonic() < deadline:
        if not find():
            time.sleep(1.0)
            if not find():  # twice in a row: nothing was starting between the two looks
                return []
        time.sleep(0.5)
    left = find()
    names = []
    for process in left:
        try:
            names.append(f"{' '.join(process.cmdline()[:3])[:120]} ({process.pid})")
            process.kill()
        except psutil.Error:
            pass
    return names


def ledger_faults(
    folder: Path, attempts: dict[str, Counter], pattern: str = "*/ledger.jsonl"
) -> tuple[int, int]:
    """(ledgers whose train rounds go backwards, ledgers charging a round twice). A round a
    kill cut short is run again, and a device asked both times trained twice: both releases
    are charged, rightly. A double charge is a round charged more often than the server's
    attempts at it asked the device (attempts.jsonl, written before it asks; at least once)."""
    backwards = twice = 0
    for path in sorted(folder.glob(pattern)):
        rounds = [
            e["round"]
            for e in map(json.loads, path.read_text().splitlines())
            if e.get("kind") == "train"
        ]
        asked = attempts.get(path.parent.name, Counter())
        backwards += any(b < a for a, b in itertools.pairwise(rounds))
        twice += any(n > max(1, asked[r]) for r, n in Counter(rounds).items())
    return backwards, twice


def attempts_per_round(run: Path) -> dict[int, int]:
    """Rounds the server attempted more than once (attempts.jsonl): those a kill cut short."""
    path = run / "attempts.jsonl"
    rounds = Counter(
        json.loads(line)["round"]
        for line in (path.read_text().splitlines() if path.exists() else [])
    )
    return {r: n for r, n in sorted(rounds.items()) if n > 1}


def attempts_by_device(run: Path, names: dict[str, str] | None = None) -> dict[str, Counter]:
    """device -> {round: attempts that asked it}, from the server's attempts.jsonl (`names`
    maps a deployment's node ids to the devices' folder names)."""
    out: dict[str, Counter] = {}
    path = run / "attempts.jsonl"
    for row in map(json.loads, path.read_text().splitlines() if path.exists() else []):
        for device in row["devices"]:
            name = (names or {}).get(device, device)
            out.setdefault(name, Counter())[row["round"]] += 1
    return out


def undelivered(out: Path) -> int:
    """Interactions the stream delivered to a device by the last committed round it replied
    in (participation.jsonl: sampled, not failed) that its store does not hold."""
    from fedrec.common.data.stream import load_stream
    from fedrec.common.run_config import SimulationConfig

    config = SimulationConfig.from_flat(json.loads((out / "config.json").read_text()))
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    last: dict[str, int] = {}
    for row in map(json.loads, (out / "participation.jsonl").read_text().splitlines()):
        for name in set(row["devices"]) - set(row["failed"]):
            last[name] = max(last.get(name, 0), row["round"])
    names = {str(stream.dataset.user_ids[u]): int(u) for u in stream.clients()}
    missing = 0
    for name, round in last.items():
        due = {
            (item, ts)
            for d in stream.deliveries(names[name], 0, round)
            for item, ts in zip(d.items, d.timestamps, strict=True)
        }
        missing += len(due - stored(out / "clients" / name))
    return missing


def stored(folder: Path) -> set[tuple[str, int]]:
    """(item, timestamp) of every interaction in a device's store."""
    from fedrec.client.store import STORE_FILE

    path = folder / STORE_FILE
    if not path.exists():
        return set()
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {(str(i), int(t)) for i, t in db.execute("SELECT item, timestamp FROM interactions")}


def audit(folder: Path, *args: str) -> dict:
    """`fedrec audit` of a folder: its exit status and the end of what it said."""
    done = subprocess.run(
        [*CLI, "audit", str(folder), *args], capture_output=True, text=True, env=ENV
    )
    return {"exit": done.returncode, "output_tail": (done.stdout + done.stderr)[-1500:]}


def simulation_half(work: Path, cycles: int, rng: random.Random) -> dict:
    out = work / "run"
    rows = []
    interrupted: Counter = Counter()  # round -> kills that interrupted it
    started = time.perf_counter()
    for cycle in range(cycles):
        proc = simulate(out, resume=(out / "config.json").exists())
        before = rounds_done(out)
        if rng.random() < 0.25:  # during start-up (Flower, Ray, the first round: ~90 s here)
            delay = rng.uniform(5.0, 60.0)
            time.sleep(delay)
            when = f"{delay:.1f} s after the launch"
        else:  # at a random moment after the launch's first round
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if rounds_done(out) > before:
                    break
                time.sleep(0.2)
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
            when = f"{delay:.1f} s after round {rounds_done(out)}"
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        orphans = orphans_after(lambda: run_processes(out)) if killed else []
        after = rounds_done(out)  # the killed launch's ServerApp may finish a round meanwhile
        if killed and after < SMALL["rounds"]:
            interrupted[after + 1] += 1
        rows.append(
            {
                "cycle": cycle,
                "killed": killed,
                "when": when,
                "exit": proc.returncode,
                "rounds_before": before,
                "rounds_after": after,
                "orphans": len(orphans),
                "orphan_processes": orphans,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if (out / "summary.json").exists():
            break
    final = None
    if not (out / "summary.json").exists():
        proc = simulate(out, resume=True)
        final = proc.wait(timeout=1800)
    backwards, twice = ledger_faults(out / "clients", attempts_by_device(out))
    verdict = audit(out)
    return {
        "what": f"fedrec simulate through Flower ({SMALL['synthetic']}, {SMALL['rounds']} "
        "rounds): SIGKILL of the launcher at a random moment (a quarter of the kills 5-60 s "
        "into start-up, the others 0-2 s after the launch's first round), then --resume; "
        "after the cycles, one last --resume to completion",
        "cycles_run": len(rows),
        "kills": sum(c["killed"] for c in rows),
        "rounds_interrupted": dict(sorted(interrupted.items())),
        "rounds_attempted_more_than_once": attempts_per_round(out),
        "final_resume_exit": final,
        "completed": (out / "summary.json").exists(),
        "orphans_left": sum(c["orphans"] for c in rows),
        "ledgers": len(list((out / "clients").glob("*/ledger.jsonl"))),
        "ledgers_out_of_order": backwards,
        "ledgers_double_charged": twice,
        "interactions_never_delivered": undelivered(out),
        "audit_exit": verdict["exit"],
        "audit_failed": verdict["exit"] != 0,
        "audit_output_tail": verdict["output_tail"],
        "wall_s": round(time.perf_counter() - started, 1),
        "cycles": rows,
    }


# -- the deployment: real processes on loopback ------------------------------------------------

DEVICES = ("dev1", "dev2", "dev3")
DEPLOY_ROUNDS = 8
ROUND_TIMEOUT_S = 45  # how long a round waits for a killed device (it is noticed in ~20 s)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                out.append(process)
        except psutil.Error:
            continue
    return out


def with_arg(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (a device's store folder)."""
    found = []
    for process in psutil.process_iter():
        try:
            if any(text in arg for arg in process.cmdline()) and process.pid != os.getpid():
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except psutil.Error:
            continue
    return found


class Deployment:
    """`fedrec server start` and one `fedrec client start` per device, as
    tests/test_deployment_e2e.py drives them: TLS, device keys, a public catalogue file."""

    def __init__(self, root: Path, rng: random.Random):
        from fedrec.common.flower_launch import free_port

        self.root, self.rng = root, rng
        self.port = free_port()
        self.env = ENV | {"FLWR_HOME": str(root / "flwr-home")}
        self.server: subprocess.Popen | None = None
        self.devices: dict[str, subprocess.Popen] = {}
        self.ingested: dict[str, set[tuple[str, int]]] = {name: set() for name in DEVICES}
        self.clock = 1_400_000_000

    def fedrec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*CLI, *args], cwd=self.root, env=self.env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"fedrec {' '.join(args)}:\n{done.stdout}\n{done.stderr}")
        return done

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [*CLI, *args], cwd=self.root, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def set_up(self) -> None:
        from fedrec.common.data.loaders import load_builtin

        self.items = [str(i) for i in load_builtin().catalogue.item_ids]
        self.fedrec("certs", "server", "--host", "127.0.0.1", "--out", "certs")
        self.fedrec("certs", "device", *DEVICES, "--out", "certs")
        (self.root / "run.toml").write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\ncertificates = "certs"\n'
            f'out = "run"\ndatabase = "state.db"\n'
            f"[run]\nrounds = {DEPLOY_ROUNDS}\nclients-per-round = {len(DEVICES)}\n"
            f'dp = "local"\nlocal-steps = 2\nmin-nodes = {len(DEVICES)}\n'
            f"round-timeout-s = {ROUND_TIMEOUT_S}\nwait-nodes-s = 240\n"
        )
        self.fedrec("server", "catalogue", "--config", "run.toml", "--out", "public-catalogue.npz")
        for name in DEVICES:
            (self.root / f"{name}.toml").write_text(
                f'[device]\nstore = "{name}"\ncatalogue = "public-catalogue.npz"\n'
                f"[policy]\nepsilon = 200.0\n"
                f'[connection]\nsuperlink = "127.0.0.1:{self.port}"\n'
                f'root-certificates = "certs/ca.pem"\nkey = "certs/devices/{name}.key"\n'
            )
            self.ingest(name, 16)

    def ingest(self, name: str, n: int) -> int:
        """`fedrec client ingest` of n new interactions; returns its exit status. What it
        accepted (exit 0) must be in the store at the end."""
        rows = [
            (item, self.clock + 3600 * k) for k, item in enumerate(self.rng.sample(self.items, n))
        ]
        self.clock += 3600 * n
        path = self.root / f"{name}-{self.clock}.csv"
        path.write_text("item,timestamp\n" + "".join(f"{i},{t}\n" for i, t in rows))
        done = self.fedrec("client", "ingest", "--config", f"{name}.toml", path.name, check=False)
        if done.returncode == 0:
            self.ingested[name] |= set(rows)
        return done.returncode

    def start_server(self) -> None:
        self.server = self.spawn("server", "server", "start", "--config", "run.toml")

    def start_device(self, name: str) -> None:
        from fedrec.common.flower_launch import free_port

        self.devices[name] = self.spawn(
            name, "client", "start", "--config", f"{name}.toml", "--port", str(free_port())
        )

    def rounds(self) -> int:
        return rounds_done(self.root / "run")

    def busy(self, name: str) -> bool:
        """Whether a device is working on a message now (a child of its warm executor)."""
        for process in descendants(self.devices[name].pid):
            try:
                parent = process.parent()
                if "warm_exec" in " ".join(parent.cmdline() if parent else []):
                    if "warm_exec" in " ".join(process.cmdline()):
                        return True
            except psutil.Error:
                continue
        return False

    def device_processes(self, name: str) -> list[psutil.Process]:
        return with_arg(str((self.root / name).resolve()))

    def stop(self) -> None:
        for proc in [self.server, *self.devices.values()]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [self.server, *self.devices.values()]:
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_until(what: Callable[[], object], timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(poll)
    return False


def kill_moment(d: Deployment, rng: random.Random, name: str) -> str:
    """Wait for a random moment: half the time while device `name` trains (mid-round), else
    a uniform 0-15 s from now (start-up, waiting for devices, between or inside rounds)."""
    if rng.random() < 0.5:
        if wait_until(lambda: d.busy(name), 90, poll=0.01):
            return f"while {name} trained"
        return "after 90 s (no device trained)"
    delay = rng.uniform(0.0, 15.0)
    time.sleep(delay)
    return f"{delay:.1f} s in"


def node_names(d: Deployment) -> dict[str, str]:
    """node id -> device name, from the server's registration lines."""
    names = {}
    text = (d.root / "server.log").read_text() if (d.root / "server.log").exists() else ""
    for line in text.splitlines():
        if line.startswith("registered ") and ": node " in line:
            name, node = line.removeprefix("registered ").split(": node ")
            names[node.strip()] = name.strip()
    return names


def deployment_half(work: Path, cycles: int, rng: random.Random) -> dict:
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    d = Deployment(work, rng)
    d.set_up()
    run = work / "run"
    rows = []
    interrupted: Counter = Counter()  # round -> server kills that interrupted it
    try:
        d.start_server()
        if not wait_until(lambda: "submitted" in (work / "server.log").read_text(), 300):
            raise RuntimeError((work / "server.log").read_text()[-3000:])
        for name in DEVICES:
            d.start_device(name)
        for cycle in range(cycles):
            if d.server.poll() is not None:
                break  # the run completed: nothing left to interrupt
            target = "server" if cycle % 2 else rng.choice(DEVICES)
            when = kill_moment(d, rng, target if target != "server" else rng.choice(DEVICES))
            before = d.rounds()
            if target == "server":
                proc, watched = d.server, lambda: run_processes(run)
            else:
                proc = d.devices[target]
                tree = descendants(proc.pid)
                watched = lambda tree=tree, name=target: alive(tree) or d.device_processes(name)  # noqa: E731
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)  # the launcher alone, as an OOM killer would
            proc.wait()
            orphans = orphans_after(watched)
            after = d.rounds()
            if target == "server" and after < DEPLOY_ROUNDS:
                interrupted[after + 1] += 1
            # the owner adds interactions while its device is down (or the server is)
            name = target if target != "server" else rng.choice(DEVICES)
            ingest_exit = d.ingest(name, 3)
            if target == "server":
                d.start_server()
            else:
                d.start_device(target)
            rows.append(
                {
                    "cycle": cycle,
                    "killed": target,
                    "when": when,
                    "rounds_before": before,
                    "rounds_after": after,
                    "orphans": len(orphans),
                    "orphan_processes": orphans,
                    f"ingest_{name}_exit": ingest_exit,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        server_exit = d.server.wait(1200)
    finally:
        devices = {name: proc.pid for name, proc in d.devices.items()}
        d.stop()
    # after a clean stop nothing of the run or of a device may be left
    left = orphans_after(
        lambda: run_processes(run) + [p for n in DEVICES for p in d.device_processes(n)]
    )
    names = node_names(d)
    backwards, twice = ledger_faults(work, attempts_by_device(run, names), "dev*/ledger.jsonl")
    missing = 0
    for name in DEVICES:
        missing += len(d.ingested[name] - stored(work / name))
    # The server's run folder holds no ledger (they live on the devices): `fedrec audit` of
    # it alone stops at "no ledgers found" (exit 2). Each device's folder is audited against
    # the ledger head it last sent the server (devices.jsonl), as docs/deployment.md says.
    run_audit = audit(run)
    audits = {}
    heads = last_heads(run, names)
    for name in DEVICES:
        args = []
        if name in heads:
            (work / f"{name}-heads.json").write_text(json.dumps({name: heads[name]}))
            args = ["--heads", str(work / f"{name}-heads.json")]
        audits[name] = audit(work / name, *args)
    return {
        "what": f"fedrec server start (TLS, device keys) and {len(DEVICES)} fedrec client start "
        f"devices on loopback, {DEPLOY_ROUNDS} rounds, local DP: per cycle SIGKILL of one "
        "launcher at a random moment (a device's and the server's in turn), new interactions "
        "ingested on a device meanwhile, then the same command again",
        "cycles_run": len(rows),
        "device_kills": sum(r["killed"] != "server" for r in rows),
        "server_kills": sum(r["killed"] == "server" for r in rows),
        "rounds_interrupted_by_server_kills": dict(sorted(interrupted.items())),
        "rounds_attempted_more_than_once": attempts_per_round(run),
        "server_exit": server_exit,
        "rounds_completed": d.rounds(),
        "completed": (run / "summary.json").exists(),
        "orphans_left": sum(r["orphans"] for r in rows) + len(left),
        "orphans_after_the_end": left,
        "ledgers": len(list(work.glob("dev*/ledger.jsonl"))),
        "ledgers_out_of_order": backwards,
        "ledgers_double_charged": twice,
        "interactions_ingested": sum(len(v) for v in d.ingested.values()),
        "interactions_never_delivered": missing,
        "run_folder_audit": run_audit,
        "audits": {k: v["exit"] for k, v in audits.items()},
        "audits_failed": sum(v["exit"] != 0 for v in audits.values()),
        "audit_output_tails": {k: v["output_tail"] for k, v in audits.items() if v["exit"]},
        "device_pids_at_the_end": devices,
        "wall_s": round(time.perf_counter() - started, 1),
        "cycles": rows,
    }


def last_heads(run: Path, names: dict[str, str]) -> dict[str, str]:
    """Each device's ledger head from its last reply the server recorded (devices.jsonl)."""
    heads = {}
    path = run / "devices.jsonl"
    for row in map(json.loads, path.read_text().splitlines() if path.exists() else []):
        for device in row["devices"]:
            if device.get("ledger_head") and device["node"] in names:
                heads[names[device["node"]]] = device["ledger_head"]
    return heads


def totals(results: dict) -> dict:
    halves = [results[k] for k in ("simulation", "deployment") if k in results]
    return {
        "cycles_run": sum(h["cycles_run"] for h in halves),
        "orphans_left": sum(h["orphans_left"] for h in halves),
        "ledgers_out_of_order": sum(h["ledgers_out_of_order"] for h in halves),
        "ledgers_double_charged": sum(h["ledgers_double_charged"] for h in halves),
        "interactions_never_delivered": sum(h["interactions_never_delivered"] for h in halves),
        "audits_failed": sum(h.get("audits_failed", h.get("audit_failed", 0)) for h in halves),
        "runs_completed": sum(h["completed"] for h in halves),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=8, help="simulation kill/resume cycles")
    parser.add_argument("--deployment-cycles", type=int, default=6, help="0: no deployment")
    parser.add_argument("--simulation", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args()
    rng = random.Random(args.seed)  # when and what to kill: the experiment's design
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        results = {"command": " ".join(["python", *sys.argv]), "cpus": os.cpu_count()}
        if args.simulation:
            results["simulation"] = simulation_half(work / "simulation", args.cycles, rng)
        if args.deployment_cycles:
            results["deployment"] = deployment_half(
                work / "deployment", args.deployment_cycles, rng
            )
        results["totals"] = totals(results)
    print(json.dumps(results, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Fault injection: SIGKILL `fedrec simulate` at random points, resume, and audit the result.

    python benchmarks/faults.py [--cycles 6] [--seed 0] [--out benchmarks/results]

A small synthetic run through Flower is killed (SIGKILL to the launcher, as an OOM killer or
a power cut would) at a random moment of each cycle, then continued with `--resume`, until it
completes; a final `fedrec audit` checks the result. Per cycle it records whether any process
of the run outlived the launcher by more than the watchdog's grace (orphans), and at the end:
ledgers out of order or charging a round twice, interactions the stream meant to deliver that
no device holds, and the audit's verdict. Writes OUT/faults.json.
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
from pathlib import Path

import psutil

SMALL = {
    "dataset": "synthetic",
    "synthetic": "num_users=120,num_items=60,mean_interactions_per_user=12,seed=2",
    "rounds": 8,
    "clients-per-round": 40,
    "min-survivors": 3,
}
ORPHAN_GRACE_S = 15.0  # the watchdog stops a killed launcher's processes within this


def run_processes(out: Path) -> list[psutil.Process]:
    """Live processes of the run: those whose FLWR_HOME the launcher put inside `out`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FLWR_HOME", "").startswith(str(out)):
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        except psutil.Error:
            continue
    return found


def simulate(out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "fedrec.common.cli", "simulate", "--out", str(out)]
    for key, value in SMALL.items():
        args += [f"--{key}", str(value)]
    if resume:
        args.append("--resume")
    return subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # like a shell job: the kill reaches the launcher alone
        env=os.environ | {"FEDREC_CACHE_DIR": str(out.parent / "cache")},
    )


def rounds_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def orphans_after_kill(out: Path) -> int:
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while time.monotonic() < deadline:
        if not run_processes(out):
            return 0
        time.sleep(0.5)
    left = run_processes(out)
    for process in left:  # leave the machine clean for the next cycle
        try:
            process.kill()
        except psutil.Error:
            pass
    return len(left)


def ledger_faults(out: Path) -> tuple[int, int]:
    """(ledgers whose train rounds go backwards, ledgers with a round charged twice)."""
    backwards = twice = 0
    for path in sorted((out / "clients").glob("*/ledger.jsonl")):
        rounds = [
            e["round"]
            for e in map(json.loads, path.read_text().splitlines())
            if e.get("kind") == "train"
        ]
        backwards += any(b < a for a, b in itertools.pairwise(rounds))
        twice += len(rounds) != len(set(rounds))
    return backwards, twice


def undelivered(out: Path) -> int:
    """Interactions of the stream's delivered windows that no device store holds."""
    from fedrec.simulations.config import SimulationConfig
    from fedrec.simulations.stream import load_stream

    config = SimulationConfig.from_flat(json.loads((out / "config.json").read_text()))
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    missing = 0
    for user in stream.clients():
        expected = sum(len(d.items) for d in stream.deliveries(int(user), 0, config.rounds))
        store = out / "clients" / str(int(user)) / "store.sqlite"
        held = 0
        if store.exists():
            with sqlite3.connect(store) as db:
                held = db.execute("SELECT count(*) FROM interactions").fetchone()[0]
        missing += max(0, expected - held)
    return missing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rng = random.Random(args.seed)  # when to kill: the experiment's design, not privacy
    cycles = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        started = time.perf_counter()
        for cycle in range(args.cycles):
            proc = simulate(out, resume=(out / "config.json").exists())
            before = rounds_done(out)
            # kill once the run is past its start-up, at a random moment of a round
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if rounds_done(out) > before or time.monotonic() > deadline - 540:
                    break
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 3.0))
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            cycles.append(
                {
                    "cycle": cycle,
                    "killed": killed,
                    "rounds_before": before,
                    "rounds_after": rounds_done(out),
                    "orphans": orphans_after_kill(out) if killed else 0,
                }
            )
            print(json.dumps(cycles[-1]), flush=True)
            if (out / "summary.json").exists():
                break
        final = simulate(out, resume=True) if not (out / "summary.json").exists() else None
        if final is not None:
            final.wait(timeout=1800)
        backwards, twice = ledger_faults(out)
        audit = subprocess.run(
            [sys.executable, "-m", "fedrec.common.cli", "audit", str(out)],
            capture_output=True,
            text=True,
        )
        results = {
            "what": "fedrec simulate through Flower (120 synthetic devices, 8 rounds), SIGKILL "
            "of the launcher at a random moment after a round, then --resume; until complete",
            "command": f"python benchmarks/faults.py --cycles {args.cycles} --seed {args.seed}",
            "cycles_run": len(cycles),
            "kills": sum(c["killed"] for c in cycles),
            "orphans_left": sum(c["orphans"] for c in cycles),
            "ledgers_out_of_order": backwards,
            "ledgers_double_charged": twice,
            "interactions_never_delivered": undelivered(out),
            "completed": (out / "summary.json").exists(),
            "audit_exit": audit.returncode,
            "audit_failed": audit.returncode != 0,
            "wall_s": time.perf_counter() - started,
            "cycles": cycles,
        }
    print(json.dumps(results, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

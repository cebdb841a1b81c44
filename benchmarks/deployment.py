"""Deployment on loopback: per-message overhead (cold vs warm executor) and round wall times.

Starts `fedrec server start` (TLS, node authentication) and N `fedrec client start` devices as
real processes, runs R rounds, and reads the run folder: a round's wall time (server side,
from sending the model to the last reply) and each device's own training time (`seconds`,
shared because the benchmark's device policy allows evaluation metrics; `message_seconds`
is the whole ClientApp handler: policy, store, model template, round). The overhead of a
message is the round time minus the handler's time, with one device: process start, imports,
Flower's transport and polling.

    python benchmarks/deployment.py --devices 1 --rounds 4 --mode cold
    python benchmarks/deployment.py --devices 1 --rounds 4 --mode warm
    python benchmarks/deployment.py --devices 3 --rounds 3 --mode warm
    python benchmarks/deployment.py --devices 10 --rounds 3 --mode warm
    python benchmarks/deployment.py --devices 1 --rounds 10 --poll-s 0.1 --tag poll-0.1

Writes benchmarks/results/deployment-<mode>-<devices>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("warm", "cold"), default="warm")
    parser.add_argument("--poll-s", type=float, default=None, help="fedrec client start --poll-s")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()

    from fedrec.client.device import ingest
    from fedrec.client.runtime import template_for
    from fedrec.common.certs import create_device_key, create_server_cert
    from fedrec.common.data.loaders import load_builtin
    from fedrec.common.flower_launch import free_port
    from fedrec.common.run_config import SimulationConfig

    template_for(SimulationConfig.from_flat({"rounds": args.rounds}))  # text features cached
    root = Path(tempfile.mkdtemp(prefix="fedrec-bench-"))
    port = free_port()
    create_server_cert(root / "certs", ["127.0.0.1"])
    items = [str(i) for i in load_builtin().catalogue.item_ids]
    names = [f"dev{k}" for k in range(args.devices)]
    for k, name in enumerate(names):
        create_device_key(root / "certs", name)
        (root / f"{name}.toml").write_text(
            f'[device]\nstore = "{name}"\n[policy]\nepsilon = 1000.0\n'
            "allow-evaluation-metrics = true\n"
            f'[connection]\nsuperlink = "127.0.0.1:{port}"\n'
            f'root-certificates = "certs/ca.pem"\nkey = "certs/devices/{name}.key"\n'
        )
        rnd = random.Random(k)
        lines = [f"{i},{1_400_000_000 + 3600 * j}" for j, i in enumerate(rnd.sample(items, 20))]
        ingest(root / name, lines, set(items))
    (root / "run.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nout = "run"\ndatabase = "state.db"\n'
        f"[run]\nrounds = {args.rounds}\nclients-per-round = {args.devices}\n"
        f'dp = "user+local"\nuser-epsilon = 10000.0\nmin-nodes = {args.devices}\n'
    )
    env = os.environ | {
        "FLWR_HOME": str(root / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cli = [sys.executable, "-m", "fedrec.cli"]
    log = open(root / "processes.log", "ab")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    server = subprocess.Popen(
        [*cli, "server", "start", "--config", "run.toml"], cwd=root, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    devices = []
    try:
        deadline = time.monotonic() + 300
        while "submitted" not in (root / "processes.log").read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError((root / "processes.log").read_text()[-3000:])
            time.sleep(0.5)
        for name in names:
            devices.append(
                subprocess.Popen(
                    [
                        *cli,
                        "client",
                        "start",
                        "--config",
                        f"{name}.toml",
                        "--port",
                        str(free_port()),
                        "--warm" if args.mode == "warm" else "--cold",
                        *(["--poll-s", str(args.poll_s)] if args.poll_s is not None else []),
                    ],
                    cwd=root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        code = server.wait(3600)
    finally:
        for proc in [server, *devices]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [server, *devices]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    total = time.perf_counter() - started
    rows = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    per_device = [json.loads(x) for x in (root / "run" / "devices.jsonl").read_text().splitlines()]
    rounds = []
    for row, devs in zip(rows, per_device, strict=True):
        handler = [d.get("message_seconds", 0.0) for d in devs["devices"]]
        train = [d.get("seconds", 0.0) for d in devs["devices"]]
        rounds.append(
            {
                "round": row["round"],
                "wall_s": row["seconds"],
                "device_train_s_max": max(train) if train else None,
                "device_handler_s_max": max(handler) if handler else None,
                # beyond the training itself (local_round): process, imports, model, transport
                "overhead_s": row["seconds"] - (max(train) if train else 0.0),
                # beyond the whole handler: process start, imports, Flower's transport
                "overhead_beyond_handler_s": row["seconds"] - (max(handler) if handler else 0.0),
                "summed": devs["summed"],
            }
        )
    later = rounds[1:] or rounds  # round 1 includes the devices' first start
    result = {
        "mode": args.mode,
        "devices": args.devices,
        "exit": code,
        "total_s": total,
        "rounds": rounds,
        "mean_round_wall_s_after_first": sum(r["wall_s"] for r in later) / len(later),
        "mean_overhead_s_after_first": sum(r["overhead_s"] for r in later) / len(later),
        "mean_overhead_beyond_handler_s_after_first": sum(
            r["overhead_beyond_handler_s"] for r in later
        )
        / len(later),
        "poll_s": args.poll_s,  # None: the default (0.25 s)
        "load_average_before": load_before,
        "folder": str(root),
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    out = RESULTS / f"deployment-{args.mode}-{args.devices}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

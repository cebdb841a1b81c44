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
    python benchmarks/deployment.py --devices 10 --rounds 3 --tag same-model
    python benchmarks/deployment.py --devices 10 --rounds 3 --dp user+distributed --secagg

--secagg runs `secure-aggregation-protocol = "secagg"` (SecAgg+ with the distributed discrete
Gaussian: four message exchanges per round) at K_min = --min-survivors (default: all but two
of the devices); --dp user+local without it is the plain round it is compared with, at the
same model and devices. Each round's message bytes (both ways, as serialised records) come
from the ServerApp's log.

Writes benchmarks/results/deployment-<mode>-<devices>[-secagg][-<tag>].json.
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
    parser.add_argument("--dp", default="user+local")
    parser.add_argument("--secagg", action="store_true", help="SecAgg+ (needs --dp ...distributed)")
    parser.add_argument("--min-survivors", type=int, default=None)
    args = parser.parse_args()
    k_min = args.min_survivors if args.min_survivors is not None else max(1, args.devices - 2)

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
        f'dp = "{args.dp}"\nuser-epsilon = 10000.0\nmin-nodes = {args.devices}\n'
        + (
            f'secure-aggregation-protocol = "secagg"\nmin-survivors = {k_min}\nlocal-steps = 1\n'
            if args.secagg
            else ""
        )
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
    traffic = {}
    for line in (root / "run" / "flower" / "run.log").read_text().splitlines():
        if "[fedrec] traffic round" in line:
            words = line.split("[fedrec] traffic round ", 1)[1].replace(",", "").split()
            traffic[int(words[0].rstrip(":"))] = (int(words[1]), int(words[5]), int(words[9]))
    for r in rounds:
        to, back, sampled = traffic.get(r["round"], (0, 0, 0))
        r["bytes_to_devices"], r["bytes_from_devices"] = to, back
        r["bytes_per_device"] = (to + back) / sampled if sampled else None
    later = rounds[1:] or rounds  # round 1 includes the devices' first start
    result = {
        "mode": args.mode,
        "devices": args.devices,
        "dp": args.dp,
        "secure_aggregation": "secagg" if args.secagg else None,
        "min_survivors": k_min if args.secagg else None,
        "mean_bytes_per_device_per_round": sum(r["bytes_per_device"] or 0 for r in rounds)
        / len(rounds),
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
    suffix = ("-secagg" if args.secagg else "") + (f"-{args.tag}" if args.tag else "")
    out = RESULTS / f"deployment-{args.mode}-{args.devices}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""`fedrec simulate`: run the installed simulation ServerApp/ClientApp on Flower's simulation
engine.

The same code path as `flwr run . <federation>`: we write a tiny Flower app folder whose
components point at the installed `fedrec.simulations.server_app` / `.client_app`, start a private
`flower-superlink --simulation` on a free loopback port (own FLWR_HOME and RAY_TMPDIR), submit
the run with `flwr run`, follow its progress from the run folder's metrics.jsonl, read the
final status with `flwr ls` (`flwr run` exits 0 even when a run fails) and stop everything we
started: every process of the run carries the launch's token in its environment, and a
watchdog stops them if this process is killed (`fedrec.common.processes`). The run folder is
locked for the whole run (`fedrec.common.run_lock`).

Virtual SuperNodes are execution slots (about 1.3x the expected devices per round); the
ServerApp tells each slot which user's device to play. Flower's engine polls every registered
node every 0.1 s, so with one node per user a round would cost more with every registered
user; with slots it is flat (docs/results.md, "Scale").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedrec.common.console import ProgressMode
from fedrec.common.flower_launch import (
    final_status,
    flower_env,
    flwr_json,
    free_port,
    run_config_arg,
    wait_healthy,
    write_app,
)
from fedrec.common.plain_log import PlainLog
from fedrec.common.processes import run_env, stop_run_processes, watched_run
from fedrec.common.run_config import TRANSPORT_DEFAULTS, SimulationConfig
from fedrec.common.run_lock import RunLock

# The simulation's own ServerApp and ClientApp: execution slots that play many virtual devices
# per message (a deployment's apps, one device per SuperNode, are fedrec.server/client.app).
SERVER_APP = "fedrec.simulations.server_app:app"
CLIENT_APP = "fedrec.simulations.client_app:app"


def simulation_env(work: Path) -> dict[str, str]:
    return flower_env(
        work / "flwr-home",
        # Ray's socket paths must stay under 107 bytes: a short private folder, not one
        # below a possibly deep run folder.
        RAY_TMPDIR=tempfile.mkdtemp(prefix="fedrec-ray-", dir="/tmp"),
        RAY_DEDUP_LOGS="0",
        # One BLAS thread per process: the simulation process runs Flower's and Ray's threads
        # beside ours, and threaded OpenBLAS can stall when threads outnumber the cores.
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )


# Execution slots per CPU: Flower's engine runs one message per CPU at a time; a few messages
# per CPU let the fast ones fill in behind a slow one (devices that train take longer than
# idle ones). Each message has a fixed cost in Flower and every registered node is polled
# every 0.1 s, so more slots only add overhead (benchmarks/results/federated_tuning.json,
# "coverage_sweep": wall times before and after fewer slots).
SLOTS_PER_CPU = 4


def slots_for(config: SimulationConfig) -> int:
    cpus = os.cpu_count() or 1
    return max(2, min(math.ceil(config.clients_per_round * 1.3) + 2, SLOTS_PER_CPU * cpus))


# The simulation's state is the run folder, written atomically by the ServerApp: nothing of
# Flower's or Ray's needs a clean exit, and Ctrl-C should return within about a second.
STOP_GRACE_S = 0.5


def simulate(
    config: SimulationConfig,
    *,
    timeout: float = 3600,
    progress: ProgressMode | None = None,
    lock: RunLock | None = None,
) -> int:
    """Run the federation; returns 0 completed, 2 failed, 124 stopped/timed out. `progress`:
    how rounds are shown (default: `fedrec.common.console.progress()`). `lock` is the run
    folder's, when the caller holds it (else taken here; RunLocked if held)."""
    from fedrec.common import console

    out = Path(config.out).resolve()
    config = SimulationConfig(**{**config.__dict__, "out": out})
    with watched_run(out, "fedrec simulate", lock) as held:
        return _run_flower(config, held.token, timeout, progress or console.progress())


def _run_flower(
    config: SimulationConfig, token: str, timeout: float, progress: ProgressMode
) -> int:
    out = Path(config.out)
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    env = run_env(simulation_env(work), out, token)
    app_dir = write_app(
        work / "app",
        name="fedrec-simulation",
        generator="fedrec simulate",
        serverapp=SERVER_APP,
        clientapp=CLIENT_APP,
        config=SimulationConfig().to_flat() | TRANSPORT_DEFAULTS,
    )
    port = free_port()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    slots = slots_for(config)
    summary_before = _file_identity(out / "summary.json")  # a resumed run's earlier one
    log = PlainLog(out / "flower.log")
    link = log.popen(
        ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation"],
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", link, request_timeout=0.5, poll=0.2)
        flat = config.to_flat() | {"expected-nodes": slots, "run-token": token}
        submitted = flwr_json(
            env, "run", str(app_dir), "sim", "--run-config", run_config_arg(flat),
            "--federation-config", f"num-supernodes={slots} client-resources-num-cpus=1",
        )  # fmt: skip
        if not submitted.get("success"):
            print(f"error: flwr run failed: {submitted}", file=sys.stderr)
            return 2
        run_id = str(submitted["run-id"])
        logs = log.popen(["flwr", "log", run_id, "sim", "--stream"], env=env)
        status = _follow(config, logs, timeout, progress, summary_before)
        if status == "summarized":
            # The ServerApp wrote its report (its last act): Flower's shutdown of Ray and the
            # run's final status would only add seconds, and nothing of theirs is kept.
            return 0
        if status == "timeout":
            flwr_json(env, "stop", run_id, "sim")
        final = final_status(env, "sim", run_id, wait=60)
        if not final[0].endswith("completed"):
            print(
                f"error: run {run_id} ended {final[0]}: {final[1]} (log: {out / 'flower.log'})",
                file=sys.stderr,
            )
        return {"finished:completed": 0, "finished:stopped": 124}.get(final[0], 2)
    finally:
        stop_run_processes(token, STOP_GRACE_S)
        link.wait()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        log.close()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _follow(
    config: SimulationConfig,
    logs: subprocess.Popen,
    timeout: float,
    shown: ProgressMode,
    summary_before: tuple[int, int] | None,
) -> str:
    """Show the rounds of the run's metrics.jsonl as they come until the ServerApp writes a
    new summary.json ("summarized", atomically replaced: a new file) or the log stream ends
    ("ended"): a progress bar, or one line per round (`round_line`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    metrics = Path(config.out) / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=shown != "bar",
    ) as progress:
        task = progress.add_task("rounds", total=config.rounds, completed=seen, status="starting")
        while logs.poll() is None:
            if time.monotonic() > deadline:
                logs.kill()
                return "timeout"
            if metrics.exists():
                lines = metrics.read_text().split("\n")[:-1]  # a line still being written waits
                for line in lines[seen:]:
                    row = json.loads(line)
                    progress.update(task, completed=row["round"], status=describe_round(row))
                    if shown == "lines":
                        print(round_line(row, config.rounds), flush=True)
                seen = max(seen, len(lines))
            if _file_identity(Path(config.out) / "summary.json") != summary_before:
                return "summarized"
            time.sleep(0.5)
    return "ended"


def describe_round(row: dict, *, sampled: bool = False) -> str:
    """A round of metrics.jsonl in a few words; `sampled`: also how many devices were asked
    (left out of the progress bar's status, which a terminal of 80 columns already cuts)."""
    if row.get("discarded"):
        parts = [f"DISCARDED ({row['aggregated']} < K_min survivors)"]
    else:
        idle = row.get("noise_only", 0)  # declined devices that still sent their noise
        trained = f"trained {row['aggregated'] - idle}"
        if sampled and "sampled" in row:
            trained += f" of {row['sampled']} sampled"
        parts = [trained, f"declined {row['declined']}"]
    if row.get("failed"):
        parts.append(f"failed {row['failed']}")
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.3f}")
    if row.get("preq_ndcg@10") is not None:
        parts.append(f"preq NDCG@10 {row['preq_ndcg@10']:.3f}")
    if row.get("max_interaction_epsilon_sampled") is not None:
        parts.append(f"ε/interaction {row['max_interaction_epsilon_sampled']:.2f}")
    elif row.get("max_interaction_epsilon_sampled_at_most") is not None:
        parts.append(f"ε/interaction ≤ {row['max_interaction_epsilon_sampled_at_most']:.2f}")
    if row.get("user_epsilon") is not None:
        parts.append(f"ε/user {row['user_epsilon']:.2f}")
    return "  ".join(parts)


def round_line(row: dict, rounds: int) -> str:
    """One complete line for a round of metrics.jsonl, for output that is not a terminal."""
    line = f"round {row['round']}/{rounds}: {describe_round(row, sampled=True)}"
    if row.get("seconds") is not None:
        line += f"  {row['seconds']:.1f} s"
    return line

"""Cost of one SecAgg+ round with the distributed discrete Gaussian, per device, in one process.

    python benchmarks/secagg_cost.py [--devices 100 300 1000] [--rows 6798] [--idle 0.8]
        [--baseline REF] [--profile FILE] [--out benchmarks/results/secagg-cost.json]

Times `fedrec.simulations.secagg_devices.secagg_round`, the in-process transport's secure sum
(both SecAgg+ instances: keys, shares, DDG encodings, masks, unmasking, decoding), on replies
built here: no training, so what is measured is what "secagg" adds to a round. The update has
the default model's shape (`item_table` of `--rows` rows x 2, `year_table` 27 x 65; 6,798 rows:
the built-in data's 15,351 coordinates, 16,384 padded); `--idle` of the devices are idle (noise
only). CPU time of this process (`time.process_time`), so that other work on a shared machine
does not bill it. `--baseline REF` also measures the code of git revision REF (exported to a
temporary folder and imported in its own process), alternating with the working tree's, for a
before/after ratio from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "server", "client", "simulations")

# Run in a child process: load fedrec.* from TREE (a git export) instead of the installed one.
_SHIM = """
import importlib.util, sys
import fedrec
tree = sys.argv[1]
for name in {packages!r}:
    spec = importlib.util.spec_from_file_location(
        "fedrec." + name, f"{{tree}}/{{name}}/__init__.py",
        submodule_search_locations=[f"{{tree}}/{{name}}"],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fedrec." + name] = module
    spec.loader.exec_module(module)
sys.argv = sys.argv[2:]
sys.path.insert(0, {bench!r})
import secagg_cost
secagg_cost.measure_main()
"""


def one_round(devices: int, rows: int, idle: float, seed: int, profile: str | None) -> dict:
    """CPU seconds of one secure round of `devices` devices (in this process)."""
    import time

    import numpy as np
    import torch

    from fedrec.common.replies import DeviceReply
    from fedrec.common.run_config import SimulationConfig
    from fedrec.simulations.secagg_devices import secagg_round

    torch.set_num_threads(1)
    config = SimulationConfig.from_flat(
        {
            "secure-aggregation-protocol": "secagg",
            "clients-per-round": devices,
            # the default job's ratio of K_min to devices per round (2,349 / 2,700)
            "min-survivors": max(2, int(devices * 2349 / 2700)),
            "reproducible-noise": True,
            "seed": seed,
        }
    )
    rng = np.random.default_rng(seed)
    received = {
        "item_table.weight": rng.normal(0, 0.1, (rows, 2)).astype(np.float32),
        "year_table.weight": rng.normal(0, 0.1, (27, 65)).astype(np.float32),
    }
    dim = sum(v.size for v in received.values())
    ddg = config.ddg_params(dim)
    busy = devices - round(idle * devices)
    replies = []
    for user in range(devices):
        if user < busy:  # a DP-SGD step's change: a few rows, within the clip
            change = {k: np.zeros_like(v) for k, v in received.items()}
            change["item_table.weight"][rng.integers(0, rows, 12)] = 0.01
            scale = min(
                1.0, 0.9 * ddg.clip_norm / np.sqrt(sum((c**2).sum() for c in change.values()))
            )
            params = {k: received[k] + scale * change[k] for k in received}
            metrics = {"examples": 12.0, "loss": 0.5, "max_interaction_epsilon": 1.0}
            replies.append(DeviceReply(user, params, 12, metrics, ledger_head="h"))
        else:
            metrics = {"noise_only": 1.0, "max_interaction_epsilon": 1.0}
            replies.append(DeviceReply(user, None, 0, metrics, ledger_head="h"))
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.process_time()
    out = secagg_round(config, replies, 1, received)
    seconds = time.process_time() - start
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    pooled = [r for r in out if r.pooled]
    assert pooled and pooled[0].pooled == devices, "the round did not unmask"
    return {
        "devices": devices,
        "busy": busy,
        "dim": dim,
        "padded_dim": ddg.padded_dim,
        "bits": ddg.bits,
        "cpu_s": seconds,
        "cpu_s_per_device": seconds / devices,
    }


def measure_main() -> None:
    """Child entry: one measurement, printed as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("devices", type=int)
    parser.add_argument("rows", type=int)
    parser.add_argument("idle", type=float)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()
    print(json.dumps(one_round(args.devices, args.rows, args.idle, 0, args.profile)))


def measure(tree: Path | None, devices: int, rows: int, idle: float, profile=None) -> dict:
    env = dict(os.environ, FEDREC_CACHE_DIR=tempfile.mkdtemp())
    tail = [str(devices), str(rows), str(idle)] + (["--profile", profile] if profile else [])
    if tree is None:
        cmd = [sys.executable, "-c", _child_plain(), *tail]
    else:
        shim = _SHIM.format(packages=PACKAGES, bench=str(ROOT / "benchmarks"))
        cmd = [sys.executable, "-c", shim, str(tree), "secagg_cost", *tail]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_plain() -> str:
    return (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
        "sys.argv = ['secagg_cost', *sys.argv[1:]]; "
        "import secagg_cost; secagg_cost.measure_main()"
    )


def export(ref: str) -> Path:
    """The packages of git revision `ref`, in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="secagg-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, *PACKAGES], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--rows", type=int, nargs="+", default=[6798])
    parser.add_argument("--idle", type=float, default=0.8)
    parser.add_argument("--baseline", default=None, help="git revision to compare with")
    parser.add_argument("--baseline-max-devices", type=int, default=10**9)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", default=None, help="cProfile dump of the first run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    baseline = export(args.baseline) if args.baseline else None
    runs = []
    for rows in args.rows:
        for devices in args.devices:
            for repeat in range(args.repeats):
                variants = [("current", None)]
                if baseline is not None and devices <= args.baseline_max_devices:
                    variants.append((args.baseline, baseline))
                for label, tree in variants:
                    profile = args.profile if not runs else None
                    row = {"code": label, "repeat": repeat}
                    row |= measure(tree, devices, rows, args.idle, profile)
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    result = {
        "what": "CPU seconds of one in-process SecAgg+ round (secagg_round), per device",
        "idle_fraction": args.idle,
        "runs": runs,
    }
    if baseline is not None:
        ratios = []
        for row in runs:
            if row["code"] != "current":
                mine = [
                    r
                    for r in runs
                    if r["code"] == "current"
                    and (r["devices"], r["dim"], r["repeat"])
                    == (row["devices"], row["dim"], row["repeat"])
                ]
                ratios.append(
                    {
                        "devices": row["devices"],
                        "dim": row["dim"],
                        "before_s_per_device": row["cpu_s_per_device"],
                        "after_s_per_device": mine[0]["cpu_s_per_device"],
                        "speedup": row["cpu_s_per_device"] / mine[0]["cpu_s_per_device"],
                    }
                )
        result["before_after"] = ratios
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Quality of the distributed discrete Gaussian (SecAgg+) against the continuous Gaussian at the
same per-interaction ε, on the built-in data (issue target: within 2% test NDCG@10).

    python benchmarks/secagg_quality.py [--rounds 30] [--seed 0] [--reproducible-noise]
        [--out benchmarks/results/secagg-quality.json]

Two in-process runs (`run_in_process`, `finalize`) with identical settings (the default job's,
`--rounds` windows of the timeline): secure-aggregation-protocol "clear" (the simulated sum of
the devices' continuous Gaussian shares) and "secagg" (SecAgg+ over their DDG encodings, σ
calibrated so that a round costs the continuous round's ε). With `--reproducible-noise` both
draw their noise from the seed (deterministic numbers, no privacy guarantee: a benchmark only).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def one_run(protocol: str, rounds: int, seed: int, reproducible: bool, out: Path) -> dict:
    from fedrec.common.run_config import SimulationConfig
    from fedrec.simulations.devices import run_in_process
    from fedrec.simulations.report import finalize

    config = SimulationConfig.from_flat(
        {
            "secure-aggregation-protocol": protocol,
            "rounds": rounds,
            "seed": seed,
            "reproducible-noise": reproducible,
            "out": str(out),
        }
    )
    start, cpu = time.perf_counter(), time.process_time()
    summary = finalize(run_in_process(config))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "protocol": protocol,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "round_seconds": [r.get("seconds") for r in rows],
        "published_rounds": summary["published_rounds"],
        "ndcg@10": summary["test"]["ndcg@10"],
        "hr@10": summary["test"]["hr@10"],
        "guarantees": {g["name"]: g["epsilon"] for g in summary["privacy"]["guarantees"]},
        "guarantees_not_held": [
            g["name"] for g in summary["privacy"]["guarantees"] if not g.get("earned")
        ],
        "prequential_ndcg@10": [r["ndcg@10"] for r in summary["prequential"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reproducible-noise", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="secagg-quality-"))
    runs = []
    for protocol in ("clear", "secagg"):
        runs.append(
            one_run(protocol, args.rounds, args.seed, args.reproducible_noise, tmp / protocol)
        )
        print(json.dumps(runs[-1]), flush=True)
    clear, secagg = runs
    result = {
        "what": (
            "test NDCG@10 of the default job's settings (built-in data, user+distributed) with "
            "the continuous Gaussian (clear simulated sum) and the distributed discrete "
            "Gaussian under SecAgg+, same per-interaction ε, in-process, one run each"
        ),
        "rounds": args.rounds,
        "seed": args.seed,
        "reproducible_noise": args.reproducible_noise,
        "runs": runs,
        "ndcg_relative_difference": (secagg["ndcg@10"] - clear["ndcg@10"]) / clear["ndcg@10"],
        "mean_round_seconds": {
            r["protocol"]: float(np.mean([s for s in r["round_seconds"] if s is not None]))
            for r in runs
        },
    }
    print(json.dumps({k: result[k] for k in ("ndcg_relative_difference", "mean_round_seconds")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

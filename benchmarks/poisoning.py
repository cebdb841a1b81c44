"""Targeted promotion against fedrec, with and without its defences, on the built-in data.

    python benchmarks/poisoning.py [--rounds 30] [--evaluate-on validation|test] [--only NAME]

Each arm is one `fedrec simulate --in-process` run (`--reproducible-noise`, so the arms face
the same DP noise and sampling and differ only by the attack and the defence; that voids the
privacy guarantee, which this benchmark does not measure) under the default calibration
(user+distributed: the server sees only the secure sum of clipped, noised updates), unless
the arm says otherwise. The attack is the shipped scenario promote-5 (5% of the devices
promote two items: a brand-new-like one, the least interacted-with, and the next). Reported
per arm: the targets' ER@10 over the benign users, benign NDCG@10, the refused and damped
counts, and wall time. Defence settings are chosen with `--evaluate-on validation` (the
test is then never read); the final table runs on the test. Writes
benchmarks/results/poisoning[-validation].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (extra options, what it shows)
ARMS: dict[str, tuple[list[str], str]] = {
    "clean": ([], "no attack, no defence: the targets' ER@10 to compare with"),
    "clean+damping": (
        ["--bias-anomaly", "3"],
        "no attack, bias jump damping on: its price in quality",
    ),
    "clean+cap": (["--bias-change-cap", "1"], "no attack, bias change cap on: its price"),
    "attacked": (["--scenario", "promote-5"], "5% promoting devices, defences off"),
    "attacked+damping": (
        ["--scenario", "promote-5", "--bias-anomaly", "3"],
        "bias jump damping (k = 3 robust standard deviations)",
    ),
    "attacked+cap": (
        ["--scenario", "promote-5", "--bias-change-cap", "1"],
        "per-round cap of 1 on any item's served-bias change",
    ),
    "attacked+damping+cap": (
        ["--scenario", "promote-5", "--bias-anomaly", "3", "--bias-change-cap", "1"],
        "both",
    ),
}


def run_arm(
    name: str, extra: list[str], rounds: int, clients: int, evaluate_on: str, folder: Path
) -> dict:
    out = folder / name
    cmd = [
        sys.executable, "-m", "fedrec.cli", "simulate", "--in-process", "--reproducible-noise",
        "--rounds", str(rounds), "--clients-per-round", str(clients), "--evaluate-on", evaluate_on, "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    robust = summary["robustness"]
    return {
        "options": extra,
        "seconds": round(seconds, 1),
        "target_er@10": robust["target_er@10"],
        "benign_ndcg@10": robust["benign_ndcg@10"],
        "ndcg@10": summary[evaluate_on]["ndcg@10"],
        "malicious_devices": robust["malicious_devices"],
        "targets": robust["targets"],
        "dropped_by_kind": robust["dropped_by_kind"],
        "bias_flagged": robust["bias_flagged"],
        "bias_capped": robust["bias_capped"],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("target_er@10", "benign_ndcg@10"), strict=True):
        ax.barh(
            names, [results[n][key] for n in names], color="tab:red" if "er" in key else "tab:blue"
        )
        ax.set_xlabel(key)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle("5% promoting devices, default calibration (user+distributed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients-per-round", type=int, default=2700)
    parser.add_argument("--evaluate-on", default="test", choices=("test", "validation"))
    parser.add_argument("--only", action="append", help="run only these arms")
    args = parser.parse_args()
    suffix = "" if args.evaluate_on == "test" else f"-{args.evaluate_on}"
    path = RESULTS / f"poisoning{suffix}.json"
    previous = json.loads(path.read_text())["arms"] if path.exists() else {}
    results = dict(previous)
    with tempfile.TemporaryDirectory(prefix="poisoning-") as tmp:
        for name, (extra, _) in ARMS.items():
            if args.only and name not in args.only:
                continue
            results[name] = run_arm(
                name, extra, args.rounds, args.clients_per_round, args.evaluate_on, Path(tmp)
            )
            results[name]["what"] = ARMS[name][1]
            print(
                name,
                json.dumps(
                    {k: results[name][k] for k in ("target_er@10", "benign_ndcg@10", "seconds")}
                ),
                flush=True,
            )
            write(path, args, results)
    plot(results, path.with_suffix(".png"))


def write(path: Path, args: argparse.Namespace, results: dict) -> None:
    clean = results.get("clean")
    targets = {}
    if clean:
        for name, arm in results.items():
            targets[name] = {
                "er_vs_clean": arm["target_er@10"] / clean["target_er@10"]
                if clean["target_er@10"]
                else None,
                "ndcg_drop_relative": 1 - arm["benign_ndcg@10"] / clean["benign_ndcg@10"],
            }
    payload = {
        "what": __doc__.split("\n\n")[0].strip(),
        "data": "built-in (MovieTweetings-like), default settings of fedrec simulate",
        "rounds": args.rounds,
        "clients_per_round": args.clients_per_round,
        "evaluated_on": args.evaluate_on,
        "issue_targets": "defended ER@10 <= 2x clean; benign NDCG@10 drop <= 5% relative",
        "arms": results,
        "against_clean": targets,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

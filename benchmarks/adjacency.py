"""What single-interaction DP-SGD examples cost in quality (issue 15, item 1).

Compares run folders of the same commands on the code before and after the change, same seed:

    fedrec simulate --in-process --out SIM          # the default job
    fedrec train --epsilon 8 --out TRAIN --protocol loo
    python benchmarks/adjacency.py --before SIM_OLD TRAIN_OLD --after SIM_NEW TRAIN_NEW \
        --commits OLD NEW

Writes benchmarks/results/adjacency.json: test NDCG@10 / HR@10, prequential NDCG@10 and HR@10
(mean of the last 10 rounds, and per round), trained device rounds. A folder whose run has not
finished (no summary.json) is reported with the rounds it has.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COMMANDS = {
    "simulate": "fedrec simulate --in-process --out DIR (defaults: dp user+distributed, seed 0)",
    "train": "fedrec train --epsilon 8 --out DIR --protocol loo",
}


def simulation_figures(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    figures = {
        "rounds_done": len(rows),
        "prequential_ndcg@10_per_round": [r["preq_ndcg@10"] for r in rows],
        "trained_device_rounds": sum(r["sampled"] - r["declined"] for r in rows),
    }
    if not (folder / "summary.json").exists():
        return figures | {"unfinished": True}
    summary = json.loads((folder / "summary.json").read_text())
    last = summary["prequential"][-10:]
    return figures | {
        "test_ndcg@10": summary["test"]["ndcg@10"],
        "test_hr@10": summary["test"]["hr@10"],
        "prequential_ndcg@10_last10_mean": statistics.mean(r["ndcg@10"] for r in last),
        "prequential_hr@10_last10_mean": statistics.mean(r["hr@10"] for r in last),
        "guarantees_stated": [
            g["name"] for g in summary["privacy"]["guarantees"] if g.get("earned", True)
        ],
    }


def train_figures(folder: Path) -> dict:
    if not (folder / "summary.json").exists():
        return {"unfinished": True}
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "test_ndcg@10": summary["test"]["ndcg@10"],
        "test_hr@10": summary["test"]["hr@10"],
        "epsilon": summary.get("epsilon"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs=2, type=Path, required=True, metavar=("SIM", "TRAIN"))
    parser.add_argument("--after", nargs=2, type=Path, required=True, metavar=("SIM", "TRAIN"))
    parser.add_argument("--commits", nargs=2, default=["", ""], metavar=("OLD", "NEW"))
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adjacency.json"))
    args = parser.parse_args()
    result: dict = {"commands": COMMANDS, "note": args.note}
    for name, (sim, train), commit in zip(
        ("before", "after"), (args.before, args.after), args.commits, strict=True
    ):
        result[name] = {
            "commit": commit,
            "simulate": simulation_figures(sim),
            "train": train_figures(train),
        }
    before, after = result["before"], result["after"]
    matched = min(before["simulate"]["rounds_done"], after["simulate"]["rounds_done"])
    result["prequential_ndcg@10_mean_of_rounds_both_ran"] = {
        "rounds": matched,
        **{
            name: statistics.mean(run["simulate"]["prequential_ndcg@10_per_round"][:matched])
            for name, run in (("before", before), ("after", after))
        },
    }
    cost = {}
    for key, part, metric in (
        ("simulate_test_ndcg@10", "simulate", "test_ndcg@10"),
        ("simulate_prequential_ndcg@10_last10", "simulate", "prequential_ndcg@10_last10_mean"),
        ("train_test_ndcg@10", "train", "test_ndcg@10"),
    ):
        if metric in before[part] and metric in after[part]:
            cost[key] = after[part][metric] - before[part][metric]
    result["after_minus_before"] = cost
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("after_minus_before",)}, indent=2))


if __name__ == "__main__":
    main()

"""Independent peers side by side: Cornac's MostPop, BPR and EASE (and, on synthetic data, the
generator's own oracle) ranked on exactly fedrec's split and metric, beside fedrec's
centralized model and its federated runs.

    pip install cornac
    python benchmarks/peers.py [--dataset builtin|synthetic|movielens|csv] [--data-dir DIR]
        [--columns ...] [--items-file F] [--synthetic k=v,...] [--fedrec] [--out DIR]

Protocol: leave-last-out (`fedrec.common.protocols`). Peers train on what a run's devices hold
(the stream's known rows: implicit feedback, repeats collapsed); each setting of their grid is
scored on the validation shift (the validation row held out, trained on the rows before it)
and the best is retrained on all known rows and ranked on the test once: full ranking over the
catalogue minus the user's known items, the tie rule and metrics of `fedrec.common.evaluation`
(NDCG@10, HR@10, coverage@10, the cold-start and fairness segments). Items a peer never saw
score -inf (Cornac cannot rank them). `fedrec data --export-split` writes the same split as
CSV for any other library.

`--fedrec` adds fedrec's own rows on the same data: `fedrec train --protocol loo`
(centralized, no DP), `fedrec simulate --dp off` and the default `fedrec simulate` (DP).
Writes OUT/peers-<dataset>.json and OUT/peers-<dataset>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedrec.cli.options import data_config
from fedrec.common.data.stream import Stream, build_stream
from fedrec.common.evaluation import evaluate
from fedrec.common.reference import baseline_metrics
from fedrec.common.train import history_before_test

# a synthetic population with strong, stable personal tastes and a mild popularity skew: a
# model that personalizes must beat popularity here, by a margin the oracle bounds
PERSONAL_SYNTHETIC = (
    "num_users=2000,num_items=600,num_topics=12,topic_concentration=0.1,"
    "popularity_exponent=0.5,mean_interactions_per_user=20,new_item_fraction=0.1,seed=0"
)
GRIDS = {
    "MostPop": [{}],
    "BPR": [
        {"k": k, "learning_rate": lr, "lambda_reg": reg, "max_iter": 200}
        for k in (32, 64)
        for lr in (0.01, 0.05)
        for reg in (0.001, 0.01)
    ],
    "EASE": [{"lamb": lamb} for lamb in (50.0, 200.0, 500.0, 1000.0, 3000.0, 10000.0)],
}
CLI = [sys.executable, "-m", "fedrec.cli"]
SHOWN = ("ndcg@10", "hr@10", "coverage@10", "ndcg@10/new_items", "ndcg@10/light_users",
         "exposure@10/head")  # fmt: skip


def cornac_scorer(name: str, params: dict, stream: Stream, seed: int = 0):
    """Fit Cornac's `name` on the stream's known rows; the scorer fedrec's evaluation calls."""
    import cornac

    rows = stream.rows
    triples = list(
        zip(rows.user.astype(str), rows.item.astype(str), [1.0] * len(rows), strict=True)
    )
    train = cornac.data.Dataset.from_uir(triples, seed=seed)
    model_class = getattr(cornac.models, name)
    model = model_class() if name == "MostPop" else model_class(**params, seed=seed, verbose=False)
    model.fit(train)
    num_items = stream.dataset.num_items
    columns = np.array([int(i) for i in train.item_ids], dtype=np.int64)  # cornac idx -> ours

    def scorer(users: np.ndarray) -> np.ndarray:
        out = np.full((len(users), num_items), -np.inf, dtype=np.float32)
        for row, user in enumerate(users):
            index = train.uid_map.get(str(int(user)))
            if index is not None:
                out[row, columns] = np.asarray(model.score(index), dtype=np.float32)
        return out

    return scorer


def ranked(scorer, stream: Stream) -> dict:
    split = stream.split
    history = history_before_test(split, stream.dataset.num_users)
    return evaluate(
        scorer, test=split.test, history=history, num_items=stream.dataset.num_items,
        sampled_negatives=0,
    )  # fmt: skip


def tuned_peer(name: str, test_stream: Stream, valid_stream: Stream) -> dict:
    """The grid scored on validation; the best setting retrained and tested once."""
    trials = []
    for params in GRIDS[name]:
        start = time.perf_counter()
        metrics = ranked(cornac_scorer(name, params, valid_stream), valid_stream)
        trials.append(
            {"params": params, "valid_ndcg@10": metrics["ndcg@10"],
             "seconds": time.perf_counter() - start}
        )  # fmt: skip
        print(f"  {name} {params}: valid NDCG@10 {metrics['ndcg@10']:.4f}", flush=True)
    best = max(trials, key=lambda t: t["valid_ndcg@10"])
    start = time.perf_counter()
    test = ranked(cornac_scorer(name, best["params"], test_stream), test_stream)
    return {"test": test, "chosen": best["params"], "grid": trials,
            "fit_and_rank_s": time.perf_counter() - start}  # fmt: skip


def oracle_scorer(stream: Stream, spec: dict[str, str]):
    """The generator's p(item | user, test time): the best any model of the data can rank."""
    from fedrec.common.config import _typed
    from fedrec.common.data.synthetic import (
        SyntheticConfig,
        _drift_weight,
        generate_synthetic_with_truth,
    )

    cfg = _typed(SyntheticConfig, spec)
    _, truth = generate_synthetic_with_truth(cfg)
    when = np.zeros(stream.dataset.num_users, dtype=np.int64)
    when[stream.split.test.user] = stream.split.test.timestamp

    def scorer(users: np.ndarray) -> np.ndarray:
        t = when[users]
        frac = (t - truth.start) / (truth.end - truth.start)
        w = _drift_weight(cfg, frac)[:, None]
        theta = (1 - w) * truth.user_topics_before[users] + w * truth.user_topics_after[users]
        arrived = truth.item_arrival[None, :] <= t[:, None]  # (B, I)
        weight = np.where(arrived, truth.item_popularity[None, :], 0.0)
        topic_mass = np.zeros((len(users), len(truth.topic_names)))
        for k in range(len(truth.topic_names)):
            topic_mass[:, k] = weight[:, truth.item_topic == k].sum(axis=1)
        p = (
            theta[:, truth.item_topic]
            * weight
            / np.maximum(topic_mass[:, truth.item_topic], 1e-300)
        )
        return p.astype(np.float32)

    return scorer


def fedrec_rows(data_flags: list[str], work: Path) -> dict[str, dict]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "FLWR_TELEMETRY_ENABLED": "0"}  # fmt: skip
    runs = {
        "fedrec centralized, no DP": ["train", "--protocol", "loo"],
        "fedrec federated, no DP (--dp off)": ["simulate", "--dp", "off"],
        "fedrec federated, DP (default)": ["simulate"],
    }
    out = {}
    for label, command in runs.items():
        folder = work / label.split(",")[0].replace(" ", "-") / str(len(out))
        start = time.perf_counter()
        proc = subprocess.run([*CLI, *command, *data_flags, "--out", str(folder)], env=env,
                              capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            out[label] = {"error": proc.stderr[-2000:], "seconds": seconds}
            print(f"  {label}: failed ({proc.returncode})", flush=True)
            continue
        summary = json.loads((folder / "summary.json").read_text())
        row = {"test": summary["test"], "seconds": seconds}
        guarantees = summary.get("privacy", {}).get("guarantees")
        if guarantees:
            row["guarantees"] = guarantees
        out[label] = row
        print(f"  {label}: test NDCG@10 {summary['test']['ndcg@10']:.4f} ({seconds:.0f} s)")
    return out


def table(name: str, rows: dict[str, dict]) -> str:
    lines = [f"Dataset: {name} (leave-last-out, full ranking, test reported once)", "",
             "| method | " + " | ".join(SHOWN) + " | chosen on validation |",
             "|---|" + "---:|" * len(SHOWN) + "---|"]  # fmt: skip
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | failed |" + " |" * len(SHOWN))
            continue
        cells = [f"{row['test'].get(k, math.nan):.4f}" for k in SHOWN]
        chosen = json.dumps(row["chosen"]) if row.get("chosen") else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--columns")
    parser.add_argument("--items-file", type=Path)
    parser.add_argument(
        "--synthetic", help=f"k=v,... (default for synthetic: {PERSONAL_SYNTHETIC})"
    )
    parser.add_argument("--fedrec", action="store_true", help="also run fedrec's own rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    synthetic = args.synthetic or (PERSONAL_SYNTHETIC if args.dataset == "synthetic" else None)
    data = data_config(args.dataset, args.data_dir, args.columns, args.items_file, synthetic, None)
    dataset = data.load()
    test_stream = build_stream(dataset, 1, "loo")
    valid_stream = build_stream(dataset, 1, "loo:validation")
    print(f"{dataset.name}: {len(test_stream.rows):,} known rows, "
          f"{len(test_stream.split.test):,} test rows", flush=True)  # fmt: skip

    rows: dict[str, dict] = {}
    if args.dataset == "synthetic":
        rows["oracle: the generator's p(item; user, time)"] = {
            "test": ranked(oracle_scorer(test_stream, data.synthetic), test_stream)
        }
    baselines = baseline_metrics(test_stream.split, dataset.num_users, dataset.num_items)
    rows["fedrec yardstick: popularity"] = {"test": baselines["popularity"]}
    rows["fedrec yardstick: recent popularity"] = {"test": baselines["recent_popularity"]}
    for name in GRIDS:
        print(f"Cornac {name}", flush=True)
        rows[f"Cornac {name}"] = tuned_peer(name, test_stream, valid_stream)
    if args.fedrec:
        flags = ["--dataset", args.dataset]
        for flag, value in (("--data-dir", args.data_dir), ("--columns", args.columns),
                            ("--items-file", args.items_file), ("--synthetic", synthetic)):  # fmt: skip
            if value is not None:
                flags += [flag, str(value)]
        with tempfile.TemporaryDirectory() as work:
            rows |= fedrec_rows(flags, Path(work))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"peers-{args.dataset}"
    import cornac

    result = {
        "command": " ".join(["python", *sys.argv]),
        "dataset": dataset.name,
        "synthetic": synthetic,
        "cornac": cornac.__version__,
        "known_rows": len(test_stream.rows),
        "test_rows": len(test_stream.split.test),
        "rows": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float))
    stem.with_suffix(".md").write_text(table(dataset.name, rows))
    print(table(dataset.name, rows))


if __name__ == "__main__":
    main()

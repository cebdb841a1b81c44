"""Centralized reference benchmark: one table of baselines vs the model, without and with DP.

Protocol (a): implicit feedback, users with >= 5 interactions, per-user time-ordered
leave-last-out, full ranking over the catalogue minus the user's training items.
Protocol (b): global temporal split at the 90% time quantile, each user's first interaction
after it, users with >= 1 training interaction.

    python benchmarks/centralized.py                       # built-in MovieTweetings 40K
    python benchmarks/centralized.py --movielens DIR       # a MovieLens release you supply
    python benchmarks/centralized.py --epsilon 8 --out benchmarks/results

Writes OUT/centralized.json (every figure) and OUT/centralized.md (the table).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedrec.common.config import DataConfig
from fedrec.common.protocols import ProtocolConfig
from fedrec.common.reference import run_reference
from fedrec.common.train import DPConfig, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--movielens", type=Path, help="a MovieLens directory instead of the built-in data"
    )
    parser.add_argument("--epsilon", type=float, default=8.0, help="ε of the DP row (δ = 1e-5)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    data = DataConfig("movielens", str(args.movielens)) if args.movielens else DataConfig()
    protocols = [ProtocolConfig("loo"), ProtocolConfig("temporal")]
    config = TrainConfig(epochs=args.epochs)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["plain"] = run_reference(data, protocols, config, None, Path(tmp) / "plain")
        dp = DPConfig(epsilon=args.epsilon)
        runs["dp"] = run_reference(data, protocols, config, dp, Path(tmp) / "dp")

    rows = []
    for protocol in ("loo", "temporal"):
        plain, private = runs["plain"]["protocols"][protocol], runs["dp"]["protocols"][protocol]
        for name, metrics in plain["baselines"].items():
            rows.append((protocol, name.replace("_", " "), metrics, None, None))
        rows.append((protocol, "model, no DP", plain["test"], plain["train_seconds"], None))
        label = f"model, DP-SGD ε={args.epsilon:g}"
        rows.append(
            (protocol, label, private["test"], private["train_seconds"], private["epsilon"])
        )

    header = "| protocol | method | HR@10 | NDCG@10 | sampled HR@10 | train s | ε spent |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for protocol, name, m, seconds, eps in rows:
        lines.append(
            f"| {protocol} | {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | "
            f"{m['sampled_hr@10']:.4f} | {'' if seconds is None else f'{seconds:.0f}'} | "
            f"{'' if eps is None else f'{eps:.2f}'} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = runs["plain"]["dataset"]["name"]
    (args.out / "centralized.md").write_text(f"Dataset: {name}\n\n{table}\n")
    payload = {
        "dataset": name,
        "rows": [
            {"protocol": p, "method": n, "test": m, "train_seconds": s, "epsilon": e}
            for p, n, m, s, e in rows
        ],
        "runs": runs,
    }
    (args.out / "centralized.json").write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()

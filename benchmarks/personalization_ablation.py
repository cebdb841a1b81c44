"""Cheap designs that add a personal part to the centralized model, on VALIDATION data only.

Each variant changes one ModelConfig field of `fedrec train`'s model (the federated defaults are
untouched) and trains with early stopping on validation NDCG@10; the row reports that best
epoch's validation NDCG@10 and coverage@10 (share of the catalogue in some top-10 list).

    python benchmarks/personalization_ablation.py            # built-in data, protocol loo

Writes OUT/personalization-ablation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from fedrec.common.config import DataConfig
from fedrec.common.model import ModelConfig
from fedrec.common.protocols import ProtocolConfig, make_split
from fedrec.common.text import item_text_features
from fedrec.common.train import TrainConfig, train_centralized

VARIANTS: dict[str, dict] = {
    "default": {},
    # the user vector averages more of the history (inference weight 2^(-k/h))
    "history_half_life=10": {"history_half_life": 10.0},
    # the user vector is the last item alone: item-item signal from the most recent interaction
    "history_half_life=0.5": {"history_half_life": 0.5},
    # a learned per-user vector on top of the history mean
    "user_embedding": {"user_embedding": True},
    # popularity's share of the score halved
    "bias_scale=0.5": {"bias_scale": 0.5},
    "user_embedding+history_half_life=0.5+bias_scale=0.5": {
        "user_embedding": True,
        "history_half_life": 0.5,
        "bias_scale": 0.5,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    data = DataConfig()
    dataset = data.load()
    text = item_text_features(dataset.catalogue, data.text_encoder)
    split = make_split(dataset.interactions, ProtocolConfig("loo"))
    rows = []
    for name in args.variants:
        config = TrainConfig(num_negatives=1000, model=ModelConfig(**VARIANTS[name]))
        start = time.perf_counter()
        result = train_centralized(
            split,
            num_users=dataset.num_users,
            text_features=text,
            years=dataset.catalogue.years,
            config=config,
        )
        best = result.history[result.best_epoch - 1]
        rows.append(
            {
                "variant": name,
                "model": dataclasses.asdict(config.model),
                "best_epoch": result.best_epoch,
                "valid_ndcg@10": best["valid_ndcg@10"],
                "valid_hr@10": best["valid_hr@10"],
                "valid_coverage@10": best["valid_coverage@10"],
                "seconds": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1] | {"model": None}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "dataset": dataset.name,
        "protocol": "loo (validation split: each user's second-to-last interaction)",
        "train": "TrainConfig(num_negatives=1000), batch 256, lr 0.001, early stopping",
        "variants": rows,
    }
    (args.out / "personalization-ablation.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

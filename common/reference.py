"""The centralized reference run behind `fedrec train`: data -> split -> train -> test -> files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fedrec.common.baselines import popularity_scorer, recent_popularity_scorer
from fedrec.common.config import DataConfig
from fedrec.common.evaluation import evaluate
from fedrec.common.io import atomic_write_json
from fedrec.common.protocols import ProtocolConfig, make_split
from fedrec.common.text import item_text_features
from fedrec.common.train import (
    DPConfig,
    TrainConfig,
    evaluate_model,
    history_before_test,
    train_centralized,
)


def baseline_metrics(split, num_users: int, num_items: int) -> dict[str, dict[str, float]]:
    """Popularity and recent popularity (last 10% of training time) under the same protocol."""
    history = history_before_test(split, num_users)
    train = split.before_test()
    return {
        "popularity": evaluate(
            popularity_scorer(train, num_items),
            test=split.test,
            history=history,
            num_items=num_items,
        ),
        "recent_popularity": evaluate(
            recent_popularity_scorer(train, num_items, fraction=0.1),
            test=split.test,
            history=history,
            num_items=num_items,
        ),
    }


def run_reference(
    data: DataConfig,
    protocols: list[ProtocolConfig],
    config: TrainConfig,
    dp: DPConfig | None,
    out: Path,
) -> dict:
    """Train one model per protocol; write summary.json, epochs.jsonl, model-<protocol>.pt
    for each protocol, validation.png."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrec.common import console

    shown = console.progress()
    out.mkdir(parents=True, exist_ok=True)
    dataset = data.load()
    text = item_text_features(dataset.catalogue, data.text_encoder)
    results: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=shown != "bar",
    ) as progress:
        for protocol in protocols:
            split = make_split(dataset.interactions, protocol)
            task = progress.add_task(protocol.name, total=config.epochs, status="")

            def on_epoch(epoch: int, row: dict, task=task, name=protocol.name) -> None:
                status = f"loss {row['loss']:.3f}"
                if "valid_ndcg@10" in row:
                    status += f"  valid NDCG@10 {row['valid_ndcg@10']:.4f}"
                if "epsilon" in row:
                    status += f"  ε {row['epsilon']:.2f}"
                progress.update(task, completed=epoch, status=status)
                if shown == "lines":
                    print(f"{name} epoch {epoch}/{config.epochs}: {status}", flush=True)

            result = train_centralized(
                split,
                num_users=dataset.num_users,
                text_features=text,
                years=dataset.catalogue.years,
                config=config,
                dp=dp,
                on_epoch=on_epoch,
            )
            progress.update(task, total=len(result.history))
            test = evaluate_model(result.model, split, dataset.num_users, seed=config.seed)
            results[protocol.name] = {
                "protocol": dataclasses.asdict(protocol) | {"min_user": protocol.min_user},
                "split": {
                    "train": len(split.train),
                    "valid": len(split.valid),
                    "test": len(split.test),
                    "cutoff": split.cutoff,
                },
                "test": test,
                "baselines": baseline_metrics(split, dataset.num_users, dataset.num_items),
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "train_seconds": result.seconds,
                "epsilon": result.epsilon,
                "noise_multiplier": result.noise_multiplier,
            }
            curves[protocol.name] = result.history
            torch.save(
                {
                    "state_dict": result.model.state_dict(),
                    "model_config": dataclasses.asdict(config.model),
                    "catalogue_fingerprint": dataset.catalogue.fingerprint(),
                    "text_encoder": data.text_encoder,
                },
                out / f"model-{protocol.name}.pt",
            )

    first = protocols[0].name
    summary = {
        "dataset": {"name": dataset.name, "users": dataset.num_users, "items": dataset.num_items},
        "protocol": first,
        "test": results[first]["test"],
        "protocols": results,
        "config": {
            "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(config),
            "dp": None if dp is None else dataclasses.asdict(dp),
        },
    }
    if dp is not None:
        spent = [r["epsilon"] for r in results.values()]
        summary["epsilon"] = max(spent)
        summary["privacy"] = {
            "unit": "one interaction (each is exactly one training example, formed from it "
            "alone: no other interaction changes when it is added or removed)",
            "adjacency": "add/remove one interaction",
            "accountant": "Opacus RDP, Poisson sampling",
            "epsilon": max(spent),
            "delta": dp.delta,
            "noise_multiplier": results[first]["noise_multiplier"],
            "clip_norm": dp.clip_norm,
            "threat_model": "anyone who sees the trained model (central DP: the trainer is trusted)",
            "not_covered": "validation-based early stopping and hyperparameter choice",
        }
        if config.reproducible_noise:  # the noise follows from the recorded seed
            from fedrec.common.privacy.randomness import VOID_REASON

            summary["privacy"] |= {"guarantee_holds": False, "void_reason": VOID_REASON}
    atomic_write_json(out / "summary.json", summary)
    with open(out / "epochs.jsonl", "w") as f:
        for name, rows in curves.items():
            for row in rows:
                f.write(json.dumps({"protocol": name, **row}) + "\n")
    plot_validation(curves, out / "validation.png")
    return summary


def plot_validation(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["loss"] for r in rows], marker="o", label=name)
        if rows and "valid_ndcg@10" in rows[0]:
            axes[1].plot(epochs, [r["valid_ndcg@10"] for r in rows], marker="o", label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation NDCG@10 (full ranking)", xlabel="epoch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

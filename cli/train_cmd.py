"""`fedrec train`: the centralized reference (no DP, or Opacus DP-SGD at a target ε)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fedrec.cli.options import (
    ColumnsOpt,
    DataDirOpt,
    DatasetOpt,
    ItemsFileOpt,
    SyntheticOpt,
    TextEncoderOpt,
    data_config,
    fail,
)


def train(
    out: Annotated[
        Path | None, typer.Option("--out", help="output folder (default runs/train-<time>)")
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="train with DP-SGD to this ε (per interaction)"),
    ] = None,
    noise_multiplier: Annotated[
        float | None,
        typer.Option("--noise-multiplier", help="DP-SGD with this σ instead of --epsilon"),
    ] = None,
    delta: Annotated[float, typer.Option(help="δ of the DP guarantee")] = 1e-5,
    clip_norm: Annotated[float, typer.Option(help="DP-SGD per-example clipping norm")] = 1.0,
    protocol: Annotated[
        str, typer.Option(help="loo | temporal | both (both trains one model per protocol)")
    ] = "both",
    min_user: Annotated[
        int | None,
        typer.Option(
            help="keep users with at least this many interactions (default: loo 5, temporal 1)"
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="maximum epochs (early stopping on validation)")] = 20,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="batch size (default: 512 without DP; 256 under DP-SGD, the expected size "
            "under Poisson sampling)"
        ),
    ] = None,
    lr: Annotated[
        float, typer.Option(help="Adam learning rate of the embeddings (biases: x20)")
    ] = 0.001,
    model_dim: Annotated[int, typer.Option(help="embedding size")] = 64,
    num_negatives: Annotated[
        int | None,
        typer.Option(
            help="catalogue-sampled negatives per example (default: 1000 without DP, drawn once "
            "per batch; 100 under DP-SGD, drawn per example)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    reproducible_noise: Annotated[
        bool,
        typer.Option(
            "--reproducible-noise",
            help="derive DP noise and batches from --seed (tests, benchmarks): NO privacy "
            "guarantee holds",
        ),
    ] = False,
    dataset: DatasetOpt = "builtin",
    data_dir: DataDirOpt = None,
    columns: ColumnsOpt = None,
    items_file: ItemsFileOpt = None,
    synthetic: SyntheticOpt = None,
    text_encoder: TextEncoderOpt = None,
) -> None:
    """Train the recommendation model centrally on all training data and report test metrics.

    Writes OUT/summary.json (test -> hr@10, ndcg@10, ... full ranking; under DP also epsilon),
    OUT/epochs.jsonl, one model per protocol trained (OUT/model-loo.pt, OUT/model-temporal.pt)
    and OUT/validation.png. Protocols: (a) `loo` per-user leave-last-out on users with >= 5
    interactions; (b) `temporal` global time split."""
    from fedrec.common.data.schema import DataError
    from fedrec.common.model import ModelConfig
    from fedrec.common.protocols import ProtocolConfig
    from fedrec.common.reference import run_reference
    from fedrec.common.train import DPConfig, TrainConfig

    data = data_config(dataset, data_dir, columns, items_file, synthetic, text_encoder)
    if protocol not in ("loo", "temporal", "both"):
        raise typer.BadParameter(f"--protocol must be loo, temporal or both, not {protocol!r}")
    try:
        dp = None
        if epsilon is not None or noise_multiplier is not None:
            dp = DPConfig(
                epsilon=epsilon, noise_multiplier=noise_multiplier, delta=delta, clip_norm=clip_norm
            )
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size if batch_size is not None else (512 if dp is None else 256),
            lr=lr,
            # Shared by the batch, plain training scores 1000 negatives at little cost, and
            # more of them keep Adam's item-bias steps even (benchmarks/results/train-speed.json)
            num_negatives=num_negatives
            if num_negatives is not None
            else (1000 if dp is None else 100),
            seed=seed,
            reproducible_noise=reproducible_noise,
            model=ModelConfig(dim=model_dim),
        )
        protocols = [
            ProtocolConfig(name=p, min_user_interactions=min_user)
            for p in (("loo", "temporal") if protocol == "both" else (protocol,))
        ]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    out = out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    try:
        summary = run_reference(data, protocols, config, dp, out)
    except (DataError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    test = summary["test"]
    line = f"test ({summary['protocol']}): HR@10 {test['hr@10']:.4f}  NDCG@10 {test['ndcg@10']:.4f}"
    if dp is not None:
        line += f"  ε {summary['epsilon']:.2f} (δ={delta:g}, per interaction)"
    typer.echo(line)
    if dp is not None and reproducible_noise:
        typer.secho(f"no privacy guarantee: {summary['privacy']['void_reason']}", fg="yellow")
    typer.echo(f"wrote {out / 'summary.json'}")

"""Centralized reference training: the same model on all training data in one process.

Without DP, or with Opacus DP-SGD (ghost clipping, Poisson sampling, RDP accountant) at a target
ε or an explicit noise multiplier. This is the yardstick federated quality is measured against.

Privacy unit under DP: one interaction, add/remove. DP training uses `single` examples (one per
interaction, no context item: see fedrec.common.examples), so adding or removing one interaction
adds or removes exactly its own example, and Opacus's add/remove-one-example guarantee at
sensitivity C covers it. The context tower, which only a context item reaches, is frozen then. Early stopping
and hyperparameters are chosen on the validation split, which is not part of the accounted
training data (standard practice; the validation rows are never trained on).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedrec.common.data.history import UserHistories
from fedrec.common.data.splits import Split
from fedrec.common.evaluation import Ranks, evaluate, metrics_of_ranks, rank_test_items
from fedrec.common.examples import PairSoftmaxLoss, build_examples, sample_negatives
from fedrec.common.model import ModelConfig, ModelScorer, RecModel
from fedrec.common.model_config import single_interaction_parameters
from fedrec.common.privacy.dpsgd import (
    GRAD_SAMPLE_MODE,
    draw_noise_from,
    register_gram_embedding,
    secure_poisson_loader,
    silence_known_opacus_warnings,
    step_on_empty_batch,
)
from fedrec.common.privacy.randomness import privacy_randomness
from fedrec.common.types import Metrics


@dataclass(frozen=True)
class DPConfig:
    """Opacus DP-SGD settings. Give `epsilon` (σ is calibrated) or `noise_multiplier`."""

    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5  # < 1/N for the built-in data's ~30k training interactions
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("DPConfig needs exactly one of epsilon or noise_multiplier")
        for name in ("epsilon", "noise_multiplier", "delta", "clip_norm"):
            value = getattr(self, name)  # nan slips through every comparison below
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.001
    num_negatives: int = 100  # catalogue-sampled negatives per direction of each example
    examples: str = "consecutive"  # DP forces "single" (see fedrec.common.examples)
    bias_lr_scale: float = 20.0  # biases (popularity) converge slowly, embeddings overfit fast
    patience: int = 3  # epochs without validation NDCG@10 gain before stopping
    # data order and negatives; DP noise and Poisson batches only with `reproducible_noise`
    seed: int = 0
    # DP noise and batches derived from `seed` (tests, benchmarks): no privacy guarantee
    reproducible_noise: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:  # numpy's seeding range
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_negatives < 1:
            raise ValueError("epochs, batch_size and num_negatives must be >= 1")


@dataclass
class TrainResult:
    model: RecModel
    best_epoch: int
    history: list[Metrics]  # one row per epoch: loss, valid metrics, epsilon
    epsilon: float | None
    noise_multiplier: float | None
    seconds: float


BIAS_TABLES = ("item_table.weight", "year_table.weight")  # tables that hold bias columns


def param_groups(model: RecModel, config: TrainConfig) -> list[dict]:
    """Two Adam groups: the tables holding popularity biases at a higher learning rate.

    Biases converge slowly while embeddings overfit within a few epochs on this data; the
    item table's vector columns share the higher rate (one table, one Opacus norm per step).
    """
    named = dict(model.named_parameters())
    fast = [p for n, p in named.items() if n in BIAS_TABLES]
    slow = [p for n, p in named.items() if n not in BIAS_TABLES]
    return [
        {"params": slow, "lr": config.lr},
        {"params": fast, "lr": config.lr * config.bias_lr_scale},
    ]


def _examples_tensors(history: UserHistories, form: str) -> TensorDataset:
    """(second, time, user[, first]) columns: single-interaction examples have no `first`."""
    examples = build_examples(history, form)
    columns = [examples.second, examples.time, examples.user]
    columns += [] if examples.first is None else [examples.first]
    return TensorDataset(*(torch.from_numpy(c) for c in columns))


def _batches(
    dataset: TensorDataset, batch_size: int, generator: torch.Generator
) -> Iterator[list[torch.Tensor]]:
    """A shuffled pass over the examples in slices of whole columns (no per-example indexing)."""
    order = torch.randperm(len(dataset), generator=generator)
    for lo in range(0, len(order), batch_size):
        index = order[lo : lo + batch_size]
        yield [column[index] for column in dataset.tensors]


def train_centralized(
    split: Split,
    *,
    num_users: int,
    text_features: np.ndarray,
    years: np.ndarray | None,
    config: TrainConfig,
    dp: DPConfig | None = None,
    on_epoch: Callable[[int, Metrics], None] | None = None,
) -> TrainResult:
    """Train on `split.train`, early-stop on `split.valid` NDCG@10, return the best model."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    num_items = text_features.shape[0]
    train_history = UserHistories.from_interactions(split.train, num_users)
    form = "single" if dp is not None else config.examples
    dataset = _examples_tensors(train_history, form)
    if len(dataset) == 0:
        raise ValueError(f"no training examples ({form}): too few training interactions")
    model_config = config.model
    if form == "single" and not model_config.train_only:
        # what single-interaction examples reach; DP noise on the rest would only move it
        trained = ",".join(single_interaction_parameters(model_config))
        model_config = dataclasses.replace(model_config, train_only=trained)

    model = RecModel(
        model_config,
        text_features,
        years,
        num_local_users=num_users if config.model.user_embedding else 1,
        time_range=(int(split.train.timestamp.min()), int(split.train.timestamp.max())),
    )
    if form == "single":  # nothing reaches the context tower: not trained, not noised
        for name in model.context_parameter_names():
            model.get_parameter(name).requires_grad_(False)
    optimizer = torch.optim.Adam(param_groups(model, config), lr=config.lr)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False
    )
    criterion: Callable = PairSoftmaxLoss()
    trained = model
    engine = None
    if dp is not None:
        from opacus import PrivacyEngine

        silence_known_opacus_warnings()
        register_gram_embedding()
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        common = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            max_grad_norm=dp.clip_norm,
            grad_sample_mode=GRAD_SAMPLE_MODE,
            poisson_sampling=True,
        )
        if dp.epsilon is not None:
            trained, optimizer, criterion, loader = engine.make_private_with_epsilon(
                target_epsilon=dp.epsilon, target_delta=dp.delta, epochs=config.epochs, **common
            )
        else:
            trained, optimizer, criterion, loader = engine.make_private(
                noise_multiplier=dp.noise_multiplier, **common
            )
        # Opacus's own draws come from torch's (seeded) generators: a CSPRNG instead
        randomness = privacy_randomness(config.seed if config.reproducible_noise else None, "train")
        draw_noise_from(optimizer, randomness)
        loader = secure_poisson_loader(loader, randomness)

    # Plain training: whole batches sliced from the example tensors, negatives shared by the
    # batch and scored once (`forward_shared`); DP-SGD keeps Opacus's per-example path.
    forward = trained if engine is not None else model.forward_shared
    valid_history = train_history
    best = (-math.inf, 0, copy.deepcopy(model.state_dict()))
    rows: list[Metrics] = []
    for epoch in range(1, config.epochs + 1):
        trained.train()
        total, count = 0.0, 0
        batches = loader if engine is not None else _batches(dataset, config.batch_size, generator)
        for second, when, user, *first in batches:
            first = first[0] if first else None  # None: single-interaction examples
            if len(second) == 0:  # Poisson sampling drew nothing: still a noised, counted step
                step_on_empty_batch(optimizer)
                continue
            negatives, hits = sample_negatives(
                first, second, num_items, config.num_negatives, generator, shared=engine is None
            )
            logits = forward(
                first, second, negatives, when, user if config.model.user_embedding else None
            )
            loss = criterion(logits, hits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.item()) * len(second)
            count += len(second)
        row: Metrics = {"epoch": epoch, "loss": total / max(count, 1)}
        if len(split.valid):
            valid = evaluate(
                ModelScorer(model, valid_history),
                test=split.valid,
                history=valid_history,
                num_items=num_items,
                sampled_negatives=0,
            )
            row |= {f"valid_{k}": v for k, v in valid.items()}
        if engine is not None:
            row["epsilon"] = float(engine.get_epsilon(dp.delta))
        rows.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        score = row.get("valid_ndcg@10", -row["loss"])
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= config.patience:
            break

    model.load_state_dict(best[2])
    return TrainResult(
        model=model,
        best_epoch=best[1],
        history=rows,
        # The model released is the best epoch's, but every epoch's steps were taken on the
        # training data, so the spend is that of all epochs run.
        epsilon=None if engine is None else float(engine.get_epsilon(dp.delta)),
        noise_multiplier=None if dp is None else float(optimizer.noise_multiplier),
        seconds=time.perf_counter() - start,
    )


def history_before_test(split: Split, num_users: int) -> UserHistories:
    """What a user has at test time: training and validation interactions (both precede test)."""
    return UserHistories.from_interactions(split.before_test(), num_users)


def evaluate_model(model: RecModel, split: Split, num_users: int, seed: int = 0) -> Metrics:
    """Test metrics (full ranking and sampled) with the user's train+valid history."""
    return rank_and_evaluate_model(model, split, num_users, seed)[0]


def rank_and_evaluate_model(
    model: RecModel, split: Split, num_users: int, seed: int = 0
) -> tuple[Metrics, Ranks]:
    """`evaluate_model`'s metrics with the per-row ranks they came from."""
    history = history_before_test(split, num_users)
    ranks = rank_test_items(
        ModelScorer(model, history),
        test=split.test,
        history=history,
        num_items=model.num_items,
        seed=seed,
    )
    metrics = metrics_of_ranks(ranks, test=split.test, history=history, num_items=model.num_items)
    return metrics, ranks

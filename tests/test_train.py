"""Centralized reference training on small synthetic data (hashing text encoder: no weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.common.data.synthetic import SyntheticConfig, generate_synthetic
from fedrec.common.model import ModelConfig
from fedrec.common.protocols import ProtocolConfig, make_split
from fedrec.common.text import item_text_features
from fedrec.common.train import DPConfig, TrainConfig, evaluate_model, train_centralized


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    dataset = generate_synthetic(SyntheticConfig(num_users=300, num_items=120, seed=3))
    text = item_text_features(dataset.catalogue, "hashing", tmp_path_factory.mktemp("cache"))
    split = make_split(dataset.interactions, ProtocolConfig("loo"))
    return dataset, text, split


CONFIG = TrainConfig(
    epochs=4,
    batch_size=64,
    lr=0.01,
    num_negatives=20,
    patience=10,
    model=ModelConfig(dim=16, text_dim=16),
)


def test_non_private_training_learns_and_beats_chance(small):
    dataset, text, split = small
    result = train_centralized(
        split, num_users=dataset.num_users, text_features=text, years=None, config=CONFIG
    )
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.epsilon is None
    test = evaluate_model(result.model, split, dataset.num_users)
    chance_hr = 10 / dataset.num_items
    assert test["hr@10"] > 2 * chance_hr
    assert {"hr@10", "ndcg@10", "mrr", "coverage@10", "sampled_hr@10"} <= set(test)


def test_dp_training_reports_growing_epsilon_and_uses_disjoint_pairs(small):
    dataset, text, split = small
    rows = []
    result = train_centralized(
        split,
        num_users=dataset.num_users,
        text_features=text,
        years=None,
        config=CONFIG,
        dp=DPConfig(noise_multiplier=1.0),
        on_epoch=lambda epoch, row: rows.append(row),
    )
    eps = [row["epsilon"] for row in rows]
    assert all(np.isfinite(eps)) and eps == sorted(eps) and eps[0] > 0
    assert result.epsilon == pytest.approx(eps[-1])  # spend of every epoch run, not the best one
    assert result.noise_multiplier == 1.0


def test_dp_training_to_a_target_epsilon_stays_within_it(small):
    dataset, text, split = small
    result = train_centralized(
        split,
        num_users=dataset.num_users,
        text_features=text,
        years=None,
        config=CONFIG,
        dp=DPConfig(epsilon=4.0),
    )
    assert 0 < result.epsilon <= 4.0 + 1e-6


def test_dp_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="delta"):
        DPConfig(epsilon=1.0, delta=2.0)


def test_dp_training_noise_and_batches_are_secret_unless_reproducible(small):
    """Opacus's noise and Poisson batches come from a CSPRNG, not from the seed: the same
    seeded DP training twice gives different models; with reproducible noise, the same."""
    import dataclasses

    dataset, text, split = small

    def weights(**changes):
        config = dataclasses.replace(CONFIG, epochs=1, **changes)
        model = train_centralized(
            split,
            num_users=dataset.num_users,
            text_features=text,
            years=None,
            config=config,
            dp=DPConfig(noise_multiplier=1.0),
        ).model
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def same(a, b):
        return all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    assert not same(weights(), weights())
    assert same(weights(reproducible_noise=True), weights(reproducible_noise=True))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_dp_config_refuses_budgets_that_are_not_finite(value):
    # nan passed `epsilon <= 0` and reached Opacus's calibration as a traceback
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        DPConfig(epsilon=value)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number"):
        DPConfig(noise_multiplier=value)


def test_train_config_refuses_a_negative_seed_and_a_bad_lr():
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
        TrainConfig(seed=-1)
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=math.nan)

"""User-level DP accounting on the server: growth, persistence, calibration, the budget check."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedrec.common.privacy.accounting import Mechanism
from fedrec.server.aggregation import ServerOptConfig, init_server_state
from fedrec.server.checkpoint import load_latest, save_checkpoint
from fedrec.server.user_privacy import (
    UserLevelAccountant,
    aggregate_noise_std,
    calibrate_noise_multiplier,
    client_sample_rate,
    load_accountant,
    save_accountant,
    user_level_mechanism,
)

DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")


def mech(z=1.0, q=0.05):
    return user_level_mechanism(noise_multiplier=z, sample_rate=q, clip_norm=0.5, delta=DELTA)


def accountant(rounds, z=1.0, q=0.05):
    acc = UserLevelAccountant()
    for r in range(rounds):
        acc.record_round(mech(z, q), round=r + 1)
    return acc


def test_helpers():
    assert client_sample_rate(expected_clients=20, registered_clients=1000) == 0.02
    assert aggregate_noise_std(
        noise_multiplier=1.2, clip_norm=0.5, expected_clients=20
    ) == pytest.approx(0.03)
    with pytest.raises(ValueError):
        client_sample_rate(expected_clients=20, registered_clients=10)


def test_epsilon_grows_with_rounds():
    assert UserLevelAccountant().epsilon(DELTA) == 0.0
    eps = [accountant(r).epsilon(DELTA) for r in (1, 2, 5, 20)]
    assert all(a < b for a, b in itertools.pairwise(eps))


def test_matches_opacus_rdp_accountant():
    acc = accountant(30, z=1.1, q=0.02)
    reference = RDPAccountant()
    reference.history = [(1.1, 0.02, 30)]
    assert acc.epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)


def test_persists_identically(tmp_path):
    acc = accountant(3, z=1.0)
    acc.record_round(mech(z=0.7, q=0.1), round=4)
    restored = UserLevelAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    assert restored.to_dict() == acc.to_dict() and restored.num_rounds == 4

    path = tmp_path / "user_privacy.json"
    assert load_accountant(path) is None
    save_accountant(path, acc)
    assert load_accountant(path).epsilon(DELTA) == acc.epsilon(DELTA)
    assert [p.name for p in tmp_path.iterdir()] == ["user_privacy.json"]  # no temp file left


def test_persists_through_a_checkpoint(tmp_path):
    acc = accountant(5)
    g = {"w": np.zeros(2, dtype=np.float32)}
    save_checkpoint(
        tmp_path, 5, g, init_server_state(g, ServerOptConfig()), {"user_privacy": acc.to_dict()}
    )
    restored = UserLevelAccountant.from_dict(load_latest(tmp_path).extra["user_privacy"])
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)


def test_calibrate_hits_the_target():
    target, q, rounds = 3.0, 0.05, 40
    z = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, rounds=rounds)
    assert z == round(z, 3)
    acc = accountant(rounds, z=z, q=q)
    assert acc.epsilon(DELTA) <= target
    assert accountant(rounds, z=round(z - 0.001, 3), q=q).epsilon(DELTA) > target
    # The run calibrated for `rounds` may run exactly that many rounds, and not one more.
    assert not accountant(rounds - 1, z=z, q=q).would_exceed(target, mech(z, q))
    assert acc.would_exceed(target, mech(z, q))


@pytest.mark.parametrize(
    ("target", "q", "rounds"), [(1.0, 0.01, 100), (20.0, 0.9, 3), (3.0, 0.1, 1)]
)
def test_calibration_finds_the_smallest_multiplier_on_its_grid(target, q, rounds):
    """Whichever way the search walks (z below 1, near 1, above 1): the result's ε fits the
    target and the grid point below it does not."""
    z = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, rounds=rounds)
    assert z == round(z, 3)
    assert accountant(rounds, z=z, q=q).epsilon(DELTA) <= target
    assert accountant(rounds, z=round(z - 0.001, 3), q=q).epsilon(DELTA) > target


def test_calibrate_rejects_bad_inputs():
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=0, delta=DELTA, sample_rate=0.1, rounds=5)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=1, delta=DELTA, sample_rate=0.1, rounds=0)


def test_would_exceed_refuses_the_first_round_of_an_impossible_budget():
    acc = UserLevelAccountant()
    assert acc.would_exceed(0.01, mech(z=0.5, q=1.0))
    assert not acc.would_exceed(100.0, mech(z=0.5, q=1.0))
    assert acc.num_rounds == 0  # a check records nothing


def test_a_round_is_one_composition():
    acc = UserLevelAccountant()
    multi = Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=2, clip_norm=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="steps=1"):
        acc.record_round(multi, round=1)
    with pytest.raises(ValueError, match="round"):
        acc.record_round(mech(), round=-1)


def test_a_repeated_round_label_is_charged_again():
    acc = accountant(2)
    acc.record_round(mech(), round=2)  # a round redone after a crash: over-counting is safe
    assert acc.epsilon(DELTA) == accountant(3).epsilon(DELTA)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.01, 0.1, 1.0])),
        min_size=1,
        max_size=8,
    )
)
def test_epsilon_never_decreases(rounds):
    acc, last = UserLevelAccountant(), 0.0
    for i, (z, q) in enumerate(rounds):
        predicted = acc.epsilon_after(mech(z, q))
        acc.record_round(mech(z, q), round=i)
        eps = acc.epsilon(DELTA)
        assert eps >= last and eps == predicted
        last = eps

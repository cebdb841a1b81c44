"""The one-run empirical audit (Steinke, Nasr & Jagielski 2023): the bound itself, and on a
small federation that a run without DP shows clearly more leakage than the DP run, whose
empirical lower bound stays below its analytic ε."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.common.audit.empirical import (
    EmpiricalConfig,
    audit_scores,
    epsilon_lower_bound,
    p_value,
    run_empirical,
)


def test_p_value_is_the_binomial_tail_without_delta():
    # ε = 0: a guess is a fair coin; 10 of 10 right has probability 2^-10
    assert math.isclose(p_value(10, 10, 10, 0.0, 0.0), 2.0**-10)
    assert p_value(100, 10, 10, 0.0, 1e-5) > 2.0**-10  # δ only adds


def test_lower_bound_grows_with_correct_guesses_and_is_valid_at_its_level():
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in (50, 70, 90, 100)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > 2.5
    for v, eps in zip((70, 90, 100), bounds[1:], strict=True):
        assert p_value(1000, 100, v, eps, 1e-5) < 0.05 <= p_value(1000, 100, v, eps + 0.01, 1e-5)


def test_random_scores_give_no_leakage():
    rng = np.random.default_rng(0)
    included = rng.random(500) < 0.5
    assert audit_scores(rng.normal(size=500), included, 1e-5)["epsilon_lower_bound"] < 0.3
    perfect = audit_scores(included.astype(float), included, 1e-5)["epsilon_lower_bound"]
    assert perfect > 2.0


@pytest.mark.timeout(240)
def test_no_dp_control_leaks_clearly_more_than_the_dp_run(tmp_path):
    result = run_empirical(EmpiricalConfig(), tmp_path)
    dp, control = result["dp"], result["control"]
    assert dp["epsilon_lower_bound"] <= dp["analytic_epsilon"]  # else: a privacy bug
    assert control["epsilon_lower_bound"] > dp["epsilon_lower_bound"] + 1.0

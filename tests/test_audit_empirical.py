"""The one-run empirical audit: the bounds themselves, and on the real device code that the
honest mechanism passes while the same mechanism with 10x less noise than it claims fails,
including through `fedrec audit --empirical` (exit 1)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.common.audit.empirical import (
    audit_scores,
    epsilon_lower_bound,
    gaussian_delta,
    gaussian_mu,
    max_certifiable,
    p_value,
)
from fedrec.common.run_config import SimulationConfig
from fedrec.simulations.devices import run_in_process
from fedrec.simulations.empirical_audit import EmpiricalConfig, run_empirical
from fedrec.simulations.report import finalize

LOCAL_DP = Path(__file__).resolve().parent.parent / "simulations" / "local_dp.toml"
# A claim a few hundred canaries can refute: σ = 2 for one round (ε 2.17 at δ 1e-5; the
# budget 2.5 lets each interaction train once), the shipped calibrations otherwise.
SMALL_CLAIM = {"epsilon": 2.5}


def test_p_value_is_the_binomial_tail_without_delta():
    # ε = 0: a guess is a fair coin; 10 of 10 right has probability 2^-10
    assert math.isclose(p_value(10, 10, 10, 0.0, 0.0), 2.0**-10)
    assert p_value(100, 10, 10, 0.0, 1e-5) > 2.0**-10  # δ only adds


def test_lower_bound_grows_with_correct_guesses_and_is_valid_at_its_level():
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in (50, 70, 90, 100)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > 2.5
    for v, eps in zip((70, 90, 100), bounds[1:], strict=True):
        assert p_value(1000, 100, v, eps, 1e-5) < 0.05 <= p_value(1000, 100, v, eps + 0.01, 1e-5)


def test_gaussian_profile_is_dp_accountings():
    # the exact (ε, δ) of a Gaussian mechanism, against dp_accounting's PLD of the same
    for sigma in (0.7, 1.0, 2.0):
        loss = pld.from_gaussian_mechanism(
            standard_deviation=sigma, value_discretization_interval=1e-4
        )
        eps = loss.get_epsilon_for_delta(1e-5)
        assert math.isclose(1 / gaussian_mu(eps, 1e-5), sigma, rel_tol=1e-3)
        assert math.isclose(gaussian_delta(eps, 1 / sigma), 1e-5, rel_tol=1e-2)


def test_only_the_gdp_test_can_certify_the_shipped_claim():
    # Steinke et al.'s δ term grows with m: at δ 1e-5 no canary count certifies the default
    # run's ε 7.16; 2,000 perfect guesses reject 9.6 under the GDP test
    assert max(max_certifiable(m, 1e-5, method="steinke") for m in (1000, 4000, 16000)) < 6.0
    assert max_certifiable(2000, 1e-5, method="gdp") > 9.0


@pytest.mark.parametrize("method", ["steinke", "gdp"])
def test_scores_of_an_exact_gaussian_mechanism_stay_below_its_epsilon(method):
    # μ = 1/0.7 (the default run's σ): exact ε 6.65 at δ 1e-5; ten times the signal is caught
    rng = np.random.default_rng(0)
    exact = 6.65
    for _ in range(5):
        included = rng.random(2000) < 0.5
        honest = rng.normal(size=2000) + included / 0.7
        assert audit_scores(honest, included, 1e-5, method=method)["epsilon_lower_bound"] < exact
        assert (
            audit_scores(rng.normal(size=2000), included, 1e-5, method=method)[
                "epsilon_lower_bound"
            ]
            < 0.5
        )
    loud = rng.normal(size=2000) + included * 10 / 0.7
    caught = audit_scores(loud, included, 1e-5, method="gdp")["epsilon_lower_bound"]
    assert caught > 7.16


def _verdicts(result: dict) -> tuple[str, str]:
    return result["dp"]["verdict"], result["control"]["verdict"]


def test_local_calibration_passes_and_its_ten_times_less_noise_control_fails(tmp_path):
    sim = SimulationConfig.from_toml(LOCAL_DP, {**SMALL_CLAIM, "local-noise-multiplier": 2.0})
    result = run_empirical(sim, EmpiricalConfig(canaries=300), tmp_path)
    dp, control = result["dp"], result["control"]
    assert dp["view"] == "local" and dp["mechanism"]["rounds"] == 1
    assert math.isclose(dp["analytic_epsilon"], 2.1657, rel_tol=1e-3)
    assert control["analytic_epsilon"] == dp["analytic_epsilon"]  # the claim stays σ's
    assert dp["max_certifiable"] > dp["analytic_epsilon"]  # the check can fail...
    assert _verdicts(result) == ("pass", "violation")  # ...and fails only the control
    assert dp["epsilon_lower_bound"] <= dp["analytic_epsilon"] < control["epsilon_lower_bound"]
    # a canary device trains the canary as one example: in moves its item's bias up
    assert control["score_mean_in"] > control["score_mean_out"] + 4 * control["score_std_out"]


@pytest.fixture
def recorded_run(tmp_path, monkeypatch) -> Path:
    """A finished default-calibration run (user+distributed), small and with the small claim."""
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))
    config = SimulationConfig.from_flat(
        {
            **SMALL_CLAIM,
            "aggregate-noise-multiplier": 2.0,
            "dataset": "synthetic",
            "synthetic": "num_users=60,num_items=40,mean_interactions_per_user=8,seed=2",
            "rounds": 2,
            "clients-per-round": 60,  # every device: no round can fall below K_min
            "min-survivors": 3,
            "model-dim": 8,
            "model-text-dim": 8,
            "num-negatives": 10,
            "out": str(tmp_path / "run"),
        }
    )
    finalize(run_in_process(config))
    return config.out


def test_cli_empirical_audit_exits_1_on_ten_times_less_noise(recorded_run, tmp_path):
    runner = CliRunner()

    def audit(name: str, *extra: str):
        out = ["audit", str(recorded_run), "--out", str(tmp_path / name), *extra]
        return runner.invoke(app, out)

    plain = audit("plain")
    assert plain.exit_code == 0, plain.output  # an honest run
    honest = audit("honest", "--empirical", "--empirical-canaries", "200")
    assert honest.exit_code == plain.exit_code, honest.output  # the audit adds no finding
    assert (
        ": pass;" in honest.output
        and "distributed" in (tmp_path / "honest" / "audit.json").read_text()
    )
    loud = audit(
        "loud", "--empirical", "--empirical-canaries", "200", "--empirical-noise-scale", "0.1"
    )
    assert loud.exit_code == 1, loud.output
    assert "violation empirical" in loud.output

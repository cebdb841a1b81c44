"""Settings derived from the data and the DP mode: a run with the defaults aggregates on any
dataset, never overrides what the user gave, and `--dp off` does not diverge."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.common.run_config import SimulationConfig
from fedrec.server.federated_run import FederatedRun
from fedrec.server.run_settings import SURVIVOR_SHARE, derive_settings

TINY_MODEL = {"model-dim": 8, "model-text-dim": 8, "num-negatives": 10}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))


def synthetic(spec: str, tmp_path, **settings) -> SimulationConfig:
    flat = {"dataset": "synthetic", "synthetic": spec, "out": str(tmp_path / "run")}
    return SimulationConfig.from_flat(flat | settings)


@pytest.mark.parametrize("users", [30, 300])
def test_a_small_population_aggregates_with_the_defaults(tmp_path, users):
    """With the built-in defaults (2,700 devices per round, K_min 2,350) every round of a
    small population would be discarded, and the run is refused; derived, all devices are
    sampled, K_min is 87% of them, and the run starts."""
    config = synthetic(f"num_users={users},num_items=50,seed=1", tmp_path)
    with pytest.raises(ValueError, match="min-survivors"):
        FederatedRun(config)
    derived = derive_settings(config, frozenset({"dataset", "synthetic", "out"}))
    run = FederatedRun(derived.config)
    devices = len(run.registered)
    assert derived.config.clients_per_round == devices <= users
    assert derived.config.min_survivors == math.floor(SURVIVOR_SHARE * devices)
    assert run.sample_rate == 1.0
    assert set(derived.reasons) == {"clients_per_round", "min_survivors"}


def test_a_large_population_keeps_its_round_size_and_a_delta_below_one_over_n(tmp_path):
    """20,000 devices, ~370,000 interactions: 2,700 devices per round; K_min low enough that a
    round is almost never discarded; δ = 1e-5 would not be below 1/N of the interactions (a
    void per-interaction guarantee), so it becomes 0.1/N."""
    config = synthetic("num_users=20000,num_items=500,seed=1", tmp_path)
    derived = derive_settings(config, frozenset({"dataset", "synthetic", "out"}))
    run = FederatedRun(derived.config)  # the preflight's checks pass
    interactions = len(run.stream.rows)
    assert interactions > 1e5 and derived.config.delta == pytest.approx(0.1 / interactions)
    assert derived.config.clients_per_round == 2700
    assert derived.config.min_survivors == math.floor(SURVIVOR_SHARE * 2700)


def test_what_the_user_gives_is_never_derived(tmp_path):
    config = synthetic(
        "num_users=300,num_items=50,seed=1", tmp_path, **{"clients-per-round": 100, "dp": "off"}
    )
    given = frozenset({"dataset", "synthetic", "out", "clients-per-round", "server-lr"})
    derived = derive_settings(config, given)
    assert derived.config.clients_per_round == 100
    assert derived.config.server_lr == config.server_lr  # given, though the off profile sets it
    assert derived.config.server_optimizer == "fedadam"  # not given: the off profile
    assert "clients_per_round" not in derived.reasons and "server_lr" not in derived.reasons
    # K_min is not derived without secure aggregation
    assert derived.config.min_survivors == config.min_survivors


def test_the_cli_prints_and_records_the_derived_settings(tmp_path):
    """`fedrec simulate` on a 60-user dataset with nothing else given: the derived settings
    are printed at start and recorded in config.json; the run aggregates every round, and a
    model that ranks below popularity is flagged in the summary and on stderr."""
    from typer.testing import CliRunner

    from fedrec.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--in-process", "--dataset", "synthetic", "--synthetic",
            "num_users=60,num_items=30,mean_interactions_per_user=8,seed=3", "--rounds", "2",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    devices = recorded["clients-per-round"]
    assert f"clients-per-round = {devices}: all {devices} devices" in result.output
    assert recorded["min-survivors"] == math.floor(SURVIVOR_SHARE * devices)
    assert f"min-survivors = {recorded['min-survivors']}" in result.output
    assert summary["published_rounds"] == 2
    yardstick = summary["yardstick"]
    assert yardstick["ndcg@10"] == summary["test_baselines"]["popularity"]["ndcg@10"]
    assert yardstick["beaten"] == (summary["test"]["ndcg@10"] > yardstick["ndcg@10"])
    assert ("ranks no better than popularity" in result.output) == (not yardstick["beaten"])


def test_dp_off_takes_adaptive_server_steps_and_does_not_diverge(tmp_path):
    """Without DP the plain 15x server step that DP's averaged noise needs makes the loss grow
    tenfold within a few rounds; the off profile's FedAdam steps keep it where it started."""
    from fedrec.simulations.devices import run_in_process

    spec = "num_users=50,num_items=40,mean_interactions_per_user=12,seed=1"
    losses = {}
    for name, given in (("profile", set()), ("dp_step", {"server_lr", "server_optimizer"})):
        config = synthetic(spec, tmp_path / name, dp="off", rounds=4, seed=1, **TINY_MODEL)
        derived = derive_settings(config, frozenset(given | {"dataset", "synthetic", "out"}))
        assert derived.config.server_optimizer == ("fedadam" if name == "profile" else "fedavg")
        rows = []
        run_in_process(derived.config, on_round=rows.append)
        losses[name] = [r["loss"] for r in rows if r.get("loss") is not None]
    assert max(losses["profile"]) < 1.5 * losses["profile"][0]
    assert max(losses["dp_step"]) > 5 * losses["dp_step"][0]

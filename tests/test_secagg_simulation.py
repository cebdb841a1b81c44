"""SecAgg+ with the distributed discrete Gaussian in the in-process simulation
(secure-aggregation-protocol = "secagg"): settings, what the server receives, K_min, the
ledgers' charge and the audit."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.common.audit import audit
from fedrec.common.audit.records import canonical, entry_hash
from fedrec.common.privacy.accounting import (
    Guarantee,
    Mechanism,
    charge_of,
    epsilon_from_rdp,
)
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg import protocol
from fedrec.server.federated_run import FederatedRun
from fedrec.simulations import devices, secagg_devices
from fedrec.simulations.devices import run_in_process
from fedrec.simulations.report import finalize

# q = 1 (every device every round), so no round falls below K_min by chance
TINY = {
    "dataset": "synthetic",
    "synthetic": "num_users=20,num_items=40,seed=1",
    "clients-per-round": 20,
    "num-negatives": 10,
    "min-survivors": 2,
    "model-dim": 8,
    "model-text-dim": 8,
    "secure-aggregation-protocol": "secagg",
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))


def tiny(out: Path, rounds: int = 2, **more) -> SimulationConfig:
    return SimulationConfig.from_flat({**TINY, "rounds": rounds, "out": str(out), **more})


def test_the_setting_defaults_to_clear_and_secagg_needs_distributed_and_one_step():
    assert SimulationConfig().secure_aggregation_protocol == "clear"
    config = SimulationConfig.from_flat({"secure-aggregation-protocol": "secagg"})
    assert config.secagg and SimulationConfig.from_flat(config.to_flat()) == config
    assert config.user_noise_from_devices == 0.0  # no Gaussian share to add to the server's
    with pytest.raises(ValueError, match="secure-aggregation-protocol must be one of"):
        SimulationConfig.from_flat({"secure-aggregation-protocol": "masked"})
    with pytest.raises(ValueError, match=r"secure-aggregation-protocol.*needs distributed"):
        SimulationConfig.from_flat({"secure-aggregation-protocol": "secagg", "dp": "user"})
    with pytest.raises(ValueError, match="local-steps = 1"):
        SimulationConfig.from_flat({"secure-aggregation-protocol": "secagg", "local-steps": 2})


def test_the_flower_transport_runs_secagg_with_its_slots_as_parties_and_passes_the_audit(
    tmp_path,
):
    """`fedrec simulate` without --in-process: real Flower simulation, its execution slots
    the SecAgg+ parties (`fedrec.simulations.secagg_slots`); every round unmasks the sum of
    all 20 devices and the run's records pass the audit."""
    from fedrec.simulations.launcher import simulate

    config = tiny(tmp_path / "run")
    assert simulate(config) == 0
    out = Path(config.out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["discarded"] for r in rows] == [False, False]
    assert all(r["aggregated"] == 20 and r["failed"] == 0 for r in rows), rows
    summary = json.loads((out / "summary.json").read_text())
    held = {g["name"]: g for g in summary["privacy"]["guarantees"]}
    secure = held["per-interaction DP against the server, with secure aggregation"]
    assert "distributed discrete Gaussian under SecAgg+" in secure["mechanism"]
    assert "execution slot" in secure["threat_model"]
    result = audit(out)
    assert result.findings == [], [f.line() for f in result.findings]


def test_one_round_of_the_discrete_mechanism_costs_the_continuous_rounds_epsilon():
    config = SimulationConfig()
    ddg = config.discrete_mechanism(15351)
    assert ddg.target_epsilon == pytest.approx(7.16, abs=0.01)  # σ 0.7, q = 1, one step
    assert ddg.sigma <= 1e4 and ddg.bits <= 24
    m = Mechanism(
        noise_multiplier=0.0, sample_rate=1.0, steps=1, clip_norm=1.0, delta=1e-5,
        aggregate_noise_multiplier=0.0, min_survivors=config.min_survivors, ddg=ddg,
    )  # fmt: skip
    eps = epsilon_from_rdp(charge_of(m, Guarantee.DISTRIBUTED, None), 1e-5)[0]
    assert eps <= ddg.target_epsilon and eps == pytest.approx(ddg.target_epsilon, rel=2e-3)
    # fewer survivors recorded: a larger charge; LOCAL: the device's share alone
    fewer = epsilon_from_rdp(charge_of(m, Guarantee.DISTRIBUTED, 100), 1e-5)[0]
    local = epsilon_from_rdp(charge_of(m, Guarantee.LOCAL, None), 1e-5)[0]
    assert eps < fewer < local
    assert Mechanism.from_dict(m.to_dict()) == m
    plain = Mechanism(noise_multiplier=1.0, sample_rate=1.0, steps=1, clip_norm=1.0, delta=1e-5)
    assert "ddg" not in plain.to_dict()  # ledgers without it are written as before


def _replies(received, users, rng, scale=0.05):
    out = []
    for u in users:
        change = {k: rng.standard_normal(v.shape) * scale for k, v in received.items()}
        params = {k: (received[k] + change[k]).astype(np.float32) for k in received}
        out.append(DeviceReply(u, params, 1, {"examples": 2.0, "loss": 1.5}, ledger_head="h"))
    return out


def test_the_server_gets_the_survivors_noisy_sum_and_nothing_per_device(tmp_path):
    """A failed device drops out after the key stages (its masks are removed through its
    neighbours' shares); the pooled reply is the survivors' sum plus √n·σ·γ of noise."""
    config = tiny(tmp_path / "run", **{"min-survivors": 5})
    rng = np.random.default_rng(0)
    received = {"a": rng.standard_normal((30, 4)).astype(np.float32), "b": np.zeros(7, np.float32)}
    replies = _replies(received, range(12), rng)
    replies[3] = DeviceReply(3, None, 0, {}, error="crashed", ledger_head="h")
    replies[7] = DeviceReply(7, None, 0, {"noise_only": 1.0, "declined": 1.0}, ledger_head="h")
    out = secagg_devices.secagg_round(config, replies, 1, received)
    pooled = [r for r in out if r.pooled]
    assert len(pooled) == 1 and pooled[0].pooled == 11
    own = [r for r in out if not r.pooled]
    assert all(r.params is None and r.metrics == {} for r in own)
    assert [r.user for r in own if r.error] == [3]
    truth = {
        k: sum(np.float64(r.params[k]) - received[k] for r in replies if r.params is not None)
        for k in received
    }
    ddg = config.ddg_params(127)
    err = np.concatenate([(pooled[0].params[k] - truth[k]).ravel() for k in received])
    expected = math.sqrt(11 * (ddg.sigma**2 + 0.25)) * ddg.gamma
    assert err.std() == pytest.approx(expected, rel=0.25)
    counters = pooled[0].metrics
    assert counters["examples"] == 20 and counters["trained"] == 10
    assert counters["declined"] == 1 and counters["loss"] == pytest.approx(15.0)


def test_a_round_of_one_device_is_aborted_not_a_crash(tmp_path):
    """One device cannot hold a threshold of its own shares: nothing is unmasked."""
    config = tiny(tmp_path / "run", **{"min-survivors": 1})
    received = {"a": np.zeros(5, np.float32)}
    out = secagg_devices.secagg_round(
        config, _replies(received, [4], np.random.default_rng(1)), 1, received
    )
    assert [(r.user, r.pooled, r.params) for r in out] == [(4, 0, None)]


def test_fewer_than_k_min_survivors_unmask_nothing_and_the_round_is_discarded(
    tmp_path, monkeypatch
):
    config = tiny(tmp_path / "run", rounds=1, **{"min-survivors": 5})
    real_round = devices.simulated_device_round

    def most_fail(config, user, round, params, **kw):
        if user >= 3:
            raise RuntimeError("store unreadable")
        return real_round(config, user, round, params, **kw)

    unmasked = []
    real_unmask = protocol.SecAggDevice.unmask

    def spy(self, survivors, dropouts):
        unmasked.append(self.id)
        return real_unmask(self, survivors, dropouts)

    monkeypatch.setattr(devices, "simulated_device_round", most_fail)
    monkeypatch.setattr(protocol.SecAggDevice, "unmask", spy)
    run = run_in_process(config)
    row = json.loads((Path(config.out) / "metrics.jsonl").read_text().splitlines()[0])
    assert row["discarded"] is True and row["aggregated"] == 0 and row["failed"] == 17
    assert unmasked == []
    assert run.params.keys() and all(np.isfinite(v).all() for v in run.params.values())


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secagg") / "run"
    seen: list = []
    real_finish = FederatedRun.finish_round

    def record(self, round, replies, seconds):
        seen.append(list(replies))
        return real_finish(self, round, replies, seconds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREC_CACHE_DIR", str(out.parent / "cache"))
        mp.setattr(FederatedRun, "finish_round", record)
        finalize(run_in_process(tiny(out, rounds=2)))
    (out / "seen.json").write_text(
        json.dumps(
            [
                [[r.user, r.pooled, r.params is None, r.metrics == {}, r.num_examples] for r in rs]
                for rs in seen
            ]
        )
    )
    return out


def test_a_secagg_run_publishes_its_rounds_names_the_discrete_mechanism_and_passes_the_audit(
    honest,
):
    rows = [json.loads(x) for x in (honest / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and not any(r["discarded"] for r in rows)
    assert all(r["aggregated"] == 20 for r in rows)
    summary = json.loads((honest / "summary.json").read_text())
    distributed = next(
        g for g in summary["privacy"]["guarantees"] if "against the server" in g["name"]
    )
    assert distributed["earned"] and "discrete Gaussian" in distributed["mechanism"]
    assert "SecAgg+" in distributed["threat_model"]
    # what finish_round was given: per device nothing but whether it failed, one pooled sum
    for replies in json.loads((honest / "seen.json").read_text()):
        pooled = [r for r in replies if r[1]]
        assert len(pooled) == 1 and pooled[0][1] == 20
        assert all(r[2] and r[3] and r[4] == 0 for r in replies if not r[1])
    train = [
        json.loads(x)
        for p in (honest / "clients").glob("*/ledger.jsonl")
        for x in p.read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert train and all(e["mechanism"]["ddg"] is not None for e in train)
    assert all(e["mechanism"]["noise_multiplier"] == 0.0 for e in train)
    result = audit(honest)
    assert result.findings == [], [f.line() for f in result.findings]
    assert result.figures["run_record"]["mechanism_entries_checked"] > 0


def _rewrite(root: Path, client: str, entries: list[dict]) -> None:
    """A forger's ledger: every hash recomputed and the recorded head updated to match."""
    for i, e in enumerate(entries):
        e["prev_hash"] = entries[i - 1]["hash"] if i else "0" * 64
        e["hash"] = entry_hash(e)
    path = root / "clients" / client / "ledger.jsonl"
    path.write_text("".join(canonical(e) + "\n" for e in entries))
    heads = json.loads((root / "ledger_heads.json").read_text())
    heads[client] = entries[-1]["hash"]
    (root / "ledger_heads.json").write_text(json.dumps(heads))


def test_a_consistently_doubled_discrete_sigma_fails_the_audit(honest, tmp_path):
    copy = Path(shutil.copytree(honest, tmp_path / "run"))
    for folder in sorted(p for p in (copy / "clients").iterdir() if p.is_dir()):
        path = folder / "ledger.jsonl"
        if not path.exists():
            continue
        entries = [json.loads(x) for x in path.read_text().splitlines()]
        for e in entries:
            if e["kind"] == "train":
                e["mechanism"]["ddg"]["sigma"] *= 2
        _rewrite(copy, folder.name, entries)
    found = [f.line() for f in audit(copy).findings]
    assert any("[mechanism]" in f and "discrete Gaussian sigma" in f for f in found), found


def test_a_noise_the_sampler_cannot_draw_accurately_is_refused_before_the_run(tmp_path):
    from fedrec.server.federated_run import SettingsError, preflight

    config = tiny(tmp_path / "run", **{"aggregate-noise-multiplier": 2000})
    with pytest.raises(SettingsError, match="σ within 10000 integer steps"):
        preflight(config)
    assert not (tmp_path / "run").exists()


def test_fedrec_simulate_in_process_with_secagg_then_fedrec_audit(tmp_path):
    toml = tmp_path / "secagg.toml"
    body = {k: v for k, v in TINY.items() if k != "secure-aggregation-protocol"} | {"rounds": 1}
    toml.write_text("[simulation]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items()))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["simulate", "--config", str(toml), "--in-process", "--secure-aggregation-protocol",
         "secagg", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["secure-aggregation-protocol"] == "secagg"
    result = runner.invoke(app, ["audit", str(out), "--no-pld"])
    assert result.exit_code == 0, result.output
    assert "0 violations" in result.output


def test_a_deployed_device_under_secagg_is_charged_the_discrete_mechanism_under_distributed():
    """Its policy's least σ is for its own noise and does not apply to the sum's discrete
    noise; the clipping bound still does, and the ledger checks the budget under DISTRIBUTED."""
    from fedrec.client.device import PrivacyPolicy
    from fedrec.client.device_round import policy_violation, round_settings

    flat = {"dp": "user+distributed", "secure-aggregation-protocol": "secagg"}
    settings = round_settings(PrivacyPolicy(min_noise_multiplier=5.0), flat, dim=100)
    assert settings.discrete is not None and settings.discrete.dim == 100
    assert settings.budget_guarantee is Guarantee.DISTRIBUTED
    assert settings.mechanism().noise_multiplier == 0.0 and settings.seed is None
    assert policy_violation(PrivacyPolicy(min_noise_multiplier=5.0), settings) is None
    assert "clipping norm" in policy_violation(PrivacyPolicy(max_clip_norm=0.1), settings)
    # without secagg the device's own σ is what its policy checks
    local = round_settings(PrivacyPolicy(), {"dp": "user+local"})
    assert local.discrete is None and local.budget_guarantee is Guarantee.LOCAL
    assert "noise multiplier" in policy_violation(PrivacyPolicy(min_noise_multiplier=5.0), local)


def test_user_level_dp_from_the_discrete_noise_alone_when_it_pays_for_the_run(tmp_path):
    """When the devices' discrete Gaussian (at K_min, clients sampled at q) keeps every planned
    round within the user budget, the server adds no noise and the accountant charges it; the
    audit re-derives that and agrees."""
    config = tiny(tmp_path / "run", rounds=2, **{"user-epsilon": 40.0})
    run = run_in_process(config)
    assert run.user_ddg is not None and run.server_noise_multiplier == 0.0
    finalize(run)
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    user = next(g for g in summary["privacy"]["guarantees"] if g["name"].startswith("user-level"))
    assert "discrete Gaussian" in user["accountant"] and user["epsilon"] <= 40.0
    result = audit(Path(config.out))
    assert result.findings == [], [f.line() for f in result.findings]
    assert result.figures["user_level"]["epsilon_rdp"] == pytest.approx(user["epsilon"])
    # the server's record doctored to twice the discrete σ: not what config.json prescribes
    path = Path(config.out) / "checkpoints" / "round-0002.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    for item in meta["extra"]["user_privacy"]["rounds"]:
        item["mechanism"]["ddg"]["sigma"] *= 2
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    found = [f.line() for f in audit(Path(config.out)).findings]
    assert any("user-level discrete Gaussian sigma" in f for f in found), found
    # the same run at the default budget: the discrete noise does not pay, the server adds it
    fallback = FederatedRun(tiny(tmp_path / "other", rounds=2))
    assert fallback.user_ddg is None and fallback.server_noise_multiplier > 0

"""The federated lifelong simulation: config, one run end to end, resume, bad updates, Flower."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fedrec.client.ledger import PrivacyLedger
from fedrec.common.privacy.accounting import Guarantee
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import DP_MODES, SimulationConfig, format_dp, parse_dp
from fedrec.server.federated_run import FederatedRun, RunExistsError
from fedrec.simulations.devices import run_in_process
from fedrec.simulations.report import finalize

# Tests that compare two runs' models opt in: DP noise and sampling derived from the seed.
REPRODUCIBLE = {"reproducible-noise": True}


pytestmark = pytest.mark.usefixtures("private_cache")


def test_config_round_trips_and_rejects_unknown_settings():
    config = SimulationConfig()
    assert SimulationConfig.from_flat(config.to_flat()) == config
    assert config.dp == {"user", "distributed"}
    assert config.device_noise_multiplier == pytest.approx(0.7 / np.sqrt(config.min_survivors))
    with pytest.raises(ValueError, match="unknown simulation settings"):
        SimulationConfig.from_flat({"roundz": 3})
    parsed = SimulationConfig.from_flat({"model-id-embeddings": "false", "resume": "true"})
    assert parsed.model.id_embeddings is False and parsed.resume is True
    assert parse_dp("off") == frozenset()
    with pytest.raises(ValueError, match="distributed OR local"):
        parse_dp("distributed+local")
    with pytest.raises(ValueError, match=re.escape("not a DP mode; use one of off | user |")):
        parse_dp("user+central")


def test_every_dp_mode_has_one_spelling():
    """Each mode is written one way (user-level part first); the parts in another order, as
    older config.json files recorded them, read as the same mode; other spellings are refused."""
    for mode in DP_MODES:
        assert format_dp(parse_dp(mode)) == mode
        assert SimulationConfig.from_flat({"dp": mode}).to_flat()["dp"] == mode
    assert parse_dp("distributed+user") == parse_dp("user+distributed")
    assert SimulationConfig.from_flat({"dp": "local+user"}).to_flat()["dp"] == "user+local"
    for other in ("none", "", "user,distributed", "user+user", "user+"):
        with pytest.raises(ValueError, match=re.escape("use one of " + " | ".join(DP_MODES))):
            parse_dp(other)


@pytest.mark.parametrize("dp", ["local", "distributed"])
def test_a_local_user_vector_without_user_level_dp_is_refused(dp):
    with pytest.raises(ValueError, match=r"model-user-embedding = true with dp = .*dp = user"):
        SimulationConfig.from_flat({"dp": dp, "model-user-embedding": "true"})


def test_local_parameters_withdraw_every_per_interaction_guarantee(small, tmp_path):
    """With a LOCAL user vector only user-level DP is stated: the per-interaction guarantees
    (distributed and local) are listed as not earned, with no ε, in summary.json."""
    assert SimulationConfig().per_interaction_holds
    for dp in ("user+distributed", "user+local"):
        config = SimulationConfig.from_flat({"dp": dp, "model-user-embedding": "true"})
        assert not config.per_interaction_holds and not config.distributed_holds
    config = small(tmp_path, dp="user+local", **{"model-user-embedding": "true", "rounds": 2})
    summary = finalize(run_in_process(config))
    privacy = summary["privacy"]
    assert privacy["per_interaction_holds"] is False
    held = [g for g in privacy["guarantees"] if g.get("earned", True)]
    assert [g["name"] for g in held] == ["user-level DP of the published global model"]
    withdrawn = [g for g in privacy["guarantees"] if not g.get("earned", True)]
    assert [g["unit"] for g in withdrawn] == ["one interaction"]
    assert all(g["epsilon"] is None and "LOCAL user vector" in g["why_not"] for g in withdrawn)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("epsilon", "nan", "epsilon must be a finite number"),
        ("epsilon", "inf", "epsilon must be a finite number"),
        ("user-epsilon", "nan", "user-epsilon must be a finite number"),
        ("local-lr", "-inf", "local-lr must be a finite number"),
        ("seed", "-1", r"seed must be in \[0, 2\*\*32\), not -1"),
    ],
)
def test_config_refuses_budgets_that_are_not_finite_and_negative_seeds(setting, value, message):
    # nan passed every `<= 0` check and the run crashed (or, at inf, claimed no privacy)
    with pytest.raises(ValueError, match=message):
        SimulationConfig.from_flat({setting: value})


def test_a_config_file_that_is_not_toml_is_named(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("rounds = 3\nseed = = 1\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid TOML: .*line 2"):
        SimulationConfig.from_toml(path)


def test_csv_data_needs_its_columns():
    config = SimulationConfig.from_flat({"dataset": "csv", "data-dir": "e.csv"})
    with pytest.raises(ValueError, match="needs --columns naming the user, item, time column"):
        config.data.load()
    partial = {"dataset": "csv", "data-dir": "e.csv", "columns": "user=u,item=i"}
    with pytest.raises(ValueError, match="naming the time column"):
        SimulationConfig.from_flat(partial).data.load()


def test_a_run_writes_consistent_outputs(small, tmp_path):
    config = small(tmp_path)
    run = run_in_process(config)
    summary = finalize(run)
    out = config.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["rounds"] == 3
    # summary.json is the report's last file: the launcher stops when it appears
    last = (out / "summary.json").stat().st_mtime_ns
    for name in ("ledger_heads.json", "rounds.png", "epsilon.png"):
        assert (out / name).stat().st_mtime_ns <= last
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*.npz")) == [
        "round-0001.npz",
        "round-0002.npz",
        "round-0003.npz",
    ]
    assert 0 <= summary["test"]["ndcg@10"] <= summary["test"]["hr@10"] <= 1
    privacy = summary["privacy"]
    assert 0 < privacy["max_interaction_epsilon"] <= privacy["budget_epsilon"]
    assert 0 < privacy["user_epsilon"] <= config.user_epsilon
    names = [g["name"] for g in privacy["guarantees"]]
    assert any("user-level" in n for n in names) and any("secure aggregation" in n for n in names)
    assert privacy["per_interaction_holds"] is True
    # every device ledger that holds entries verifies, is within budget, and its head is
    # in ledger_heads.json (not in summary.json, which stays small)
    assert "ledger_heads" not in summary
    heads = json.loads((out / "ledger_heads.json").read_text())
    ledgers = [p for p in sorted((out / "clients").glob("*/ledger.jsonl")) if p.read_text().strip()]
    assert ledgers and len(heads) == len(ledgers)
    trained = sum(r["aggregated"] - r["noise_only"] for r in rows)
    assert sum(r["noise_only"] for r in rows) > 0  # idle devices still add their noise
    train_entries = 0
    for path in ledgers:
        with PrivacyLedger.open(path) as ledger:
            assert heads[path.parent.name] == ledger.head_hash
            eps = ledger.epsilons(Guarantee.DISTRIBUTED, config.delta)
            assert all(v <= config.epsilon for v in eps.values())
            train_entries += sum(e["kind"] == "train" for e in ledger.entries)
    assert train_entries == trained  # one ledger entry per update that reached the server
    assert (out / "rounds.png").stat().st_size > 1000 and (out / "epsilon.png").exists()
    forgetting = summary["early_window_ndcg@10"]
    assert len(forgetting) == 3 and all(0 <= x <= 1 for x in forgetting)
    baselines = summary["prequential_baselines_ndcg@10"]
    assert [b["round"] for b in baselines] == [2, 3]
    assert all(0 <= b["popularity"] <= 1 and 0 <= b["recent_popularity"] <= 1 for b in baselines)


def test_resume_continues_with_the_same_rounds_ledgers_and_accountant(small, tmp_path, monkeypatch):
    # equal models only where noise and sampling follow the seed (secret ones never repeat)
    full = run_in_process(small(tmp_path / "a", **REPRODUCIBLE))
    interrupted = small(tmp_path / "b", **REPRODUCIBLE)
    original = FederatedRun.sample

    def crash_in_round_3(self, round):
        if round == 3:
            raise KeyboardInterrupt
        return original(self, round)

    monkeypatch.setattr(FederatedRun, "sample", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(interrupted)
    monkeypatch.setattr(FederatedRun, "sample", original)
    with pytest.raises(RunExistsError):
        FederatedRun(interrupted)
    resumed = run_in_process(SimulationConfig(**{**interrupted.__dict__, "resume": True}))
    rows = [json.loads(x) for x in (interrupted.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert resumed.accountant.epsilon(1e-5) == pytest.approx(full.accountant.epsilon(1e-5))
    for name, value in full.params.items():
        np.testing.assert_allclose(resumed.params[name], value, rtol=1e-5, atol=1e-6)


def test_bad_updates_are_dropped_with_a_reason_and_failures_counted(small, tmp_path):
    run = FederatedRun(small(tmp_path, dp="off"))
    good = {k: v.copy() for k, v in run.params.items()}
    nan = {k: v.copy() for k, v in run.params.items()}
    nan["item_table.weight"][0, 0] = np.nan
    shape = dict(good) | {"ctx_text.weight": np.zeros((2, 2), np.float32)}
    replies = [
        DeviceReply(1, good, 3),
        DeviceReply(2, nan, 3),
        DeviceReply(3, shape, 3),
        DeviceReply(4, None, 0, error="StoreError: store.sqlite: unreadable"),
        DeviceReply(5, None, 0, {"declined": 1.0}),
    ]
    row = run.finish_round(1, replies, 0.0)
    assert (row["aggregated"], row["dropped"], row["failed"], row["declined"]) == (1, 2, 1, 1)
    assert any("non-finite" in r for r in row["dropped_reasons"])
    assert any("shape" in r for r in row["dropped_reasons"])
    assert all(np.isfinite(v).all() for v in run.params.values())


def test_fedrec_simulate_runs_through_flower(small, tmp_path):
    out = tmp_path / "flower-run"
    env = os.environ | {"FEDREC_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "fedrec.cli", "simulate", "--out", str(out)]
    for key in ("dataset", "synthetic", "rounds", "clients-per-round", "min-survivors"):
        args += [f"--{key}", str(small.flat[key])]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["privacy"]["failed_clients"] == 0
    assert summary["published_rounds"] == 3  # the sums reached K_min: nothing was discarded
    assert "user_epsilon" in summary["privacy"]
    # several devices per message: every device's metrics came back to the server, split
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["sampled"] for r in rows) > 8 and sum(r["preq_count"] for r in rows) > 0
    assert all(r["aggregated"] + r["declined"] - r["noise_only"] <= r["sampled"] for r in rows)
    # idle devices' noise shares travel pooled per message: still every device is in the sum
    assert sum(r["noise_only"] for r in rows) > 0
    assert all(r["failed"] == r["dropped"] == 0 for r in rows)
    assert all(r["aggregated"] == r["sampled"] - r["declined"] + r["noise_only"] for r in rows)
    assert "NDCG@10" in proc.stdout
    # stdout is a pipe, not a terminal: one complete line per round, not a progress bar
    shown = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in shown] == ["round 1/3", "round 2/3", "round 3/3"]
    for line, row in zip(shown, rows, strict=True):
        assert f"of {row['sampled']} sampled" in line and line.endswith(" s") and "ε/user" in line
    assert b"\x1b[" not in (out / "flower.log").read_bytes()  # no terminal colour codes
    # the run folder's size, reported and recorded (the lock file was emptied since)
    from fedrec.cli.run_folder import folder_size

    size, files = folder_size(out)
    assert abs(summary["run_folder_bytes"] - size) < 1000 and summary["run_folder_files"] == files
    assert f"run folder {out}: " in proc.stdout
    # every device's ledger commitment reached the server's participation record via Flower
    from fedrec.common.audit import audit

    part = [json.loads(x) for x in (out / "participation.jsonl").read_text().splitlines()]
    assert all(p["devices"] and all(p["devices"].values()) for p in part)
    # each round's one attempt, recorded with the devices it asked (none was cut short)
    tried = [json.loads(x) for x in (out / "attempts.jsonl").read_text().splitlines()]
    assert [(a["round"], a["devices"]) for a in tried] == [
        (p["round"], sorted(p["devices"])) for p in part
    ]
    checks = {f.check for f in audit(out).findings}
    assert not checks & {"chain", "record", "participation", "mechanism", "config"}, checks
    leftovers = subprocess.run(["pgrep", "-f", str(out / "flower")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""  # every process the run started is gone


def test_experiment_files_parse():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "simulations"
    files = sorted(folder.glob("*.toml"))
    assert files
    for path in files:
        config = SimulationConfig.from_toml(path)
        assert config.rounds >= 1


def test_flwr_run_dot_uses_the_same_apps(small, tmp_path):
    """`flwr run . local` (Flower's own CLI, local simulation federation) runs fedrec's apps.

    Flower leaves a detached SuperLink behind; the test starts it on private ports and kills
    it, and what it started, by PID."""
    import signal
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    http_port, control_port = 39200 + os.getpid() % 300 * 2, 39201 + os.getpid() % 300 * 2
    ray_tmp = Path(f"/tmp/fr-{os.getpid()}")
    env = os.environ | {
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "OPENBLAS_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
    }
    ray_tmp.mkdir(exist_ok=True)
    out = tmp_path / "run"
    overrides = f"dataset='synthetic' synthetic='{small.flat['synthetic']}' rounds=2 "
    overrides += f"clients-per-round=10 min-survivors=1 out='{out}' expected-nodes=15"
    try:
        proc = subprocess.run(
            ["flwr", "run", ".", "local", "--stream", "--run-config", overrides,
             "--federation-config", "num-supernodes=15 client-resources-num-cpus=1"],
            cwd=root, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["published_rounds"] == 2
    finally:
        listing = subprocess.run(
            ["pgrep", "-f", f"{http_port}|{control_port}"], capture_output=True, text=True
        )
        for pid in listing.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)


def test_rounds_with_fewer_survivors_than_k_min_reveal_nothing(small, tmp_path):
    """Secure aggregation's threshold: below K_min the server learns nothing, the model stays,
    ledgers keep the planned (over-)charge and stay within budget, and user-level DP states
    a δ within the target (the discard rule's share was planned into it)."""
    from fedrec.server.secure_aggregation import secure_sum
    from fedrec.simulations.devices import device_reply

    config = small(tmp_path)
    run = FederatedRun(config)
    for round_ in run.pending_rounds():  # only 2 of the sampled devices answer: 2 < K_min = 3
        users = [int(u) for u in run.sample(round_)][:2]
        replies = [device_reply(config, u, round_, run.params) for u in users]
        run.finish_round(round_, secure_sum(replies, run.params), 0.0)
    initial = FederatedRun(small(tmp_path / "fresh")).params
    assert all(np.array_equal(run.params[k], initial[k]) for k in initial)
    rows = [json.loads(x) for x in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["discarded"] for r in rows)
    for path in sorted((config.out / "clients").glob("*/ledger.jsonl")):
        with PrivacyLedger.open(path) as ledger:
            assert all(e["kind"] != "survivors" for e in ledger.entries)
            eps = ledger.epsilons(Guarantee.DISTRIBUTED, config.delta)
            assert all(v <= config.epsilon for v in eps.values())
    summary = finalize(run)
    assert summary["published_rounds"] == 0
    user = next(g for g in summary["privacy"]["guarantees"] if "user-level" in g["name"])
    assert user["earned"] and user["delta"] <= config.delta
    assert 0 < user["delta_from_discarded_rounds"] < config.delta / 10


def test_discard_delta_is_negligible_when_many_more_devices_are_sampled_than_k_min():
    from fedrec.server.user_privacy import discard_delta

    args = {"epsilon": 8.0, "rounds": 60, "sample_rate": 100 / 5000, "min_survivors": 10}
    assert discard_delta(registered_clients=5000, **args) < 1e-15
    assert discard_delta(registered_clients=600, **{**args, "sample_rate": 12 / 600}) > 1e-5
    assert discard_delta(registered_clients=5000, **{**args, "min_survivors": 1}) == 0.0


def test_server_bias_decay_fades_item_biases_only(small, tmp_path):
    run = FederatedRun(small(tmp_path, **{"server-bias-decay": 0.25, "dp": "off"}))
    table = run.params["item_table.weight"].copy()
    table[:] = 2.0
    run.params = {**run.params, "item_table.weight": table}
    before = {k: v.copy() for k, v in run.params.items()}
    run._decay_item_biases(0.25)
    columns = run.model.item_columns
    after = run.params["item_table.weight"]
    assert np.allclose(after[:, columns["bias"]], 1.5)
    assert np.allclose(after[:, columns["time_bias"]], 1.5)
    assert all(np.array_equal(run.params[k], before[k]) for k in before if k != "item_table.weight")
    with pytest.raises(ValueError, match="server-bias-decay"):
        small(tmp_path, **{"server-bias-decay": 1.0})


def test_progress_line_counts_idle_devices_as_declined_not_trained():
    from fedrec.simulations.launcher import describe_round

    line = describe_round({"round": 2, "aggregated": 10, "noise_only": 4, "declined": 4})
    assert "trained 6" in line and "declined 4" in line and "DISCARDED" not in line
    assert "DISCARDED" in describe_round({"aggregated": 3, "declined": 0, "discarded": True})


def test_a_round_line_says_everything_of_the_round_on_one_line():
    from fedrec.simulations.launcher import round_line

    row = {"round": 2, "sampled": 12, "aggregated": 10, "noise_only": 4, "declined": 6}
    row |= {"loss": 4.5, "preq_ndcg@10": 0.0812, "user_epsilon": 3.7, "seconds": 2.54}
    row |= {"max_interaction_epsilon_sampled_at_most": 7.25, "failed": 0}
    assert round_line(row, 30) == (
        "round 2/30: trained 6 of 12 sampled  declined 6  loss 4.500  preq NDCG@10 0.081  "
        "ε/interaction ≤ 7.25  ε/user 3.70  2.5 s"
    )


def test_the_log_of_child_processes_keeps_their_lines_without_colour_codes(tmp_path):
    from fedrec.common.plain_log import PlainLog

    (tmp_path / "flower.log").write_bytes(b"earlier run\n")
    log = PlainLog(tmp_path / "flower.log")
    code = (
        "import sys; print('\\x1b[92mINFO \\x1b[0m:      Starting'); "
        "print('\\x1b[1;31mERROR\\x1b[0m: bad', file=sys.stderr); print('done', end='')"
    )
    for _ in range(2):
        assert log.popen([sys.executable, "-c", code]).wait(60) == 0
    log.close()
    text = (tmp_path / "flower.log").read_text()
    assert text.startswith("earlier run\n") and "\x1b" not in text
    assert text.count("INFO :      Starting\n") == 2 and text.count("ERROR: bad\n") == 2
    assert text.count("done") == 2


def test_the_run_folder_size_counts_every_file_with_the_summary_that_states_it(tmp_path):
    from fedrec.cli.run_folder import folder_size, human_bytes, record_folder_size

    (tmp_path / "clients" / "7").mkdir(parents=True)
    (tmp_path / "clients" / "7" / "ledger.jsonl").write_bytes(b"x" * 5000)
    (tmp_path / "metrics.jsonl").write_bytes(b"y" * 123)
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 3}))
    size, files = record_folder_size(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["run_folder_files"] == files == 3
    assert summary["run_folder_bytes"] == size == folder_size(tmp_path)[0]
    assert human_bytes(size) == "5.2 kB" and human_bytes(12_300_000) == "12.3 MB"


def test_user_level_noise_counts_the_devices_share_under_distributed(small, tmp_path):
    """Under user+distributed every published sum already carries the devices' noise (n >=
    K_min devices, each σ/√K_min in the lr·C/B unit): the server adds only the rest, and the
    accountant charges the total, which is what every published round carries."""
    import math

    alone = FederatedRun(small(tmp_path / "a", dp="user"))
    both = FederatedRun(small(tmp_path / "b", dp="user+distributed"))
    assert alone.server_noise_multiplier == alone.noise_multiplier > 0
    from_devices = both.config.user_noise_from_devices
    # σ_agg / (B·√S): the small run has B = 1 and S = 2 local steps (their mean carries σ/√S)
    assert from_devices == pytest.approx(3.0 / math.sqrt(2))
    assert both.noise_multiplier == pytest.approx(max(alone.noise_multiplier, from_devices))
    expected = math.sqrt(max(0.0, alone.noise_multiplier**2 - from_devices**2))
    assert both.server_noise_multiplier == pytest.approx(expected)
    assert both.server_noise_multiplier < alone.server_noise_multiplier
    run = run_in_process(small(tmp_path / "c", dp="user+distributed"))
    recorded = {r.mechanism.noise_multiplier for r in run.accountant._records}
    assert recorded == {run.noise_multiplier}


def test_a_sampled_device_with_nothing_delivered_yet_sends_noise_without_a_store(small, tmp_path):
    from fedrec.common.data.stream import load_stream
    from fedrec.simulations.devices import client_dir, simulated_device_round

    config = small(tmp_path)
    run = FederatedRun(config)
    stream = load_stream(config.data, config.rounds, config.protocol)
    late = [
        int(u)
        for u in run.registered
        if not stream.deliveries(int(u), 0, 1) and stream.deliveries(int(u), 0, config.rounds)
    ]
    assert late
    user = late[0]
    result = simulated_device_round(config, user, 1, run.params)
    folder = client_dir(config, str(stream.dataset.user_ids[user]))
    assert not folder.exists()
    assert result.declined and result.metrics["noise_only"] == 1.0
    assert set(result.params) == set(run.params)
    assert any(not np.array_equal(result.params[k], run.params[k]) for k in run.params)


def test_a_run_that_trains_only_some_parameters_sends_only_those(small, tmp_path):
    config = small(
        tmp_path, dp="local", **{"model-text-bias": True, "model-train-only": "text_bias.weight"}
    )
    run = run_in_process(config)
    assert set(run.params) == {"text_bias.weight"}
    assert np.any(run.params["text_bias.weight"] != 0)
    run.load_into_model()
    assert not run.model.item_table.weight.detach().numpy().any()  # frozen at its zero init
    summary = finalize(run)
    assert summary["rounds"] == config.rounds and summary["test"]["ndcg@10"] >= 0


def test_the_idle_marker_gives_the_reply_the_store_would(small, tmp_path):
    """A device with nothing to train stays so until something new arrives; the marker that
    skips opening its store must give exactly the full path's reply, and is ignored once
    something new arrived."""
    from fedrec.client.store import ClientStore
    from fedrec.common.data.stream import load_stream
    from fedrec.simulations.devices import (
        DELIVERED_KEY,
        IDLE_FILE,
        client_dir,
        simulated_device_round,
    )

    # the same noise both ways; a budget that one round spends, so cohorts retire and devices
    # fall idle (one interaction is one example: a device is idle once all it holds retired)
    config = small(tmp_path, rounds=6, epsilon=2.0, **REPRODUCIBLE)
    run = run_in_process(config)
    stream = load_stream(config.data, config.rounds, config.protocol)
    checked = 0
    for user in run.registered:
        user = int(user)
        folder = client_dir(config, str(stream.dataset.user_ids[user]))
        marker = folder / IDLE_FILE
        if not marker.exists():
            continue
        since = json.loads(marker.read_text())["round"]
        with ClientStore(folder) as store:
            if int(store.get_meta(DELIVERED_KEY, "0")) != since:
                continue  # it trained after the marker: the marker is stale (never used)
        later = list(range(since + 1, config.rounds + 1))
        quiet = [r for r in later if not stream.deliveries(user, since, r)]
        if not quiet:
            continue
        round_ = quiet[-1]
        cached = simulated_device_round(config, user, round_, run.params)
        marker.unlink()
        full = simulated_device_round(config, user, round_, run.params)
        assert cached.metrics == full.metrics and cached.declined and full.declined
        assert all(np.array_equal(cached.params[k], full.params[k]) for k in full.params)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("protocol", ["loo", "temporal"])
def test_the_stream_delivers_everything_before_the_test_and_never_the_test(
    small, tmp_path, protocol
):
    """The yardsticks count every interaction before the test (validation rows included), so
    the devices receive exactly those too: the simulation selects no model on a validation
    set, and holding those rows back would compare the model on less data than popularity."""
    from fedrec.common.data.stream import load_stream

    config = small(tmp_path, protocol=protocol)
    stream = load_stream(config.data, config.rounds, config.protocol)

    def rows(part) -> set[tuple[int, int, int]]:
        return set(
            zip(part.user.tolist(), part.item.tolist(), part.timestamp.tolist(), strict=True)
        )

    delivered, split = rows(stream.rows), stream.split
    assert len(delivered) == len(stream.rows) and len(split.valid) > 0
    assert rows(split.valid) <= delivered and rows(split.train) <= delivered
    assert not rows(split.test) & delivered
    everything = rows(stream.dataset.interactions)
    if protocol == "loo":  # all but the test: short users are streamed whole
        assert delivered == everything - rows(split.test)
    else:  # all before the cutoff, of the users the protocol keeps
        users = {user for user, _, _ in delivered}
        assert delivered == {r for r in everything if r[2] < split.cutoff and r[0] in users}


def test_the_temporal_protocol_streams_nothing_past_the_cutoff(small, tmp_path):
    """Protocol (b): the stream stops at the global cutoff T, no device ever holds an
    interaction from T on, and the summary ranks the first interaction after T for the model
    and for the popularity yardsticks alike."""
    from fedrec.client.store import ClientStore
    from fedrec.common.data.stream import load_stream

    config = small(tmp_path, protocol="temporal")
    stream = load_stream(config.data, config.rounds, config.protocol)
    cutoff = stream.split.cutoff
    loo = load_stream(config.data, config.rounds, "loo")
    assert int(stream.rows.timestamp.max()) < cutoff <= int(loo.rows.timestamp.max())
    assert len(stream.split.test) > 0 and (stream.split.test.timestamp >= cutoff).all()
    summary = finalize(run_in_process(config))
    stores = sorted((config.out / "clients").glob("*/store.sqlite"))
    assert stores
    for path in stores:
        with ClientStore(path.parent) as store:
            held = store.interactions()
            assert len(held) == 0 or int(held.timestamp.max()) < cutoff
    assert summary["protocol"] == "temporal"
    assert summary["test"]["users"] == len(stream.split.test)
    assert set(summary["test_baselines"]) == {"popularity", "recent_popularity"}
    with pytest.raises(ValueError, match="protocol must be one of"):
        small(tmp_path, protocol="random")


def test_per_example_clipping_is_validated_and_reaches_the_devices(small, tmp_path):
    from fedrec.client.runtime import local_config

    with pytest.raises(ValueError, match="per-example-clipping must be one of"):
        small(tmp_path, **{"per-example-clipping": "fast"})
    config = small(tmp_path, **{"per-example-clipping": "opacus"})
    assert local_config(config, seed=0).clipping == "opacus"
    assert local_config(small(tmp_path), seed=0).clipping == "fused"


def test_a_run_with_fused_clipping_equals_one_through_opacus(small, tmp_path):
    """The same seeded run, its devices clipping with fedrec's fused path or through Opacus's
    own machinery: the same global model (to float rounding) and the same ledgers."""
    runs = {
        c: run_in_process(
            small(tmp_path / c, rounds=2, **{"per-example-clipping": c}, **REPRODUCIBLE)
        )
        for c in ("fused", "opacus")
    }
    for name, value in runs["fused"].params.items():
        np.testing.assert_allclose(value, runs["opacus"].params[name], rtol=1e-4, atol=1e-6)
    ledgers = {
        c: {
            p.parent.name: [
                {k: v for k, v in e.items() if "time" not in k and "hash" not in k}
                for e in map(json.loads, p.read_text().splitlines())
            ]
            for p in (tmp_path / c / "run" / "clients").glob("*/ledger.jsonl")
        }
        for c in runs
    }
    assert ledgers["fused"] and ledgers["fused"] == ledgers["opacus"]


def test_the_server_learns_only_the_secure_sum_of_the_devices_replies(small, tmp_path):
    """Under DISTRIBUTED what reaches the server is `secure_sum`'s output: per device only
    whether it failed; the update and every counter as one sum. Summed in parts (one per
    message) or at once, the round is the same, and its counters are those of the devices'
    own replies; a device's own update or metrics are refused; a corrupted part is dropped
    with its reason and its devices are not counted."""
    import math

    from fedrec.server.secure_aggregation import secure_sum
    from fedrec.simulations.devices import device_reply

    whole_run = FederatedRun(small(tmp_path / "a", **REPRODUCIBLE))  # the same server noise
    parts_run = FederatedRun(small(tmp_path / "b", **REPRODUCIBLE))
    assert "distributed" in whole_run.config.dp
    params = whole_run.params
    replies = [device_reply(whole_run.config, int(u), 1, params) for u in whole_run.sample(1)]
    idle = [r for r in replies if r.metrics.get("noise_only") == 1.0]
    assert idle and len(idle) < len(replies) and all(r.error is None for r in replies)
    whole = secure_sum(replies, params)
    own = [r for r in whole if not r.pooled]
    assert len(own) == len(replies) and all(r.params is None and not r.metrics for r in own)
    half = len(replies) // 2
    parts = secure_sum(replies[:half], params) + secure_sum(replies[half:], params)
    row = whole_run.finish_round(1, whole, 0.0)
    parts_row = parts_run.finish_round(1, parts, 0.0)
    for key in ("sampled", "aggregated", "declined", "noise_only", "preq_count", "loss"):
        assert parts_row[key] == pytest.approx(row[key]), key
    for name in params:
        np.testing.assert_allclose(parts_run.params[name], whole_run.params[name], atol=1e-5)
    assert row["aggregated"] == len(replies) and row["dropped"] == 0
    assert row["declined"] == sum(r.metrics.get("declined") == 1.0 for r in replies)
    assert row["preq_count"] == sum(r.metrics.get("preq_count", 0.0) for r in replies)
    losses = [
        r.metrics["loss"]
        for r in replies
        if r.metrics.get("noise_only") != 1.0 and math.isfinite(r.metrics.get("loss", math.nan))
    ]
    assert losses and row["loss"] == pytest.approx(np.mean(losses))
    assert row["max_interaction_epsilon_sampled"] is None  # a maximum is not a sum
    worst = max(r.metrics.get("max_interaction_epsilon", 0.0) for r in replies)
    assert worst <= row["max_interaction_epsilon_sampled_at_most"] < worst + 0.25

    # a device's own update, or its metrics, never enter
    leaky = FederatedRun(small(tmp_path / "c"))
    trained = next(r for r in replies if r.metrics.get("noise_only") != 1.0)
    row = leaky.finish_round(1, [*whole, trained], 0.0)
    assert row["dropped"] == 1 and row["aggregated"] == len(replies)
    assert "secure aggregation" in row["dropped_reasons"][0]
    # a corrupted part is dropped with its reason, and its devices are not counted
    first, second = secure_sum(replies[:half], params), secure_sum(replies[half:], params)
    bad = next(r for r in second if r.pooled)
    next(iter(bad.params.values())).flat[0] = np.nan
    broken = FederatedRun(small(tmp_path / "d"))
    row = broken.finish_round(1, first + second, 0.0)
    assert row["dropped"] == 1 and row["aggregated"] == half


def test_idle_devices_noise_drawn_at_once_is_the_sum_of_their_shares(small, tmp_path):
    """`simulated_replies` draws the idle devices' noise shares as one vector. Neighbouring
    releases: the secure sum of k idle shares, one draw each or one draw for all. Both are
    N(0, k·s²) per coordinate, with the same members and counters; an idle device still
    counts as a member (its share is in the sum), a failed one does not."""
    from fedrec.client.runtime import local_config
    from fedrec.common.data.stream import load_stream
    from fedrec.server.secure_aggregation import secure_sum
    from fedrec.simulations.devices import device_reply, simulated_replies

    run = FederatedRun(small(tmp_path, **REPRODUCIBLE))  # deterministic draws
    config = run.config
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    users = [int(u) for u in run.registered if not stream.deliveries(int(u), 0, 1)]
    at_once = simulated_replies(config, users, 1, run.params)
    one_each = secure_sum(
        [device_reply(config, u, 1, run.params) for u in users], run.params, run.update_bound
    )
    pooled = {name: next(r for r in out if r.pooled) for name, out in
              (("at_once", at_once), ("one_each", one_each))}  # fmt: skip
    assert pooled["at_once"].pooled == pooled["one_each"].pooled == len(users)
    for key in ("noise_only", "declined", "trained", "examples"):
        assert pooled["at_once"].metrics[key] == pooled["one_each"].metrics[key], key
    idle = pooled["at_once"].metrics["noise_only"]
    assert idle >= 10 and pooled["at_once"].metrics["trained"] == 0  # nothing arrived yet
    share = local_config(config, None).update_noise_std()
    for out in pooled.values():
        change = np.concatenate([v.ravel() for v in out.params.values()]).astype(np.float64)
        # n coordinates: the sample std is within ~1/sqrt(2n) of sqrt(k)*s; one share's std
        # (the sum's without the sqrt(k)) is sqrt(k) >= 3x off
        assert change.size > 300
        assert np.std(change) == pytest.approx(share * np.sqrt(idle), rel=0.2)
        assert abs(np.mean(change)) < 5 * share * np.sqrt(idle / change.size)
    # reproducible noise repeats; secure noise never does
    name = next(iter(run.params))
    again = next(r for r in simulated_replies(config, users, 1, run.params) if r.pooled)
    np.testing.assert_array_equal(again.params[name], pooled["at_once"].params[name])
    secure = small(tmp_path / "secure")
    draws = [next(r for r in simulated_replies(secure, users, 1, run.params) if r.pooled)
             for _ in range(2)]  # fmt: skip
    assert not np.array_equal(draws[0].params[name], draws[1].params[name])
    # a failed device is not a member, and owes no share
    failed = [DeviceReply(users[0], None, 0, {"noise_only": 1.0}, error="store unreadable")]
    out = secure_sum(failed, run.params, None, lambda k: pytest.fail(f"{k} shares drawn"))
    assert not any(r.pooled for r in out)


def test_a_device_whose_update_is_invalid_is_a_failure_not_part_of_the_sum():
    """secure_sum checks each update before it joins (what input validation does in a secure
    aggregation protocol): a NaN update is that device's failure, with its reason."""
    from fedrec.server.secure_aggregation import secure_sum

    received = {"w": np.zeros((2, 3), np.float32)}
    good = DeviceReply(1, {"w": np.ones((2, 3), np.float32)}, 1, {"loss": 2.0, "declined": 0.0})
    bad = DeviceReply(2, {"w": np.full((2, 3), np.nan, np.float32)}, 1, {"loss": 1.0})
    out = secure_sum([good, bad], received)
    pooled = [r for r in out if r.pooled]
    assert len(pooled) == 1 and pooled[0].pooled == 1
    np.testing.assert_array_equal(pooled[0].params["w"], np.ones((2, 3), np.float32))
    assert pooled[0].metrics["loss"] == 2.0 and pooled[0].metrics["trained"] == 1.0
    failed = next(r for r in out if r.user == 2)
    assert failed.error is not None and "non-finite" in failed.error


def test_the_sum_through_flower_records_counts_only_devices_whose_update_is_in_it(flower_task):
    """A slot's reply under secure aggregation, packed by the ClientApp and unpacked by the
    ServerApp: a device that sent no update (declined without a noise share) and a failed one
    are not members of the sum, so K_min and the user-level noise credit never count them."""
    from flwr.app import Message

    from fedrec.server.secure_aggregation import secure_sum
    from fedrec.simulations.client_app import pack_devices
    from fedrec.simulations.server_app import unpack_devices

    received = {"w": np.zeros((2, 3), np.float32)}
    sent = DeviceReply(1, {"w": np.ones((2, 3), np.float32)}, 1, {"loss": 1.0})
    silent = DeviceReply(2, None, 0, {"declined": 1.0})
    failed = DeviceReply(3, None, 0, {}, error="store unreadable")
    replies = secure_sum([sent, silent, failed], received)
    content = pack_devices([1, 2, 3], replies, received, secure=True)
    out = unpack_devices([1, 2, 3], Message(content, dst_node_id=1, message_type="train"))
    pooled = [r for r in out if r.pooled]
    assert len(pooled) == 1 and pooled[0].pooled == 1
    np.testing.assert_array_equal(pooled[0].params["w"], received["w"] + 1)
    assert [r.error is not None for r in out if not r.pooled] == [False, False, True]
    # the server's K_min rule sees one survivor, not two
    run_row_survivors = sum(r.pooled for r in out)
    assert run_row_survivors == 1


def test_settings_that_cannot_aggregate_are_refused_before_anything_is_delivered(small, tmp_path):
    """30 devices with the default K_min (2,350): every round would be discarded. The run is
    refused at construction, naming a flag that exists, and no device store is created; the
    CLI exits 2 with the same message before starting Flower."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.server.federated_run import SettingsError

    config = small(tmp_path, **{"min-survivors": 2350})
    with pytest.raises(SettingsError, match=r"--min-survivors 2350 .*at most \d+"):
        FederatedRun(config)
    assert not (config.out / "clients").exists()
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--dataset", "synthetic", "--synthetic", small.flat["synthetic"],
            "--rounds", "2", "--min-survivors", "2350", "--out", str(tmp_path / "cli"),
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--min-survivors" in result.output and "at most" in result.output
    assert not (tmp_path / "cli" / "clients").exists()
    # the flag it names works: the suggested K_min is accepted
    suggested = int(result.output.split("at most ")[1].split()[0].rstrip(";,"))
    FederatedRun(small(tmp_path / "ok", **{"min-survivors": suggested, "clients-per-round": 2700}))


def test_a_delta_not_below_one_over_n_is_refused(small, tmp_path):
    from fedrec.server.federated_run import SettingsError

    with pytest.raises(SettingsError, match=r"--delta 0.01 .*user-level DP would be void"):
        FederatedRun(small(tmp_path, delta=0.01))  # 120 devices: 1/N = 0.0083
    with pytest.raises(SettingsError, match="per-interaction DP would be void"):
        FederatedRun(small(tmp_path, delta=0.001, dp="local"))  # ~1,400 interactions


def test_a_void_guarantee_is_never_stated_as_held(small, tmp_path):
    from fedrec.simulations.report import void_unless_delta_holds

    run = FederatedRun(small(tmp_path))
    held = {"name": "x", "unit": "one device", "epsilon": 1.0, "delta": 1e-6}
    assert void_unless_delta_holds(held, 1e-5, run)["earned"] is True
    over = void_unless_delta_holds({**held, "delta": 1.0}, 1e-5, run)
    assert over["earned"] is False and "exceeds the target" in over["why_not"]
    # below the target but not below 1/N (120 devices)
    loose = void_unless_delta_holds({**held, "delta": 0.009}, 0.01, run)
    assert loose["earned"] is False and "1/N" in loose["why_not"]


def test_a_discarded_round_reveals_only_that_it_was_discarded(small, tmp_path):
    """Fewer than K_min devices in the sum: the model stays, and the round's row in
    metrics.jsonl carries none of the sum's counters (losses, prequential hits, declines)."""
    from fedrec.server.secure_aggregation import secure_sum
    from fedrec.simulations.devices import device_reply

    run = FederatedRun(small(tmp_path))
    before = {n: v.copy() for n, v in run.params.items()}
    users = [int(u) for u in run.sample(1)][:2]  # 2 < K_min = 3
    replies = secure_sum([device_reply(run.config, u, 1, run.params) for u in users], run.params)
    row = run.finish_round(1, replies, 0.0)
    assert row["discarded"] is True
    for name in before:
        np.testing.assert_array_equal(run.params[name], before[name])
    written = json.loads((run.out / "metrics.jsonl").read_text().splitlines()[-1])
    leaks = {"loss", "declined", "noise_only", "preq_count", "preq_hr@10", "preq_ndcg@10",
             "retired_now", "max_interaction_epsilon_sampled_at_most"}  # fmt: skip
    assert not leaks & set(written), leaks & set(written)
    assert written["aggregated"] == 2 and written["sampled"] == 2


def test_a_validation_run_never_delivers_or_reads_the_validation_or_test_rows(small, tmp_path):
    """--evaluate-on validation: the stream stops before each user's validation row, the
    target is that row, and the summary says so; the test rows are in neither."""
    from fedrec.common.data.stream import load_stream

    config = small(tmp_path, **{"evaluate-on": "validation"})
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    full = load_stream(config.data, config.rounds, config.protocol)

    def keys(rows):
        return set(
            zip(rows.user.tolist(), rows.item.tolist(), rows.timestamp.tolist(), strict=True)
        )

    delivered, valid, test = keys(stream.rows), keys(full.split.valid), keys(full.split.test)
    assert valid and not delivered & valid and not delivered & test
    assert keys(stream.split.test) == valid
    summary = finalize(run_in_process(config))
    assert summary["evaluated_on"] == "validation" and "test" not in summary
    assert 0 <= summary["validation"]["ndcg@10"] <= 1 and "validation_baselines" in summary


def test_resume_refuses_changed_settings_and_never_rewrites_the_recorded_ones(small, tmp_path):
    """A run stopped after round 1, resumed with a raised budget, --dp off or other rounds:
    each refused naming the setting; config.json is unchanged; an unchanged resume works.
    --resume on a folder that holds no run is an error."""
    from typer.testing import CliRunner

    from fedrec.cli import app
    from fedrec.server.federated_run import SettingsError

    config = small(tmp_path, rounds=2)
    run = FederatedRun(config)
    run.finish_round(1, [], 0.0)
    recorded = (config.out / "config.json").read_text()
    for change, named in (
        ({"epsilon": 1000.0}, "epsilon (recorded 8.0, now 1000.0)"),
        ({"dp": "off"}, "dp (recorded 'user+distributed', now 'off')"),
        ({"rounds": 20}, "rounds (recorded 2, now 20)"),
    ):
        with pytest.raises(SettingsError, match=re.escape(named)):
            FederatedRun(small(tmp_path, **({"rounds": 2, "resume": True} | change)))
    assert (config.out / "config.json").read_text() == recorded
    assert FederatedRun(small(tmp_path, rounds=2, resume=True)).next_round == 2
    result = CliRunner().invoke(
        app, ["simulate", "--resume", "--out", str(tmp_path / "nothing-here")]
    )
    assert result.exit_code == 2 and "holds no run to continue" in result.output
    assert not (tmp_path / "nothing-here").exists()
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--resume", "--out", str(config.out), "--dataset", "synthetic",
            "--synthetic", small.flat["synthetic"], "--epsilon", "1000",
        ],
    )  # fmt: skip
    assert result.exit_code == 2 and "epsilon (recorded 8.0, now 1000.0)" in result.output


def test_the_server_bounds_every_update_whatever_the_device_claims(small, tmp_path):
    """One device of several adds 1e30 (or scales its change by 1e4): its update is dropped
    with the reason counted, the honest ones are aggregated and the model stays finite.
    Honest devices, noise included, are never dropped; under secure aggregation the same
    bound is the input check of the sum."""
    from fedrec.server.secure_aggregation import secure_sum
    from fedrec.simulations.devices import device_reply

    run = FederatedRun(small(tmp_path, dp="user+local"))  # the server sees each update
    users = [int(u) for u in run.sample(1)]
    replies = [device_reply(run.config, u, 1, run.params) for u in users]
    trained = [r for r in replies if r.params is not None]
    assert len(trained) >= 3
    name = next(iter(run.params))
    boosted = {**trained[0].params, name: trained[0].params[name] + np.float32(1e30)}
    scaled = {n: run.params[n] + 1e4 * (v - run.params[n]) for n, v in trained[1].params.items()}
    attacked = [
        dataclasses.replace(trained[0], params=boosted),
        dataclasses.replace(trained[1], params=scaled),
        *trained[2:],
    ]
    row = run.finish_round(1, attacked, 0.0)
    assert row["dropped"] == 2 and row["aggregated"] == len(trained) - 2
    assert all("exceeds the bound" in r for r in row["dropped_reasons"])
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in run.params.values())
    honest = FederatedRun(small(tmp_path / "honest", dp="user+local"))
    row = honest.finish_round(1, replies, 0.0)
    assert row["dropped"] == 0
    # the input check of the secure sum: the boosted device fails, the others are summed
    secure = FederatedRun(small(tmp_path / "secure"))
    replies = [device_reply(secure.config, u, 1, secure.params) for u in users]
    first = next(r for r in replies if r.params is not None)
    bad = {**first.params, name: first.params[name] + np.float32(1e30)}
    out = secure_sum(
        [dataclasses.replace(first, params=bad), *replies[1:]], secure.params, secure.update_bound
    )
    assert "exceeds the bound" in next(r for r in out if r.user == first.user).error
    assert next(r for r in out if r.pooled).pooled == len(replies) - 1


def test_a_run_whose_model_stops_being_finite_stops_without_publishing_it(
    small, tmp_path, monkeypatch
):
    """An aggregate that overflows (simulated: the server step returns inf) stops the run with
    an error naming the parameter; no checkpoint of that round is written."""
    from fedrec.server import federated_run
    from fedrec.server.federated_run import ModelNotFiniteError
    from fedrec.simulations.devices import device_reply

    run = FederatedRun(small(tmp_path, dp="user+local"))
    replies = [device_reply(run.config, int(u), 1, run.params) for u in run.sample(1)]
    real = federated_run.aggregate

    def overflowing(*args, **kwargs):
        params, state, diag = real(*args, **kwargs)
        name = next(iter(params))
        return {**params, name: params[name] * np.float32(np.inf)}, state, diag

    monkeypatch.setattr(federated_run, "aggregate", overflowing)
    with pytest.raises(ModelNotFiniteError, match="non-finite values in"):
        run.finish_round(1, replies, 0.0)
    assert not list((run.out / "checkpoints").glob("round-*.npz"))


# -- secret noise and sampling ---------------------------------------------------------------------
def test_two_private_runs_with_the_same_seed_publish_different_models(small, tmp_path):
    """DP noise and sampling come from a CSPRNG under fresh keys, not from --seed: the same
    config and seed twice publish different models. Opting into reproducible noise makes
    them identical, and the summary then states that no guarantee holds."""
    first, second = (run_in_process(small(tmp_path / n, rounds=2)) for n in "ab")
    assert any(not np.array_equal(first.params[k], second.params[k]) for k in first.params)
    assert finalize(first)["privacy"]["guarantees"]
    same = [run_in_process(small(tmp_path / n, rounds=2, **REPRODUCIBLE)) for n in "cd"]
    assert all(np.array_equal(same[0].params[k], same[1].params[k]) for k in same[0].params)
    privacy = finalize(same[0])["privacy"]
    assert privacy["guarantees"] == []
    assert privacy["void_reason"].startswith("reproducible noise")
    assert json.loads((same[0].out / "config.json").read_text())["reproducible-noise"] is True


def test_the_servers_noise_cannot_be_regenerated_from_the_run_folder(small, tmp_path):
    """A round with no device in it publishes the server's user-level noise alone (times the
    server learning rate). Regenerated from config.json's seed by the old recipe
    (numpy's generator seeded [seed, round, 1]), it must be unrelated to the published step;
    under reproducible noise the run's own recipe regenerates it exactly (why that voids DP)."""
    from fedrec.common.privacy.randomness import PrivacyRandomness
    from fedrec.server.user_privacy import aggregate_noise_std

    def published_and_regenerated(run, regenerate):
        before = {k: v.astype(np.float64) for k, v in run.params.items()}
        run.finish_round(1, [], 0.0)
        flat = json.loads((run.out / "config.json").read_text())
        std = aggregate_noise_std(
            noise_multiplier=run.server_noise_multiplier,
            clip_norm=run.config.user_sensitivity,
            expected_clients=run.sample_rate * len(run.registered),
        )
        rng = regenerate(flat["seed"])
        step = np.concatenate([(run.params[k] - before[k]).ravel() for k in before])
        noise = np.concatenate(
            [rng.normal(0.0, std, size=v.shape).ravel() for v in before.values()]
        )
        return step, noise * float(flat["server-lr"])

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    plain = {"dp": "user", "server-bias-decay": 0.0}  # the step is then the noise alone
    run = FederatedRun(small(tmp_path / "secret", **plain))
    assert run.server_noise_multiplier > 0
    step, old_recipe = published_and_regenerated(run, lambda s: np.random.default_rng([s, 1, 1]))
    assert step.size > 500 and abs(cosine(step, old_recipe)) < 0.2
    run = FederatedRun(small(tmp_path / "seeded", **plain, **REPRODUCIBLE))
    step, own = published_and_regenerated(
        run, lambda s: PrivacyRandomness.reproducible_from(s, "user-noise", 1)
    )
    assert cosine(step, own) > 0.999


def test_device_sampling_is_secret_and_poisson(small, tmp_path):
    """Who is sampled cannot be regenerated from the seed (the old recipe: numpy's generator
    seeded [seed, round]); the same round sampled twice differs; each device joins at rate q."""
    config = small(tmp_path)
    run = FederatedRun(config)
    seed = json.loads((config.out / "config.json").read_text())["seed"]
    n, q = len(run.registered), run.sample_rate
    for round_ in (1, 2, 3):
        old = run.registered[np.random.default_rng([seed, round_]).random(n) < q]
        assert not np.array_equal(run.sample(round_), old)
    assert not np.array_equal(run.sample(1), run.sample(1))
    sizes = [len(run.sample(1)) for _ in range(300)]
    assert abs(np.mean(sizes) - q * n) < 5 * np.sqrt(q * (1 - q) * n / 300)


def test_the_launcher_stops_following_once_a_new_summary_is_written(tmp_path):
    """`fedrec simulate` returns when the ServerApp has replaced summary.json (its last
    write), not after Flower's shutdown; a summary left by an earlier run does not count."""
    import threading
    import time

    from fedrec.common.io import atomic_write_json
    from fedrec.simulations import launcher

    config = SimulationConfig.from_flat({"out": str(tmp_path)})
    summary = tmp_path / "summary.json"
    atomic_write_json(summary, {"run": "earlier"})
    before = launcher._file_identity(summary)

    logs = subprocess.Popen(["sleep", "1"])  # the log stream ends, no new summary
    assert launcher._follow(config, logs, 30, "none", before) == "ended"

    logs = subprocess.Popen(["sleep", "60"])  # still streaming when the report lands
    writer = threading.Timer(1.0, atomic_write_json, (summary, {"run": "this one"}))
    try:
        writer.start()
        started = time.monotonic()
        assert launcher._follow(config, logs, 30, "none", before) == "summarized"
        assert time.monotonic() - started < 10
    finally:
        writer.cancel()
        logs.kill()
        logs.wait()


def test_a_device_commitment_follows_its_ledger_after_every_append(tmp_path):
    """The head behind a simulated device's commitment is cached while its ledger file stays
    the same: any append (or a ledger made anew) gives the commitment of the new head."""
    from fedrec.common.privacy.accounting import Mechanism
    from fedrec.simulations.devices import _last_hash

    path = tmp_path / "u1" / "ledger.jsonl"
    assert _last_hash(path) is None
    mechanism = Mechanism(noise_multiplier=1.0, sample_rate=0.5, steps=1, clip_norm=1.0, delta=1e-5)
    for round_ in (1, 2, 3):
        with PrivacyLedger.open(path) as ledger:
            ledger.append_train(round_, mechanism, {f"w{round_:04d}": 1})
            head = ledger.head_hash
        assert _last_hash(path) == head
        assert _last_hash(path) == head  # cached: the same answer
    path.unlink()
    with PrivacyLedger.open(path) as ledger:
        ledger.append_train(1, mechanism, {"w0001": 2})
        assert _last_hash(path) == ledger.head_hash

"""A real device: config, ingestion, policy, its round, status and recommendations."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from fedrec.client.device import (
    DeviceConfig,
    DeviceConfigError,
    PrivacyPolicy,
    ingest,
    load_device_config,
    recommend,
    status,
    validate_lines,
)
from fedrec.client.device_round import device_round, policy_violation, reply_metrics, round_settings
from fedrec.client.store import ClientStore, StoreError
from fedrec.common.config import DataConfig

NOW = 1_700_000_000
ITEMS = {str(i) for i in range(60)}
# a tiny public catalogue: the synthetic generator with hashed text (no encoder to load)
RUN = {
    "dataset": "synthetic",
    "synthetic": "num_users=30,num_items=60",
    "rounds": 3,
    "dp": "local",
    "local-noise-multiplier": 1.0,
    "model-dim": 8,
    "model-text-dim": 8,
    "num-negatives": 5,
    "epsilon": 50.0,
}


def test_validation_names_each_rejected_line():
    lines = [
        "item,timestamp",
        "1,1000",
        '{"item": "2", "timestamp": "2023-11-14T22:13:20Z"}',
        "999,1000",  # unknown item
        "3,yesterday",  # bad timestamp
        "4,-5",  # before 1970
        "1,1000",  # duplicate inside the file
        "5,1000",  # duplicate of a stored one
        "{not json",
        "6,1,2",
        "",
    ]
    accepted, rejected = validate_lines(lines, ITEMS, {("5", 1000)}, now=NOW)
    assert accepted == [("1", 1000), ("2", NOW)]
    assert [r.split(":")[0] for r in rejected] == [f"line {n}" for n in (4, 5, 6, 7, 8, 9, 10)]
    assert "unknown item '999'" in rejected[0]
    assert "bad timestamp 'yesterday'" in rejected[1]
    assert "duplicate" in rejected[3] and "duplicate" in rejected[4]
    assert "invalid JSON" in rejected[5]
    assert "expected 2 CSV fields" in rejected[6]


def test_ingest_keeps_the_valid_lines_and_never_touches_what_is_stored(tmp_path):
    report = ingest(tmp_path, ["1,100", "2,200", "x,300"], ITEMS, now=NOW)
    assert report.added == 2 and len(report.rejected) == 1
    again = ingest(tmp_path, ["1,100", "3,300"], ITEMS, now=NOW)
    assert again.added == 1 and "duplicate" in again.rejected[0]
    with ClientStore(tmp_path) as store:
        data = store.interactions()
    assert data.item.tolist() == ["1", "2", "3"]
    assert len(set(data.cohort.tolist())) == 2  # one cohort per ingestion
    nothing = ingest(tmp_path, ["bad"], ITEMS, now=NOW)
    assert nothing.added == 0 and nothing.cohort is None


def test_device_config_file(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(
        '[device]\nstore = "phone"\n[policy]\nepsilon = 4.0\nmin-noise-multiplier = 1.5\n'
    )
    config = load_device_config(path)
    assert config.store == tmp_path / "phone"
    assert config.policy.epsilon == 4.0 and config.policy.min_noise_multiplier == 1.5
    assert config.policy.allow_evaluation_metrics is False
    assert load_device_config(path, tmp_path / "other").store == tmp_path / "other"
    path.write_text("[policy]\nbudget = 3\n")
    with pytest.raises(DeviceConfigError, match="unknown"):
        load_device_config(path, tmp_path)


@pytest.mark.parametrize("line", ["epsilon = inf", "epsilon = nan", "max-clip-norm = nan"])
def test_a_policy_that_is_not_finite_is_refused(tmp_path, line):
    # TOML reads inf and nan: epsilon = inf was accepted, a device without any budget
    path = tmp_path / "device.toml"
    path.write_text(f"[policy]\n{line}\n")
    with pytest.raises(DeviceConfigError, match="every number must be finite"):
        load_device_config(path, tmp_path)


def test_the_policy_decides_not_the_server():
    policy = PrivacyPolicy(epsilon=2.0, min_noise_multiplier=1.2, max_clip_norm=0.5)
    settings = round_settings(policy, RUN | {"clip-norm": 0.5, "local-noise-multiplier": 1.5})
    assert settings.budget_epsilon == 2.0 and settings.seed is None  # the device's budget
    assert policy_violation(policy, settings) is None
    low = round_settings(policy, RUN | {"clip-norm": 0.5})
    assert "noise multiplier 1 is below" in policy_violation(policy, low)
    wide = round_settings(policy, RUN | {"local-noise-multiplier": 1.5})
    assert "clipping norm 1 is above" in policy_violation(policy, wide)
    plain = round_settings(policy, RUN | {"dp": "off"})
    assert "without DP-SGD" in policy_violation(policy, plain)
    # a server asking for noise derived from its seed is not obeyed: the device's is secret
    asked = round_settings(policy, RUN | {"clip-norm": 0.5, "reproducible-noise": True})
    assert asked.reproducible_noise is False and asked.seed is None


@pytest.fixture(scope="module")
def synthetic_items() -> list[str]:
    data = DataConfig(dataset="synthetic", synthetic={"num_users": "30", "num_items": "60"})
    return [str(i) for i in data.load().catalogue.item_ids]


def _global(run):
    from fedrec.client.runtime import template_for
    from fedrec.common.run_config import SimulationConfig
    from fedrec.common.run_model import global_parameters

    model, _ = template_for(SimulationConfig.from_flat(run))
    return global_parameters(model)


def test_a_device_round_then_status_and_recommend(tmp_path, synthetic_items):
    device = DeviceConfig(store=tmp_path, policy=PrivacyPolicy(epsilon=50.0))
    ingest(
        tmp_path,
        [f"{i},{1000 + n}" for n, i in enumerate(synthetic_items[:8])],
        set(synthetic_items),
    )
    params = _global(RUN)
    result = device_round(device, RUN, 1, params)
    assert result.declined is None and result.params is not None
    # evaluation metrics stay on the device unless its policy allows them
    assert reply_metrics(result, device.policy) == {}
    assert "preq_count" in reply_metrics(
        result, PrivacyPolicy(epsilon=50.0, allow_evaluation_metrics=True)
    )
    info = status(tmp_path, device.policy)
    assert info["interactions"] == 8 and info["rounds_trained"] == [1]
    assert 0 < info["max_epsilon"] < 50 and info["remaining_epsilon"] == 50 - info["max_epsilon"]
    top = recommend(tmp_path, k=5)
    assert len(top) == 5 and not {i for i, _ in top} & set(synthetic_items[:8])
    # a declined round trains nothing and writes nothing to the ledger
    strict = DeviceConfig(store=tmp_path, policy=PrivacyPolicy(min_noise_multiplier=5.0))
    declined = device_round(strict, RUN, 2, params)
    assert declined.params is None and "below" in declined.declined
    assert status(tmp_path, device.policy)["ledger_entries"] == info["ledger_entries"]


def test_a_device_declines_a_run_that_trains_local_parameters(tmp_path, synthetic_items):
    """Its policy is a per-interaction budget, which no run with a LOCAL user vector can keep:
    it trains nothing and writes nothing to its ledger."""
    device = DeviceConfig(store=tmp_path, policy=PrivacyPolicy(epsilon=50.0))
    ingest(tmp_path, [f"{synthetic_items[0]},1000"], set(synthetic_items))
    run = RUN | {"dp": "user+local", "model-user-embedding": "true"}
    result = device_round(device, run, 1, _global(run))
    assert result.params is None and "model-user-embedding" in result.declined
    assert status(tmp_path, device.policy)["ledger_entries"] == 0


def test_a_corrupted_store_is_a_clear_error(tmp_path, synthetic_items):
    ingest(tmp_path, [f"{synthetic_items[0]},1000"], set(synthetic_items))
    (tmp_path / "store.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"store.sqlite{suffix}").unlink(missing_ok=True)
    device = DeviceConfig(store=tmp_path)
    with pytest.raises(StoreError, match=r"store\.sqlite"):
        device_round(device, RUN, 1, _global(RUN))
    with pytest.raises((StoreError, sqlite3.DatabaseError)):
        ingest(tmp_path, ["1,1"], ITEMS)


def test_recommend_needs_a_global_model(tmp_path):
    with pytest.raises(StoreError, match="no global model"):
        recommend(tmp_path)
    assert json.loads(json.dumps(np.float64(1.0).item())) == 1.0


def _run_catalogue(tmp_path):
    """The public catalogue file of RUN, written the way `fedrec server start` writes it."""
    from fedrec.server.superlink import ServerConfig, write_run_catalogue

    path = tmp_path / "public-catalogue.npz"
    return path, write_run_catalogue(ServerConfig(run=dict(RUN)), path)


def test_a_device_with_the_public_catalogue_file_never_loads_a_dataset(tmp_path, synthetic_items):
    """The model a device builds from the server's public catalogue file is the server's own
    (same initial parameters and buffers), with no dataset anywhere on the device: its
    DataConfig names a file that does not exist. A copy that is not the run's is an error."""
    import torch

    from fedrec.client.device import catalogue_items
    from fedrec.client.runtime import template_for, template_from_catalogue
    from fedrec.common.data.public_catalogue import PublicCatalogueError, read_public_catalogue
    from fedrec.common.data.stream import load_stream
    from fedrec.common.run_config import SimulationConfig
    from fedrec.common.run_model import build_model

    path, digest = _run_catalogue(tmp_path)
    config = SimulationConfig.from_flat(RUN)
    stream = load_stream(config.data, config.rounds, config.protocol)
    server_model = build_model(config.data, config.model, stream)  # fresh, as the server builds
    _, server_index = template_for(config)
    device_model, device_index = template_from_catalogue(path, config, digest)
    assert device_index == server_index
    server_state, device_state = server_model.state_dict(), device_model.state_dict()
    assert server_state.keys() == device_state.keys()
    for name, value in server_state.items():
        assert torch.equal(value, device_state[name]), name
    assert torch.equal(server_model.text, device_model.text)
    assert read_public_catalogue(path).digest == digest  # stable across a write and a read

    store = tmp_path / "dev"
    no_data = DataConfig(dataset="csv", path=str(tmp_path / "no-such-ratings.csv"))
    device = DeviceConfig(
        store=store, data=no_data, policy=PrivacyPolicy(epsilon=50.0), catalogue=path
    )
    known = set(catalogue_items(device.data, device.catalogue))
    assert known == set(synthetic_items)
    ingest(store, [f"{i},{1000 + n}" for n, i in enumerate(synthetic_items[:8])], known)
    result = device_round(device, RUN, 1, _global(RUN), catalogue_digest=digest)
    assert result.declined is None and result.params is not None
    top = recommend(store, k=5, catalogue=path)
    assert len(top) == 5 and not {i for i, _ in top} & set(synthetic_items[:8])
    with pytest.raises(PublicCatalogueError, match="not the run's"):
        device_round(device, RUN, 2, _global(RUN), catalogue_digest="0" * 64)


@pytest.mark.parametrize("damage", ["truncated", "missing key", "nan features"])
def test_a_bad_public_catalogue_file_is_a_clear_error(tmp_path, damage):
    from fedrec.common.data.public_catalogue import PublicCatalogueError, read_public_catalogue

    path, _ = _run_catalogue(tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
        match = "unreadable public catalogue"
    else:
        with np.load(path, allow_pickle=False) as data:
            values = {k: data[k] for k in data.files}
        if damage == "missing key":
            del values["time_range"]
            match = r"missing \['time_range'\]"
        else:
            values["text_features"][0, 0] = np.nan
            match = "finite values"
        np.savez(path, **values)
    with pytest.raises(PublicCatalogueError, match=match):
        read_public_catalogue(path)


def test_under_local_dp_a_device_with_or_without_an_interaction_replies_alike(
    tmp_path, synthetic_items
):
    """Neighbouring devices for per-interaction local DP: one holds a single interaction, the
    other the same store without it. Both send an update of the same shapes (trained, or noise
    only) and nothing else: no decline, no ε, nothing that says which one trained."""
    params = _global(RUN)
    replies = []
    for name, rows in (("with", [f"{synthetic_items[0]},1000"]), ("without", [])):
        folder = tmp_path / name
        ingest(folder, rows, set(synthetic_items))
        device = DeviceConfig(store=folder, policy=PrivacyPolicy(epsilon=50.0))
        result = device_round(device, RUN, 1, params)
        assert result.params is not None
        assert {k: v.shape for k, v in result.params.items()} == {
            k: v.shape for k, v in params.items()
        }
        replies.append(reply_metrics(result, device.policy))
    assert replies == [{}, {}]
    # both updates moved the model by noise of the same scale: neither is the model it received
    assert all(not np.array_equal(result.params[k], params[k]) for k in params), (
        "a noise-only update must carry noise"
    )

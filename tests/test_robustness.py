"""Malicious devices: every kind of bad reply refused and counted, per-row robust aggregation
and bias damping on tiny inputs with exact numbers, and an attack scenario end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.evaluation import exposure_ratio, metrics_from_ranks, rank_test_items
from fedrec.common.model import ModelScorer, served_bias_weights
from fedrec.common.replies import DeviceReply
from fedrec.common.train import history_before_test
from fedrec.server.federated_run import FederatedRun, SettingsError
from fedrec.server.robustness import cap_bias_change, damp_bias_jumps, robust_delta
from fedrec.server.secure_aggregation import secure_sum
from fedrec.simulations.attacks import (
    malicious_devices,
    malicious_draw,
    malicious_reply,
    run_targets,
)
from fedrec.simulations.devices import run_in_process
from fedrec.simulations.report import robustness
from fedrec.simulations.scenario import builtin_scenarios, scenario_settings

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def small(small):
    """The shared small run with its noise drawn from the seed: runs here are compared."""
    return lambda folder, **overrides: small(folder, **{"reproducible-noise": True} | overrides)


def test_each_kind_of_bad_reply_is_refused_with_its_kind_counted(small, tmp_path):
    run = FederatedRun(small(tmp_path, dp="user+local"))  # the server sees each update
    params = run.params
    config = run.config

    def attack(kind: str, user: int) -> DeviceReply:
        return malicious_reply(dataclasses.replace(config, attack=kind), user, 1, params)

    honest = DeviceReply(1, {n: v.copy() for n, v in params.items()}, 3)
    far = {n: v + np.float32(10.0) for n, v in params.items()}
    replies = [
        honest,
        DeviceReply(1, dict(honest.params), 3),  # the same device again
        attack("nan", 2),
        attack("inf", 3),
        attack("shape", 4),
        attack("malformed", 6),  # not a mapping (user % 3 == 0)
        attack("malformed", 7),  # a negative example count
        attack("malformed", 8),  # a metric that is no number
        DeviceReply(9, {n: v.astype(np.float64) for n, v in params.items()}, 3),
        DeviceReply(10, {k: v for k, v in params.items() if k != "item_table.weight"}, 3),
        DeviceReply(11, far, 3),  # beyond any honest device's bound
        attack("random", 12),  # at the bound: accepted, like an honest device's
    ]
    row = run.finish_round(1, replies, 0.0)
    assert row["dropped_kinds"] == {
        "duplicate": 1,
        "non-finite": 2,
        "shape": 1,
        "malformed": 1,
        "num-examples": 1,
        "metrics": 1,
        "dtype": 1,
        "names": 1,
        "norm": 1,
    }
    assert row["aggregated"] == 2 and row["dropped"] == 10
    assert all(np.isfinite(v).all() for v in run.params.values())


def test_the_secure_sums_input_check_refuses_bad_replies_and_the_server_counts_their_kind(
    small,
    tmp_path,
):
    run = FederatedRun(small(tmp_path))  # user+distributed: the server sees only the sum
    config = dataclasses.replace(run.config, attack="nan")
    bad = [malicious_reply(config, u, 1, run.params) for u in (2, 3)]
    good = DeviceReply(4, {n: v.copy() for n, v in run.params.items()}, 1, {})
    replies = secure_sum([*bad, good], run.params, run.update_bound)
    assert [r.rejected for r in replies if r.error] == ["non-finite", "non-finite"]
    row = run.finish_round(1, replies, 0.0)
    assert row["failed"] == 2 and row["dropped_kinds"] == {"non-finite": 2}


def test_per_row_robust_aggregation_gives_exact_numbers():
    zero = {"item_table.weight": np.zeros((3, 2), np.float32), "w": np.zeros(2, np.float32)}

    def update(rows, w):
        return {"item_table.weight": np.asarray(rows, np.float32), "w": np.asarray(w, np.float32)}

    updates = [
        update([[1, 0], [0, 0], [2, 2]], [1, 1]),
        update([[3, 0], [0, 0], [2, 2]], [2, 2]),
        update([[2, 0], [0, 0], [2, 2]], [3, 3]),
        update([[0, 0], [0, 0], [90, 90]], [100, -100]),  # row 2 far off, row 0 untouched
    ]
    median = robust_delta(zero, updates, row_tables=("item_table.weight",), method="median")
    # row 0: the median of the 3 devices that changed it (2), weighted 3 of 4; row 1: nobody;
    # row 2: the median of 2, 2, 2, 90 = 2, all 4 changed it; w: coordinate-wise over all 4
    np.testing.assert_allclose(median["item_table.weight"], [[1.5, 0], [0, 0], [2, 2]])
    np.testing.assert_allclose(median["w"], [2.5, 1.5])
    trimmed = robust_delta(
        zero, updates, row_tables=("item_table.weight",), method="trimmed-mean", trim=0.25
    )
    # row 0: 3 devices, floor(0.25 x 3) = 0 cut: mean 2, weighted 3/4; row 2: one cut from
    # each end of 4: mean(2, 2) = 2; w: mean of the middle two
    np.testing.assert_allclose(trimmed["item_table.weight"], [[1.5, 0], [0, 0], [2, 2]])
    np.testing.assert_allclose(trimmed["w"], [2.5, 1.5])
    # the row bound: each device's change of a row at most 2 in L2 before the plain mean;
    # row 0: (1, 0), (2, 0), (2, 0) averaged over 3, weighted 3/4
    bounded = robust_delta(
        zero, updates, row_tables=("item_table.weight",), method="mean", row_clip_norm=2.0
    )
    s = 2 / np.sqrt(8)  # (2, 2) and (90, 90) both scaled to norm 2
    np.testing.assert_allclose(
        bounded["item_table.weight"], [[1.25, 0], [0, 0], [2 * s, 2 * s]], rtol=1e-6
    )
    # negative control: without a defence the far-off device moves row 2 by 24
    plain = robust_delta(zero, updates, row_tables=("item_table.weight",), method="mean")
    np.testing.assert_allclose(plain["item_table.weight"][2], [24, 24])


def test_the_bias_cap_clips_each_items_change_exactly():
    change = np.array([-3.0, -0.5, 0.0, 0.9, 1.0, 7.0])
    capped, count = cap_bias_change(change, 1.0)
    np.testing.assert_array_equal(capped, [-1.0, -0.5, 0.0, 0.9, 1.0, 1.0])
    assert count == 2
    with pytest.raises(ValueError, match="cap must be > 0"):
        cap_bias_change(change, 0.0)


def test_a_bias_jump_beyond_what_the_items_bias_sustains_is_flagged_and_damped():
    change = np.array([0.0, 1.0, -1.0, 0.0, 0.0, 2.0, 10.0])  # median 0, MAD 1
    bias = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 8.0, 0.0])  # item 5 was popular already
    damped, flagged, threshold = damp_bias_jumps(change, bias, sustained=1.0, k=2.0)
    assert threshold == pytest.approx(2 * 1.4826)
    assert flagged == [6]  # item 5's rise is what its own bias sustains
    np.testing.assert_allclose(damped, [0.0, 1.0, -1.0, 0.0, 0.0, 2.0, 2 * 1.4826])


def test_the_server_damps_only_the_served_bias_of_the_published_aggregate(small, tmp_path):
    settings = {"bias-change-cap": 0.25, "server-bias-decay": 0.0, "server-lr": 1.0}
    run = FederatedRun(small(tmp_path, dp="off", **settings))
    params = run.params
    boosted = {n: v.copy() for n, v in params.items()}
    boosted["item_table.weight"][7] += 5.0  # every column of item 7's row
    boosted["year_table.weight"] += 1.0
    row = run.finish_round(1, [DeviceReply(1, boosted, 1)], 0.0)
    w = served_bias_weights(run.model)
    change = (run.params["item_table.weight"] - params["item_table.weight"]).astype(np.float64)
    assert change[7] @ w == pytest.approx(0.25, rel=1e-4)  # capped in score units
    assert np.abs(np.delete(change, 7, axis=0)).max() == 0  # no other item moved
    assert row["bias_capped"] == 1
    np.testing.assert_allclose(run.params["year_table.weight"], params["year_table.weight"] + 1)


def test_malicious_devices_and_targets_come_from_the_seed_and_scenarios_ship(small, tmp_path):
    config = small(tmp_path, attack="promote", **{"malicious-share": 0.1})
    chosen = malicious_devices(config)
    assert len(chosen) == 12 and chosen == malicious_devices(dataclasses.replace(config))
    other = malicious_devices(dataclasses.replace(config, seed=2))
    assert other != chosen
    assert malicious_devices(dataclasses.replace(config, attack="none")) == frozenset()
    assert len(run_targets(config)) == 2
    assert {"promote-1", "promote-5", "promote-10", "nan", "malformed"} <= set(builtin_scenarios())
    assert scenario_settings("promote-5")["malicious-share"] == 0.05
    with pytest.raises(ValueError, match="no shipped scenario"):
        scenario_settings("promote-50")
    with pytest.raises(ValueError, match="attack must be one of"):
        small(tmp_path, attack="boom")
    with pytest.raises(SettingsError, match="secure aggregation hides"):
        FederatedRun(small(tmp_path, **{"robust-aggregation": "median"}))  # user+distributed


def test_exposure_ratio_counts_users_with_a_target_in_their_top_k():
    history = UserHistories.from_interactions(
        Interactions(user=np.array([1]), item=np.array([3]), timestamp=np.array([0])),
        num_users=3,
    )
    scores = np.array([[0, 1, 2, 9, 4], [0, 1, 2, 9, 4], [9, 8, 7, 6, 5]], np.float32)

    def scorer(users):
        return scores[users]

    # user 0 ranks item 3 first; user 1 knows it; user 2 ranks it 4th
    assert exposure_ratio(scorer, users=np.arange(3), history=history, num_items=5,
                          targets=[3], k=3) == pytest.approx(1 / 3)  # fmt: skip
    assert exposure_ratio(scorer, users=np.arange(3), history=history, num_items=5,
                          targets=[3], k=4) == pytest.approx(2 / 3)  # fmt: skip


def measured(run: FederatedRun) -> dict:
    """The summary's robustness block of a finished run (`finalize` without its plots)."""
    lines = (run.out / "metrics.jsonl").read_text().splitlines()
    _, ranks = run.rank_and_evaluate()
    block = robustness(run, [json.loads(line) for line in lines], ranks)
    # the benign users' NDCG@10, taken from the run's one ranking, is that of their rows alone
    split, malicious = run.stream.split, list(malicious_draw(run.config))
    history = history_before_test(split, run.stream.dataset.num_users)
    alone = rank_test_items(
        ModelScorer(run.model, history), test=split.test.select(~np.isin(split.test.user, malicious)),
        history=history, num_items=run.model.num_items, sampled_negatives=0,
    )  # fmt: skip
    assert block["benign_ndcg@10"] == pytest.approx(metrics_from_ranks(alone.full)["ndcg@10"])
    return block


def test_a_promotion_attack_runs_end_to_end_and_the_bias_cap_lowers_its_exposure(small, tmp_path):
    """Under the default calibration (the server sees only the secure sum): 6 of 120 devices
    promote two items; capping each item's per-round bias change lowers their ER@10."""
    attack = {"attack": "promote", "malicious-share": 0.05, "rounds": 2}
    undefended = measured(run_in_process(small(tmp_path / "a", **attack)))
    defended = measured(run_in_process(small(tmp_path / "d", **attack, **{"bias-change-cap": 0.1})))
    assert undefended["malicious_devices"] == 6 and len(undefended["targets"]) == 2
    assert undefended["target_er@10"] > 0.5  # the attack works
    assert defended["target_er@10"] < undefended["target_er@10"]
    assert defended["bias_capped"] > 0

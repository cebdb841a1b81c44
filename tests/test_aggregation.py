"""Server aggregation: exact numbers on tiny arrays, validation reasons, noise, DP sensitivity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.server.aggregation import (
    ClientUpdate,
    ServerOptConfig,
    aggregate,
    init_server_state,
    validate_update,
)

FEDAVG = ServerOptConfig()


def f32(*values):
    return np.asarray(values, dtype=np.float32)


def params(a, b):
    return {"a": f32(*a), "b": f32(*b)}


GLOBAL = params([1, 1], [0, 0, 0])


def update(cid, a, b, n=1):
    return ClientUpdate(client_id=cid, params=params(a, b), num_examples=n)


def run(updates, *, cfg=FEDAVG, state=None, g=GLOBAL, **kwargs):
    state = init_server_state(g, cfg) if state is None else state
    return aggregate(g, updates, opt_cfg=cfg, opt_state=state, **kwargs)


# -- averaging -------------------------------------------------------------------------------------
def test_fedavg_weighted_by_examples():
    # deltas: a [1, 2], b [3, 0, 0] (1 example); a [4, 5], b [0, 3, 6] (3 examples)
    ups = [update("x", [2, 3], [3, 0, 0], n=1), update("y", [5, 6], [0, 3, 6], n=3)]
    new, state, diag = run(ups)
    np.testing.assert_array_equal(new["a"], f32(1 + 3.25, 1 + 4.25))  # (1*[1,2] + 3*[4,5]) / 4
    np.testing.assert_array_equal(new["b"], f32(0.75, 2.25, 4.5))
    assert new["a"].dtype == np.float32 and state.steps == 1
    assert diag.num_aggregated == 2 and diag.total_weight == 4 and diag.denominator == 4
    assert diag.fraction_clipped == 0 and diag.applied


def test_server_learning_rate_scales_the_average():
    ups = [update("x", [3, 5], [2, 0, 0])]
    new, _, _ = run(ups, cfg=ServerOptConfig(lr=0.5))
    np.testing.assert_array_equal(new["a"], f32(2, 3))
    np.testing.assert_array_equal(new["b"], f32(1, 0, 0))


def test_uniform_uses_realised_count_without_denominator():
    ups = [update("x", [2, 3], [0, 0, 0], n=1), update("y", [5, 6], [0, 0, 0], n=100)]
    new, _, diag = run(ups, weighting="uniform")
    np.testing.assert_array_equal(new["a"], f32(3.5, 4.5))  # mean of deltas [1,2], [4,5]
    assert diag.denominator == 2


def test_uniform_with_fixed_denominator():
    ups = [update("x", [2, 3], [1, 0, 0]), update("y", [5, 6], [0, 0, 3])]
    new, _, diag = run(ups, weighting="uniform", denominator=4.0)
    np.testing.assert_array_equal(new["a"], f32(1 + 5 / 4, 1 + 7 / 4))  # sum [5, 7] / 4
    np.testing.assert_array_equal(new["b"], f32(0.25, 0, 0.75))
    assert diag.denominator == 4.0 and diag.total_weight == 2


def test_fixed_denominator_needs_uniform_weighting():
    with pytest.raises(ValueError, match="uniform"):
        run([update("x", [1, 1], [0, 0, 0])], denominator=2.0)


def test_clipping_is_joint_over_all_parameters():
    # delta a [3, 0], b [0, 0, 4]: norm 5 over both parameters -> scaled by 1/5 = 0.2
    ups = [update("big", [4, 1], [0, 0, 4]), update("small", [1, 1.5], [0, 0, 0])]
    new, _, diag = run(ups, weighting="uniform", user_clip_norm=1.0, denominator=1.0)
    np.testing.assert_allclose(new["a"], f32(1 + 0.6, 1 + 0.5), rtol=1e-7)  # 0.2*[3,0] + [0,.5]
    np.testing.assert_allclose(new["b"], f32(0, 0, 0.8), rtol=1e-7)
    assert diag.fraction_clipped == 0.5
    assert diag.max_delta_norm == pytest.approx(5.0) and diag.mean_delta_norm == pytest.approx(2.75)


def test_fedadam_two_steps_by_hand():
    cfg = ServerOptConfig(name="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    g = {"a": f32(0, 0)}
    state = init_server_state(g, cfg)
    np.testing.assert_array_equal(state.m["a"], f32(0, 0))
    d1 = np.array([0.5, -2.0])
    new, state, _ = run(
        [ClientUpdate("x", {"a": d1.astype(np.float32)}, 1)], cfg=cfg, g=g, state=state
    )
    m1, v1 = 0.1 * d1, 0.01 * d1**2  # (1-β1) Δ, (1-β2) Δ²
    x1 = 0.1 * m1 / (np.sqrt(v1) + 1e-3)  # [0.1*0.05/0.051, -0.1*0.2/0.201]
    np.testing.assert_allclose(new["a"], x1, rtol=1e-6)
    np.testing.assert_allclose(x1, [0.005 / 0.051, -0.02 / 0.201])
    np.testing.assert_allclose(state.m["a"], m1, rtol=1e-6)
    np.testing.assert_allclose(state.v["a"], v1, rtol=1e-6)
    assert state.steps == 1

    d2 = np.array([1.0, 0.0])
    client = (x1 + d2).astype(np.float32)
    new2, state2, _ = run([ClientUpdate("x", {"a": client}, 1)], cfg=cfg, g=new, state=state)
    m2, v2 = 0.9 * m1 + 0.1 * d2, 0.99 * v1 + 0.01 * d2**2
    np.testing.assert_allclose(new2["a"], x1 + 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-5)
    assert state2.steps == 2


def test_fedadam_state_must_match():
    with pytest.raises(ValueError, match="init_server_state"):
        run([], cfg=ServerOptConfig(name="fedadam"), state=init_server_state(GLOBAL, FEDAVG))


# -- noise and empty rounds ------------------------------------------------------------------------
def test_noise_is_seeded_and_in_delta_units():
    ups = [update("x", [1, 1], [0, 0, 0])]  # zero delta: the step is the noise alone
    new, _, diag = run(ups, noise_std=0.5, rng=np.random.default_rng(7))
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(new["a"], (1.0 + rng.normal(0, 0.5, size=2)).astype(np.float32))
    np.testing.assert_array_equal(new["b"], rng.normal(0, 0.5, size=3).astype(np.float32))
    again, _, _ = run(ups, noise_std=0.5, rng=np.random.default_rng(7))
    assert all(np.array_equal(new[k], again[k]) for k in new)
    assert diag.noise_std == 0.5


def test_noise_needs_an_rng():
    with pytest.raises(ValueError, match="rng"):
        run([update("x", [1, 1], [0, 0, 0])], noise_std=1.0)


def test_zero_updates_leave_parameters_unchanged():
    state = init_server_state(GLOBAL, FEDAVG)
    new, state2, diag = run([], state=state)
    assert all(np.array_equal(new[k], GLOBAL[k]) for k in GLOBAL)
    assert state2 is state and not diag.applied and diag.num_aggregated == 0
    assert "no updates" in diag.note and "unchanged" in diag.note
    assert math.isnan(diag.mean_delta_norm)
    assert diag.as_metrics()["applied"] == 0.0


def test_zero_weight_updates_leave_parameters_unchanged():
    new, _, diag = run([update("x", [9, 9], [0, 0, 0], n=0)])
    assert np.array_equal(new["a"], GLOBAL["a"]) and not diag.applied
    assert "zero weight" in diag.note


def test_empty_sample_under_noise_is_still_noised():
    new, state, diag = run(
        [], weighting="uniform", denominator=2.0, noise_std=0.1, rng=np.random.default_rng(0)
    )
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(new["a"], (1.0 + rng.normal(0, 0.1, size=2)).astype(np.float32))
    assert diag.applied and state.steps == 1


# -- validation ------------------------------------------------------------------------------------
def test_validate_accepts_a_good_update():
    assert validate_update(params([1, 2], [3, 4, 5]), GLOBAL) is None


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (
            {"a": f32(1, np.nan), "b": f32(np.inf, np.nan, 0)},
            "'a': 1 non-finite value(s) of 2 (1 NaN, 0 inf)",
        ),
        (
            {"a": f32(1, 2), "b": f32(np.inf, -np.inf, np.nan)},
            "'b': 3 non-finite value(s) of 3 (1 NaN, 2 inf)",
        ),
        ({"a": f32(1, 2, 3), "b": f32(0, 0, 0)}, "'a': shape (3,), expected (2,)"),
        ({"a": f32(1, 2)}, "missing parameter(s): 'b'"),
        ({**GLOBAL, "c": f32(1)}, "unexpected parameter(s): 'c'"),
        ({"a": np.zeros(2), "b": f32(0, 0, 0)}, "'a': dtype float64, expected float32"),
        ({"a": [1.0, 2.0], "b": f32(0, 0, 0)}, "'a': a list, not a numpy array"),
        ([1, 2], "not a mapping"),
    ],
)
def test_validate_names_the_problem(bad, expected):
    reason = validate_update(bad, GLOBAL)
    assert reason is not None and expected in reason


def test_validate_never_raises():
    class Broken(dict):
        def __contains__(self, key):
            raise RuntimeError("boom")

    assert "could not be checked" in validate_update(Broken(), GLOBAL)


def test_aggregate_rejects_invalid_and_duplicate_updates():
    with pytest.raises(ValueError, match=r"client 'x'.*NaN"):
        run([update("x", [np.nan, 1], [0, 0, 0])])
    with pytest.raises(ValueError, match="more than one update"):
        run([update("x", [1, 1], [0, 0, 0]), update("x", [1, 1], [0, 0, 0])])
    with pytest.raises(ValueError, match="num_examples"):
        update("x", [1, 1], [0, 0, 0], n=-1)


# -- the DP property: one user's influence is bounded ------------------------------------------------
vectors = st.lists(st.floats(-100, 100, width=32), min_size=5, max_size=5)


@settings(max_examples=60, deadline=None)
@given(others=st.lists(vectors, min_size=0, max_size=4), user=vectors, clip=st.floats(0.1, 10))
def test_one_user_moves_the_average_by_at_most_clip_over_denominator(others, user, clip):
    def clients(vs):
        return [update(str(i), v[:2], v[2:]) for i, v in enumerate(vs)]

    kwargs = dict(weighting="uniform", user_clip_norm=clip, denominator=3.0)
    without, _, _ = run(clients(others), **kwargs)
    with_user, _, _ = run(clients([*others, user]), **kwargs)
    moved = math.sqrt(
        sum(float(np.sum((with_user[k] - without[k]).astype(np.float64) ** 2)) for k in GLOBAL)
    )
    assert moved <= clip / 3.0 * (1 + 1e-5) + 1e-5  # float32 rounding of the published params


def test_a_rounds_replies_are_sorted_into_updates_and_counts():
    """Without secure aggregation: a failure, a decline, an update past the bound and a
    malformed one are counted, the good update is kept. Under it: the sums are added into one
    and a device's own update is refused."""
    from fedrec.common.replies import DeviceReply
    from fedrec.server.round_replies import collect_updates

    g = params([0, 0], [0])
    replies = [
        DeviceReply(1, params([0.3, 0.4], [0]), 2),  # norm 0.5
        DeviceReply(2, params([3, 4], [0]), 2),  # norm 5
        DeviceReply(3, {"a": f32(0, 0)}, 2),
        DeviceReply(4, None, 0, error="crashed"),
        DeviceReply(5, None, 0, {"declined": 1.0}),
    ]
    plain = collect_updates(1, replies, g, secure=False, update_bound=1.0)
    assert [u.client_id for u in plain.updates] == ["1"]
    assert (plain.survivors, plain.declined, plain.failed, len(plain.dropped)) == (1, 1, 1, 2)
    assert sorted(plain.dropped_devices) == [2, 3] and plain.total is None
    sums = [DeviceReply(7, params([1, 1], [1]), 0, {"declined": 1.0}, pooled=3)]
    sums += [DeviceReply(9, params([2, 0], [1]), 0, {"declined": 0.0}, pooled=2)]
    secure = collect_updates(1, [*sums, *replies[:1]], g, secure=True, update_bound=1.0)
    assert secure.survivors == 5 and secure.total is not None
    assert [u.client_id for u in secure.updates] == ["secure-sum"]
    np.testing.assert_array_equal(secure.updates[0].params["a"], f32(3, 1))
    assert secure.total.metrics == {"declined": 1.0} and list(secure.dropped_devices) == [1]
    assert [r.user for r in secure.devices] == [1]

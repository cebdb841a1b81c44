"""Per-cohort RDP accounting: agreement with Opacus, distributed guarantee, invariants, speed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedrec.common.privacy.accounting import (
    ORDERS,
    Guarantee,
    Mechanism,
    cohort_epsilons,
    cohort_rdp,
    epsilon_from_rdp,
    epsilon_if,
    plan,
    rdp_of,
)

DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")


def mech(sigma=1.0, q=0.1, steps=10, k=None):
    agg = None if k is None else sigma * math.sqrt(k)
    return Mechanism(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        clip_norm=1.0,
        delta=DELTA,
        aggregate_noise_multiplier=agg,
        min_survivors=k,
    )


def train(seq, m, cohorts):
    return {
        "kind": "train",
        "seq": seq,
        "mechanism": m.to_dict(),
        "cohorts": dict.fromkeys(cohorts, 5),
    }


def survivors(seq, train_seq, n):
    return {"kind": "survivors", "seq": seq, "train_seq": train_seq, "n": n}


def retire(seq, cohorts):
    return {"kind": "retire", "seq": seq, "cohorts": sorted(cohorts)}


def test_orders_are_opacus_defaults():
    assert list(ORDERS) == RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": -0.1},
        {"noise_multiplier": math.nan},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"steps": -1},
        {"steps": 2.5},
        {"steps": True},
        {"clip_norm": 0.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"aggregate_noise_multiplier": 2.0},  # without min_survivors
        {"min_survivors": 4},  # without aggregate_noise_multiplier
        {"aggregate_noise_multiplier": 2.5, "min_survivors": 4},  # > σ·√K = 2
        {"aggregate_noise_multiplier": 1.0, "min_survivors": 0},
    ],
)
def test_mechanism_rejects_bad_values(bad):
    args = mech().to_dict() | bad
    with pytest.raises(ValueError):
        Mechanism(**args)


def test_mechanism_round_trips_and_normalises_types():
    m = Mechanism(
        noise_multiplier=1,
        sample_rate=1,
        steps=3,
        clip_norm=2,
        delta=1e-6,
        aggregate_noise_multiplier=2,
        min_survivors=4,
    )
    assert isinstance(m.noise_multiplier, float) and isinstance(m.steps, int)
    assert Mechanism.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError):
        Mechanism.from_dict(m.to_dict() | {"extra": 1})
    with pytest.raises(ValueError):
        Mechanism.from_dict({k: v for k, v in m.to_dict().items() if k != "delta"})


def test_rdp_of_is_compute_rdp_exactly():
    m = mech(sigma=1.3, q=0.07, steps=17)
    expected = compute_rdp(q=0.07, noise_multiplier=1.3, steps=17, orders=list(ORDERS))
    assert np.array_equal(rdp_of(m), expected)
    assert np.array_equal(
        rdp_of(m, sigma_override=2.0),
        compute_rdp(q=0.07, noise_multiplier=2.0, steps=17, orders=list(ORDERS)),
    )
    assert np.all(rdp_of(mech(steps=0)) == 0)
    assert np.all(np.isinf(rdp_of(mech(sigma=0.0))))
    assert np.all(rdp_of(mech(sigma=0.0, steps=0)) == 0)  # no step, no release: not inf·0 = nan


def test_epsilon_from_rdp_matches_opacus_and_edge_cases():
    rdp = rdp_of(mech(sigma=0.9, q=0.2, steps=50))
    eps, order = epsilon_from_rdp(rdp, DELTA)
    assert (eps, order) == tuple(
        float(x) for x in get_privacy_spent(orders=ORDERS, rdp=rdp, delta=DELTA)
    )
    assert epsilon_from_rdp(np.zeros(len(ORDERS)), DELTA)[0] == 0.0
    assert epsilon_from_rdp(np.full(len(ORDERS), np.inf), DELTA)[0] == math.inf


HISTORY = [
    (mech(1.1, 0.05, 20), ["a", "b"]),
    (mech(1.1, 0.05, 20), ["a", "b", "c"]),
    (mech(0.7, 0.2, 5), ["b", "c"]),
    (mech(1.1, 0.05, 20), ["a", "c"]),
    (mech(2.0, 1.0, 3), ["c"]),
]


def test_local_epsilon_agrees_exactly_with_opacus_rdp_accountant():
    entries = [train(i, m, cs) for i, (m, cs) in enumerate(HISTORY)]
    got = cohort_epsilons(entries, Guarantee.LOCAL, DELTA)
    assert set(got) == {"a", "b", "c"}
    for cohort, eps in got.items():
        fed = [m for m, cs in HISTORY if cohort in cs]
        acct = RDPAccountant()  # fed the same history, entry by entry: bit-identical
        acct.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in fed]
        assert eps == acct.get_epsilon(DELTA)
        stepped = RDPAccountant()  # fed step by step (merges equal runs): same to rounding
        for m in fed:
            for _ in range(m.steps):
                stepped.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
        assert eps == pytest.approx(stepped.get_epsilon(DELTA), rel=1e-12)


def test_distributed_uses_sigma_sqrt_kmin_and_fewer_survivors_cost_more():
    k = 9
    entries = [train(0, mech(0.5, 0.1, 30, k=k), ["a"]), train(1, mech(0.5, 0.1, 30, k=k), ["a"])]
    dist = cohort_epsilons(entries, Guarantee.DISTRIBUTED, DELTA)["a"]
    as_local = [train(i, mech(0.5 * 3, 0.1, 30), ["a"]) for i in range(2)]
    assert dist == cohort_epsilons(as_local, Guarantee.LOCAL, DELTA)["a"]
    assert dist < cohort_epsilons(entries, Guarantee.LOCAL, DELTA)["a"]

    short = cohort_epsilons([*entries, survivors(2, 1, 4)], Guarantee.DISTRIBUTED, DELTA)["a"]
    charged = [train(0, mech(1.5, 0.1, 30), ["a"]), train(1, mech(0.5 * 2, 0.1, 30), ["a"])]
    assert short == cohort_epsilons(charged, Guarantee.LOCAL, DELTA)["a"] > dist
    # Survivors above K_min are not credited (ε never decreases); conflicting reports: the worst.
    assert (
        cohort_epsilons([*entries, survivors(2, 1, 50)], Guarantee.DISTRIBUTED, DELTA)["a"] == dist
    )
    worst = [*entries, survivors(2, 1, 50), survivors(3, 1, 4), survivors(4, 1, 6)]
    assert cohort_epsilons(worst, Guarantee.DISTRIBUTED, DELTA)["a"] == short
    # Without K_min there is no distributed calibration: charged as local.
    plain = [train(0, mech(0.5, 0.1, 30), ["a"]), survivors(1, 0, 100)]
    assert cohort_epsilons(plain, Guarantee.DISTRIBUTED, DELTA) == cohort_epsilons(
        plain, Guarantee.LOCAL, DELTA
    )


def test_survivors_must_refer_to_a_train_entry():
    with pytest.raises(ValueError, match="no train entry"):
        cohort_rdp([train(0, mech(), ["a"]), survivors(1, 5, 3)], Guarantee.DISTRIBUTED)


@pytest.mark.parametrize("guarantee", list(Guarantee))
def test_zero_noise_is_infinite_epsilon_for_the_cohorts_it_touched(guarantee):
    entries = [train(0, mech(1.0), ["a", "b"]), train(1, mech(0.0, k=4), ["b"])]
    eps = cohort_epsilons(entries, guarantee, DELTA)
    assert eps["b"] == math.inf and math.isfinite(eps["a"])
    assert plan(entries, mech(1.0), ["a", "b"], 100.0, guarantee, DELTA) == (["a"], {"b": math.inf})


# Few distinct (q, σ) so that compute_rdp (~50 ms per pair) stays cached across examples.
mechanisms = st.builds(
    mech,
    sigma=st.sampled_from([0.0, 0.8, 1.5]),
    q=st.sampled_from([0.05, 0.3, 1.0]),
    steps=st.integers(0, 40),
    k=st.sampled_from([None, 4]),
)
cohort_sets = st.lists(st.sampled_from("abcd"), min_size=0, max_size=4, unique=True)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("train"), mechanisms, cohort_sets),
        st.tuples(st.just("survivors"), st.integers(1, 6)),
        st.tuples(st.just("retire"), cohort_sets),
    ),
    max_size=12,
)


def build(ops):
    """Entries from operations; survivors report on the latest train entry."""
    entries, last_train = [], None
    for op in ops:
        seq = len(entries)
        if op[0] == "train":
            entries.append(train(seq, op[1], op[2]))
            last_train = seq
        elif op[0] == "survivors" and last_train is not None:
            entries.append(survivors(seq, last_train, op[1]))
        elif op[0] == "retire" and op[1]:
            entries.append(retire(seq, op[1]))
    return entries


@settings(max_examples=60, deadline=None)
@given(ops=operations, guarantee=st.sampled_from(list(Guarantee)))
def test_epsilon_never_decreases_as_entries_are_appended(ops, guarantee):
    entries = build(ops)
    before: dict[str, float] = {}
    for i in range(len(entries) + 1):
        now = cohort_epsilons(entries[:i], guarantee, DELTA)
        assert set(before) <= set(now)
        assert all(now[c] >= eps for c, eps in before.items())
        before = now


@settings(max_examples=60, deadline=None)
@given(
    ops=operations,
    planned=mechanisms,
    cohorts=cohort_sets,
    budget=st.sampled_from([0.5, 2.0, 8.0, 50.0]),
    guarantee=st.sampled_from(list(Guarantee)),
)
def test_planner_never_lets_a_trainable_cohort_end_above_budget(
    ops, planned, cohorts, budget, guarantee
):
    entries = build(ops)
    trainable, to_retire = plan(entries, planned, cohorts, budget, guarantee, DELTA)
    gone = {c for e in entries if e["kind"] == "retire" for c in e["cohorts"]}
    assert set(trainable) | set(to_retire) == set(cohorts) - gone
    assert not set(trainable) & set(to_retire)
    assert all(eps > budget for eps in to_retire.values())
    after = cohort_epsilons([*entries, train(len(entries), planned, trainable)], guarantee, DELTA)
    assert all(after[c] <= budget for c in trainable)
    assert epsilon_if(entries, planned, trainable, guarantee, DELTA) == {
        c: after[c] for c in trainable
    }


def synthetic_ledgers(num_clients, entries_each, rng):
    """Clients with cohorts arriving over time; a handful of distinct (q, σ) as in one config."""
    pool = [
        mech(s, q, int(rng.integers(5, 40)), k=10) for s in (0.6, 1.0) for q in (0.02, 0.1, 0.5)
    ]
    ledgers = []
    for _ in range(num_clients):
        entries = []
        for r in range(entries_each):
            m = pool[int(rng.integers(len(pool)))]
            entries.append(train(len(entries), m, [f"c{j}" for j in range(r // 4 + 1)]))
        ledgers.append(entries)
    return ledgers


def test_accounting_speed_1k_clients_x_20_entries():
    ledgers = synthetic_ledgers(1000, 20, np.random.default_rng(0))
    start = time.perf_counter()
    for entries in ledgers:
        cohort_epsilons(entries, Guarantee.LOCAL, DELTA)
    elapsed = time.perf_counter() - start  # includes computing the 6 distinct (q, σ) once
    assert elapsed < 5.0, f"{elapsed:.2f} s for 1,000 clients (10k should take seconds)"

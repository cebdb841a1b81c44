"""Properties of the audit's independent accountant and chain check."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.client.ledger import PrivacyLedger
from fedrec.common.audit.recompute import Recomputer, key_of
from fedrec.common.audit.records import verify_chain
from fedrec.common.privacy.accounting import Guarantee, Mechanism, cohort_epsilons

REC = Recomputer()  # shared: its caches are what makes the audit fast
DELTA = 1e-5

mechanisms = st.tuples(
    st.sampled_from([0.01, 0.1, 0.5, 1.0]),  # q
    st.sampled_from([0.6, 1.0, 1.7, 4.0]),  # σ
    st.integers(1, 30),  # steps
)


@settings(max_examples=25, deadline=None)
@given(st.lists(mechanisms, min_size=1, max_size=3))
def test_rdp_recomputation_agrees_with_fedrec_and_bounds_pld(history):
    """Same ε as fedrec's accountant (Opacus) to 1e-6 relative; PLD never above RDP."""
    entries, counts = [], {}
    for seq, (q, s, n) in enumerate(history):
        m = Mechanism(noise_multiplier=s, sample_rate=q, steps=n, clip_norm=1.0, delta=DELTA)
        entries.append({"seq": seq, "kind": "train", "mechanism": m.to_dict(), "cohorts": {"c": 1}})
        counts[(q, s)] = counts.get((q, s), 0) + n
    fedrec = cohort_epsilons(entries, Guarantee.LOCAL, DELTA)["c"]
    key = key_of(counts)
    ours = REC.epsilon(key, DELTA)
    assert math.isclose(ours, fedrec, rel_tol=1e-6, abs_tol=1e-9)
    assert REC.epsilon_pld(key, DELTA) <= ours * (1 + 1e-6)


@pytest.mark.parametrize("q", [0.001, 0.05, 0.5, 0.999])
@pytest.mark.parametrize("sigma", [0.3, 0.8, 3.0, 30.0])
def test_fractional_orders_match_opacus(q, sigma):
    """The quadrature for fractional orders against Opacus's series (where both converge)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedrec.common.audit.recompute import ORDERS

    ours = REC.one_step(q, sigma)
    theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
    for a, b in zip(ours, theirs, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12)


def test_noiseless_and_empty_histories():
    assert REC.epsilon((), DELTA) == 0.0
    assert math.isinf(REC.epsilon(((0.5, 0.0, 3),), DELTA))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_character_edit_is_detected(tmp_path_factory, data):
    """Whatever character of a ledger changes (to anything but a newline), the chain breaks."""
    folder = tmp_path_factory.mktemp("ledger")
    mech = Mechanism(noise_multiplier=1.0, sample_rate=0.5, steps=2, clip_norm=1.0, delta=DELTA)
    with PrivacyLedger.open(folder / "ledger.jsonl", fsync=False, clock=lambda: 1.0) as lg:
        for r in range(1, 4):
            lg.append_train(r, mech, {f"w{r}": 1})
    raw = (folder / "ledger.jsonl").read_bytes()
    assert verify_chain("c", folder, raw).findings == []
    pos = data.draw(st.integers(0, len(raw) - 1).filter(lambda i: raw[i : i + 1] != b"\n"))
    new = data.draw(st.sampled_from(b'0123456789abcdef{}":,x ').filter(lambda b: b != raw[pos]))
    edited = raw[:pos] + bytes([new]) + raw[pos + 1 :]
    assert verify_chain("c", folder, edited).findings

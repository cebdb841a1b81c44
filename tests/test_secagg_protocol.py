"""SecAgg+ state machines: sums with and without dropouts, refusals, uniform masked sums."""

from __future__ import annotations

import hashlib
import itertools
import pickle

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedrec.common.secagg.protocol import (
    SecAggAbort,
    SecAggConfig,
    SecAggDevice,
    SecAggRefusal,
    SecAggServer,
    expand_mask,
    neighbour_graph,
)


def _entropy(label: object):
    """Deterministic key material for a device (tests only)."""
    counter = itertools.count()

    def draw(n: int) -> bytes:
        return hashlib.sha256(f"{label}/{next(counter)}".encode()).digest()[:n]

    return draw


def _config(n: int, **kw) -> SecAggConfig:
    degree = kw.pop("degree", 4)
    base = dict(
        bits=16, length=32, degree=degree, threshold=degree // 2 + 1, min_survivors=3, public_seed=7
    )
    return SecAggConfig(**(base | kw))


def _inputs(n: int, cfg: SecAggConfig, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i: rng.integers(0, 1 << cfg.bits, cfg.length, dtype=np.uint64) for i in range(100, 100 + n)
    }


def _run_to_masked(cfg, inputs, drop_before_shares=(), drop_before_masked=()):
    devices = {i: SecAggDevice(i, cfg, entropy=_entropy(i)) for i in inputs}
    server = SecAggServer(cfg)
    roster = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    outgoing = {i: d.share_keys(roster) for i, d in devices.items() if i not in drop_before_shares}
    routed = server.route_shares(outgoing)
    masked = {
        i: devices[i].masked_input(routed[i], inputs[i])
        for i in routed
        if i not in drop_before_masked
    }
    return devices, server, masked


def _plain_sum(inputs, ids, bits):
    exact = np.sum([inputs[i].astype(object) for i in ids], axis=0)  # Python ints: no wrap
    return (exact % (1 << bits)).astype(np.uint64)


def test_neighbour_graph_is_symmetric_regular_and_public():
    ids = list(range(30))
    graph = neighbour_graph(ids, 6, public_seed=3)
    assert all(len(v) == 6 and i not in v for i, v in graph.items())
    assert all(i in graph[j] for i, v in graph.items() for j in v)
    assert graph == neighbour_graph(list(reversed(ids)), 6, public_seed=3)
    assert graph != neighbour_graph(ids, 6, public_seed=4)
    small = neighbour_graph(range(5), 6, public_seed=3)
    assert all(v == frozenset(range(5)) - {i} for i, v in small.items())


def test_config_demands_a_majority_threshold():
    with pytest.raises(ValueError):
        _config(10, degree=4, threshold=2)
    with pytest.raises(ValueError):
        _config(10, degree=4, threshold=6)


def test_no_dropouts_gives_the_plain_modular_sum():
    cfg = _config(8)
    inputs = _inputs(8, cfg)
    devices, server, masked = _run_to_masked(cfg, inputs)
    survivors, dropouts = server.collect_masked(masked)
    assert dropouts == [] and survivors == sorted(inputs)
    total = server.unmask({i: devices[i].unmask(survivors, dropouts) for i in survivors})
    assert total.dtype == np.uint64
    assert np.array_equal(total, _plain_sum(inputs, inputs, cfg.bits))
    assert not any(np.array_equal(masked[i], inputs[i]) for i in masked)


def test_a_device_pickled_between_stages_gives_the_same_sum():
    """A deployed device keeps its session as bytes between the round's messages."""
    cfg = _config(8)
    inputs = _inputs(8, cfg)
    revive = lambda d: pickle.loads(pickle.dumps(d))  # noqa: E731
    devices = {i: SecAggDevice(i, cfg) for i in inputs}  # os.urandom, as deployed
    server = SecAggServer(cfg)
    roster = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    devices = {i: revive(d) for i, d in devices.items()}
    routed = server.route_shares({i: d.share_keys(roster) for i, d in devices.items()})
    devices = {i: revive(d) for i, d in devices.items()}
    masked = {i: devices[i].masked_input(routed[i], inputs[i]) for i in routed}
    devices = {i: revive(d) for i, d in devices.items()}
    survivors, dropouts = server.collect_masked(masked)
    total = server.unmask({i: devices[i].unmask(survivors, dropouts) for i in survivors})
    assert np.array_equal(total, _plain_sum(inputs, inputs, cfg.bits))


def test_dropouts_at_every_stage_are_recovered_by_shamir():
    cfg = _config(12, degree=6, min_survivors=5)
    inputs = _inputs(12, cfg, seed=1)
    devices, server, masked = _run_to_masked(
        cfg, inputs, drop_before_shares={100}, drop_before_masked={103, 107}
    )
    survivors, dropouts = server.collect_masked(masked)
    assert dropouts == [103, 107] and 100 not in survivors
    # one survivor also goes silent at the unmask stage: the others' shares still suffice
    responses = {i: devices[i].unmask(survivors, dropouts) for i in survivors if i != 104}
    total = server.unmask(responses)
    assert np.array_equal(total, _plain_sum(inputs, survivors, cfg.bits))


def test_devices_refuse_below_k_min_and_a_second_request():
    cfg = _config(6, min_survivors=5)
    inputs = _inputs(6, cfg)
    devices, server, masked = _run_to_masked(cfg, inputs)
    few = sorted(inputs)[:4]
    with pytest.raises(SecAggRefusal):
        devices[few[0]].unmask(few, sorted(inputs)[4:])
    ok = sorted(inputs)
    devices[ok[0]].unmask(ok, [])
    with pytest.raises(SecAggRefusal):  # both b and s of one device must never leave
        devices[ok[0]].unmask(ok[:-1], ok[-1:])
    with pytest.raises(SecAggRefusal):
        devices[ok[1]].unmask(ok, [ok[2]])
    with pytest.raises(SecAggRefusal):  # padded with made-up devices to reach K_min
        devices[ok[1]].unmask([*few, 9001], [])


def test_server_aborts_without_enough_survivors_or_shares():
    cfg = _config(8, min_survivors=6)
    inputs = _inputs(8, cfg)
    devices, server, masked = _run_to_masked(cfg, inputs, drop_before_masked={100, 101, 102})
    with pytest.raises(SecAggAbort):
        server.collect_masked(masked)
    devices, server, masked = _run_to_masked(cfg, inputs)
    survivors, dropouts = server.collect_masked(masked)
    responses = {i: devices[i].unmask(survivors, dropouts) for i in survivors[:2]}
    with pytest.raises(SecAggAbort):
        server.unmask(responses)


def test_a_tampered_roster_is_refused():
    cfg = _config(5)
    devices = {i: SecAggDevice(i, cfg, entropy=_entropy(i)) for i in range(5)}
    roster = {i: d.advertise_keys() for i, d in devices.items()}
    roster[1] = dict(roster[2])
    with pytest.raises(SecAggRefusal):
        devices[0].share_keys(roster)


def _live_holders(ids, cfg, survivors) -> int:
    """The fewest surviving share holders any device of the round has."""
    graph = neighbour_graph(ids, cfg.degree, cfg.public_seed)
    return min(len((graph[i] | {i}) & set(survivors)) for i in ids)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_dropouts_after_masking_leaving_k_min_unmask_to_the_survivors_sum(data):
    n = data.draw(st.integers(5, 20), label="n")
    k_min = data.draw(st.integers(2, n), label="k_min")
    cfg = _config(n, degree=6, threshold=4, min_survivors=k_min, bits=12, length=8)
    inputs = _inputs(n, cfg, seed=n)
    ids = sorted(inputs)
    dropped = data.draw(st.sets(st.sampled_from(ids), max_size=n - k_min), label="dropped")
    devices, server, masked = _run_to_masked(cfg, inputs, drop_before_masked=dropped)
    survivors, dropouts = server.collect_masked(masked)
    assert survivors == [i for i in ids if i not in dropped] and dropouts == sorted(dropped)
    responses = {i: devices[i].unmask(survivors, dropouts) for i in survivors}
    if _live_holders(ids, cfg, survivors) < cfg.threshold:
        event("too few share holders left")
        with pytest.raises(SecAggAbort):
            server.unmask(responses)
        return
    event("unmasked")
    assert np.array_equal(server.unmask(responses), _plain_sum(inputs, survivors, cfg.bits))


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_below_k_min_the_server_aborts_and_every_device_refuses(data):
    n = data.draw(st.integers(5, 20), label="n")
    k_min = data.draw(st.integers(2, n), label="k_min")
    cfg = _config(n, degree=6, threshold=4, min_survivors=k_min, bits=12, length=8)
    inputs = _inputs(n, cfg, seed=n)
    ids = sorted(inputs)
    dropped = data.draw(
        st.sets(st.sampled_from(ids), min_size=n - k_min + 1, max_size=n), label="dropped"
    )
    devices, server, masked = _run_to_masked(cfg, inputs, drop_before_masked=dropped)
    with pytest.raises(SecAggAbort):
        server.collect_masked(masked)
    alive = [i for i in ids if i not in dropped]
    # a server that announces them anyway is refused by every device: nothing unmasks
    for i in alive:
        with pytest.raises(SecAggRefusal):
            devices[i].unmask(alive, sorted(dropped))


def test_a_partial_sum_of_masked_inputs_is_uniform_even_without_self_masks():
    cfg = SecAggConfig(
        bits=8, length=1 << 15, degree=4, threshold=3, min_survivors=3, public_seed=11
    )
    inputs = {i: np.full(cfg.length, 5 * i, np.uint64) for i in range(10)}  # very non-uniform
    devices, _, masked = _run_to_masked(cfg, inputs)
    subset = [0, 1, 2, 3]
    partial = np.zeros(cfg.length, np.uint64)
    for i in subset:
        # remove the self masks too: a server that learned every b_i still sees uniform residues
        partial = (partial + masked[i] - devices[i].self_mask()) & np.uint64(255)
    counts = np.bincount(partial.astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
    # the whole set's pairwise masks cancel: the same sum over everyone is not uniform
    full = np.zeros(cfg.length, np.uint64)
    for i in inputs:
        full = (full + masked[i] - devices[i].self_mask()) & np.uint64(255)
    assert len(np.unique(full)) == 1


def test_expand_mask_is_deterministic_and_in_range():
    a = expand_mask(b"x" * 32, 1000, 5)
    assert a.dtype == np.uint64 and int(a.max()) < 32
    assert np.array_equal(a, expand_mask(b"x" * 32, 1000, 5))
    assert not np.array_equal(a, expand_mask(b"y" * 32, 1000, 5))


def test_shares_are_authenticated_to_their_pair():
    cfg = _config(6)
    inputs = _inputs(6, cfg)
    devices = {i: SecAggDevice(i, cfg, entropy=_entropy(i)) for i in inputs}
    server = SecAggServer(cfg)
    roster = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    routed = server.route_shares({i: d.share_keys(roster) for i, d in devices.items()})
    dst = 100
    src, other = sorted(routed[dst])[:2]
    flipped = bytearray(routed[dst][src])
    flipped[-1] ^= 1
    with pytest.raises(SecAggRefusal, match=f"shares from {src} fail authentication"):
        devices[dst].masked_input({**routed[dst], src: bytes(flipped)}, inputs[dst])
    # a genuine ciphertext presented as another neighbour's: its pair label does not match
    swapped = {**routed[dst], other: routed[dst][src]}
    with pytest.raises(SecAggRefusal, match=f"shares from {other} fail authentication"):
        devices[dst].masked_input(swapped, inputs[dst])

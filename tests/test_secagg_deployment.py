"""The deployed SecAgg+ round's stages (`fedrec.server.secagg_deployment` on the server,
`fedrec.client.secagg_device` on each device) with their messages in the wire format, driven
in one process: what the server decodes is exactly the decoded modular sum of the survivors'
encodings, with dropouts at every stage; below K_min nothing is unmasked. (Over real
SuperNodes: tests/test_deployment_e2e.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.client import secagg_device as sa
from fedrec.common.privacy.randomness import PrivacyRandomness
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg import counters, wire
from fedrec.common.secagg.encoding import decode_sum, modular_sum
from fedrec.common.secagg.protocol import SecAggRefusal
from fedrec.common.secagg.round_inputs import COUNTERS, encode_inputs, round_public_seed
from fedrec.server.secagg_deployment import StageReply, secagg_deployed_round

SHAPES = {"a": (3, 4), "b": (5,)}
CONFIG = SimulationConfig.from_flat(
    {
        "dp": "user+distributed",
        "secure-aggregation-protocol": "secagg",
        "min-survivors": 3,
        "seed": 7,
    }
)
DDG = CONFIG.ddg_params(17)
RECEIVED = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}


def change(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.normal(0, 0.05, s) for k, s in SHAPES.items()}


class Devices:
    """Each node's device side, reached through `exchange` in the wire format; a node in
    `silent[stage]` does not answer that stage (nor any later one)."""

    def __init__(self, silent: dict[str, set[int]] | None = None):
        self.silent = silent or {}
        self.sessions: dict[int, sa.SecAggSession] = {}
        self.sent: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the unmasked inputs
        self.gone: set[int] = set()

    def exchange(self, stage, requests):
        out = {}
        for node, (fields, params) in requests.items():
            if node in self.gone or node in self.silent.get(stage, set()):
                self.gone.add(node)
                out[node] = StageReply(status={"error": "Node Unavailable"})
                continue
            fields = dict(fields)
            assert fields["stage"] == stage and (params is not None) == (stage == "masked")
            if stage == "keys":
                session, reply = sa.start_session(fields["round"], fields, DDG, 3)
                self.sessions[node] = session
                out[node] = StageReply(fields=reply)
                continue
            session = self.sessions[node]
            session.expect(fields["round"], stage)
            if stage == "shares":
                out[node] = StageReply(fields=sa.share_keys(session, fields))
            elif stage == "masked":
                metrics = {"examples": float(node), "loss": 0.25}
                seed = ("ddg", node)
                masked = sa.masked_input(
                    session,
                    fields,
                    change(node),
                    metrics,
                    PrivacyRandomness.reproducible_from(1, *seed),
                )
                self.sent[node] = encode_inputs(
                    change(node), metrics, DDG, session.public_seed,
                    PrivacyRandomness.reproducible_from(1, *seed),
                )  # fmt: skip
                out[node] = StageReply(arrays=masked, status={"ledger_head": f"h{node}"})
            else:
                out[node] = StageReply(fields=sa.unmask(session, fields))
        return out


def expected(devices: Devices, survivors: list[int]) -> tuple[dict, dict]:
    seed = round_public_seed(CONFIG.seed, 1)
    total = modular_sum([devices.sent[n][0] for n in survivors], DDG.bits)
    changes, _ = decode_sum(total, SHAPES, DDG, seed, survivors=len(survivors))
    tally = modular_sum([devices.sent[n][1] for n in survivors], counters.BITS)
    return changes, counters.decode_counters(tally, COUNTERS)


def run(devices: Devices, nodes=(11, 12, 13, 14, 15)):
    return secagg_deployed_round(devices.exchange, CONFIG, DDG, list(nodes), RECEIVED, 1)


@pytest.mark.parametrize(
    ("silent", "survivors"),
    [
        ({}, [11, 12, 13, 14, 15]),
        ({"masked": {13}}, [11, 12, 14, 15]),  # dropped after sharing keys: masks removed
        ({"unmask": {12, 15}}, [11, 12, 13, 14, 15]),  # sent its input, then gone: in the sum
        ({"keys": {14}, "unmask": {11}}, [11, 12, 13, 15]),
    ],
)
def test_the_server_decodes_exactly_the_survivors_sum(silent, survivors):
    devices = Devices(silent)
    out = run(devices)
    pooled = [r for r, _ in out if r.pooled]
    assert len(pooled) == 1 and pooled[0].pooled == len(survivors)
    changes, tally = expected(devices, survivors)
    for name in SHAPES:
        np.testing.assert_array_equal(pooled[0].params[name], changes[name].astype(np.float32))
    assert pooled[0].metrics == tally
    assert pooled[0].metrics["examples"] == sum(survivors)  # the counters' exact sum
    # per device: only whether it failed, at which stage, and its ledger head
    per_device = {r.user: r for r, _ in out if not r.pooled}
    assert set(per_device) == {11, 12, 13, 14, 15}
    assert all(r.params is None and not r.metrics for r in per_device.values())
    failed = {n for n, r in per_device.items() if r.error}
    assert failed == set().union(*silent.values())
    assert per_device[min(survivors)].ledger_head == f"h{min(survivors)}"


def test_a_negative_control_the_sum_differs_without_a_dropped_devices_input():
    devices = Devices({"unmask": {12}})
    pooled = next(r for r, _ in run(devices) if r.pooled)
    without, _ = expected(devices, [11, 13, 14, 15])
    assert not np.array_equal(pooled.params["a"], without["a"].astype(np.float32))


@pytest.mark.parametrize("stage", ["keys", "shares", "masked"])
def test_below_k_min_at_any_stage_nothing_is_unmasked(stage):
    devices = Devices({stage: {11, 12, 13}})  # 2 of 5 left, K_min = 3
    out = run(devices)
    assert not any(r.pooled for r, _ in out)
    assert sum(r.error is not None for r, _ in out) == 3


def test_a_device_refuses_to_unmask_below_k_min_and_stages_out_of_order():
    devices = Devices()
    devices.exchange(
        "keys",
        {1: ({"round": 1, "stage": "keys", "index": 1, "devices": 4, "public-seed": 5}, None)},
    )
    session = devices.sessions[1]
    with pytest.raises(SecAggRefusal, match="after 'keys'"):
        session.expect(1, "unmask")
    with pytest.raises(SecAggRefusal, match="round 2"):
        session.expect(2, "shares")
    with pytest.raises(SecAggRefusal, match="fewer than K_min"):
        sa.unmask(session, {"survivors": [1, 2], "dropouts": [3]})


def test_the_wire_format_refuses_mismatched_lists():
    fields = wire.pack_map("x", {1: b"a", 2: b"b"})
    assert wire.unpack_map("x", fields) == {1: b"a", 2: b"b"}
    assert wire.unpack_map("x", {}) == {}
    with pytest.raises(wire.MalformedStage, match="2 ids for 1 values"):
        wire.unpack_map("x", {"x/ids": [1, 2], "x/data": [b"a"]})


def test_a_malformed_masked_input_drops_that_device_not_the_round():
    devices = Devices()

    def exchange(stage, requests):
        out = devices.exchange(stage, requests)
        if stage == "masked":
            out[12].arrays["updates"] = out[12].arrays["updates"][:-1]
        return out

    out = secagg_deployed_round(exchange, CONFIG, DDG, [11, 12, 13, 14, 15], RECEIVED, 1)
    pooled = next(r for r, _ in out if r.pooled)
    assert pooled.pooled == 4
    changes, _ = expected(devices, [11, 13, 14, 15])
    np.testing.assert_array_equal(pooled.params["a"], changes["a"].astype(np.float32))
    assert "malformed" in next(r.error for r, _ in out if r.user == 12)


@pytest.mark.parametrize("devices", range(3, 40))
def test_every_round_size_gets_a_strict_majority_threshold(devices):
    """n - 1 odd and below 2⌈log₂ n⌉ (n = 4, 6) gives an odd degree, whose majority needs
    ⌊(k+1)/2⌋ + 1 (⌊k/2⌋ + 1 would be refused by SecAggConfig)."""
    from fedrec.common.secagg.round_inputs import secagg_configs

    updates, tallies = secagg_configs(DDG, devices=devices, min_survivors=2, public_seed=1)
    k, t = updates.degree, updates.threshold
    assert (k + 1) / 2 < t <= k + 1 and tallies.threshold == t
    assert t == k // 2 + 1 or k % 2 == 1  # even degrees keep the simulation's threshold

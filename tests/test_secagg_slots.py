"""SecAgg+ in the Flower transport of the simulation: each execution slot is one party whose
input is the sum of its devices' DDG encodings (`fedrec.simulations.secagg_slots`), driven
by the server's stages (`fedrec.server.secagg_deployment`) in one process. What unmasks is
exactly the total of the surviving slots' inputs; a slot's masked input looks uniform; K_min
counts devices, not slots. (The Flower run itself: tests/test_secagg_simulation.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg import counters
from fedrec.common.secagg.encoding import decode_sum, modular_sum
from fedrec.common.secagg.protocol import SecAggRefusal
from fedrec.common.secagg.round_inputs import COUNTERS, round_public_seed
from fedrec.server.secagg_deployment import StageReply, secagg_deployed_round
from fedrec.simulations import devices
from fedrec.simulations.secagg_slots import MEMBERS, party_check, slot_inputs, slot_stage

SETTINGS = {
    "dp": "user+distributed",
    "secure-aggregation-protocol": "secagg",
    "min-survivors": 5,
    "seed": 7,
    "reproducible-noise": True,  # each slot's draws can be recomputed for the expected sum
}
CONFIG = SimulationConfig.from_flat(SETTINGS)
SHAPES = {"a": (3, 4), "b": (5,)}
RECEIVED = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
USERS = list(range(20))
KINDS = ("trained", "idle", "declined", "failed", "malformed")  # by user % 5


def device_reply(user: int, received=RECEIVED) -> DeviceReply:
    kind, head = KINDS[user % 5], f"h{user}"
    rng = np.random.default_rng(user)
    if kind == "trained":
        params = {k: v + rng.normal(0, 0.05, v.shape) for k, v in received.items()}
        return DeviceReply(user, params, 3, {"examples": 3.0, "loss": 0.5}, ledger_head=head)
    if kind == "idle":  # owes its noise share
        return DeviceReply(user, None, 0, {"noise_only": 1.0, "declined": 1.0}, ledger_head=head)
    if kind == "declined":  # a policy decline: no share, no failure
        return DeviceReply(user, None, 0, {"declined": 1.0}, ledger_head=head)
    if kind == "failed":
        return DeviceReply(user, None, 0, {}, error="RuntimeError: boom", ledger_head=head)
    return DeviceReply(user, {"other": np.zeros(3)}, 1, {"examples": 1.0}, ledger_head=head)


@pytest.fixture
def played(monkeypatch):
    """The slots play canned devices (`device_reply`); the protocol around them is real."""

    def canned(config, users, round, params, *, draw_idle_noise=True):
        assert not draw_idle_noise  # the slot draws its idle members' shares itself
        return [device_reply(u, params) for u in users]

    monkeypatch.setattr(devices, "played_replies", canned)


class Slots:
    """Each node an execution slot answering the stages with `slot_stage`; a node in
    `silent[stage]` does not answer that stage (nor any later one)."""

    def __init__(self, config=CONFIG, ddg=None, silent=None):
        self.config, self.ddg = config, ddg or config.ddg_params(17)
        self.silent = silent or {}
        self.kept: dict[int, dict | None] = {}
        self.masked: dict[int, dict[str, np.ndarray]] = {}
        self.replies: dict[int, list[DeviceReply]] = {}
        self.gone: set[int] = set()
        self.stages: list[str] = []

    def exchange(self, stage, requests):
        self.stages.append(stage)
        out = {}
        for node, (fields, params) in requests.items():
            if node in self.gone or node in self.silent.get(stage, set()):
                self.gone.add(node)
                out[node] = StageReply(status={"error": "Node Unavailable"})
                continue
            try:
                result = slot_stage(self.config, fields, params, self.kept.get(node), self.ddg)
            except SecAggRefusal as err:
                out[node] = StageReply(status={"error": f"SecAggRefusal: {err}"})
                continue
            self.kept[node] = result.kept
            if stage == "masked":
                self.masked[node], self.replies[node] = result.arrays, result.replies
            out[node] = StageReply(result.fields, result.arrays)
        return out

    def round(self, nodes=(21, 22, 23), received=RECEIVED):
        chunks = {node: USERS[k :: len(nodes)] for k, node in enumerate(nodes)}
        results = secagg_deployed_round(
            self.exchange, self.config, self.ddg, list(nodes), received, 1,
            masked_fields={node: {"users": chunk} for node, chunk in chunks.items()},
            members=lambda reply: int(reply.fields[MEMBERS]),
        )  # fmt: skip
        return chunks, [r for r, _ in results if r.pooled]


def expected_total(slots: Slots, chunks: dict, survivors: list[int]):
    """The decoded sum of the surviving slots' own (unmasked) inputs, recomputed."""
    seed = round_public_seed(CONFIG.seed, 1)
    inputs = [
        slot_inputs(CONFIG, [device_reply(u) for u in chunks[n]], 1, RECEIVED, slots.ddg, seed)
        for n in survivors
    ]
    total = modular_sum([i.update for i in inputs], slots.ddg.bits)
    members = sum(i.members for i in inputs)
    changes, _ = decode_sum(total, SHAPES, slots.ddg, seed, survivors=members)
    tally = modular_sum([i.tally for i in inputs], counters.BITS)
    return changes, counters.decode_counters(tally, COUNTERS), members


@pytest.mark.parametrize(
    ("silent", "survivors"),
    [
        ({}, [21, 22, 23]),
        ({"masked": {22}}, [21, 23]),  # dropped after sharing keys: its pair masks removed
        ({"unmask": {23}}, [21, 22, 23]),  # sent its masked sum, then gone: still in the total
    ],
)
def test_the_server_unmasks_exactly_the_surviving_slots_sums(played, silent, survivors):
    slots = Slots(silent=silent)
    chunks, pooled = slots.round()
    changes, tally, members = expected_total(slots, chunks, survivors)
    (reply,) = pooled
    assert reply.pooled == members  # the devices in the sum, not the slots
    for name in SHAPES:
        np.testing.assert_allclose(reply.params[name], changes[name].astype(np.float32))
    assert reply.metrics["trained"] == tally["trained"] > 0
    assert reply.metrics["noise_only"] == tally["noise_only"] > 0
    # members: the devices that trained or owe a share; per device only its failure
    in_sum = [u for n in survivors for u in chunks[n] if KINDS[u % 5] in ("trained", "idle")]
    assert members == len(in_sum)
    for node in slots.replies:
        for r in slots.replies[node]:
            assert r.params is None and r.metrics == {} and r.ledger_head == f"h{r.user}"
            kind = KINDS[r.user % 5]
            assert (r.error is not None) == (kind in ("failed", "malformed")), r
            if kind == "malformed":
                assert r.error.startswith("invalid update")


def test_the_decoded_total_is_the_sum_of_the_trained_devices_changes(played):
    """Without noise the decoded total is the trained members' summed change, to within each
    device's rounding (negative control: one device's change left out is far off)."""
    quiet = Slots(ddg=CONFIG.ddg_params(17).__class__(**{
        **CONFIG.ddg_params(17).__dict__, "sigma": 0.0, "gamma": 1e-4, "bits": 30,
    }))  # fmt: skip
    _, (reply,) = quiet.round()
    trained = [device_reply(u) for u in USERS if KINDS[u % 5] == "trained"]
    truth = {k: sum(r.params[k].astype(np.float64) - RECEIVED[k] for r in trained) for k in SHAPES}
    err = np.sqrt(sum(((reply.params[k] - truth[k]) ** 2).sum() for k in SHAPES))
    assert err < len(trained) * 1e-4 * np.sqrt(quiet.ddg.padded_dim)
    missing = {k: truth[k] - (trained[0].params[k] - RECEIVED[k]) for k in SHAPES}
    assert np.sqrt(sum(((reply.params[k] - missing[k]) ** 2).sum() for k in SHAPES)) > 10 * err


def test_below_k_min_devices_nothing_is_unmasked_however_many_slots_survive(played):
    # 8 devices in the sums, K_min 9: every slot answers, the server never asks to unmask
    slots = Slots(config=SimulationConfig.from_flat(SETTINGS | {"min-survivors": 9}))
    _, pooled = slots.round()
    assert pooled == [] and "unmask" not in slots.stages and len(slots.masked) == 3


def test_a_slot_refuses_an_unmask_request_below_k_min_or_that_miscounts_it():
    party_check({"survivors": [1, 2], MEMBERS: [3, 4]}, 1, 3, 7)  # 7 devices: it answers
    with pytest.raises(SecAggRefusal, match="fewer than K_min"):
        party_check({"survivors": [1, 2], MEMBERS: [3, 3]}, 2, 3, 7)
    with pytest.raises(SecAggRefusal, match="sent 3 devices"):
        party_check({"survivors": [1, 2], MEMBERS: [30, 4]}, 1, 3, 7)  # inflated to pass
    with pytest.raises(SecAggRefusal, match="every survivor"):
        party_check({"survivors": [1, 2], MEMBERS: [7]}, 1, 3, 7)


def test_a_slots_masked_sum_is_uniform_while_its_input_is_not(played):
    """Chi-square on the top 3 bits of the residues (8 bins of 1,024): the masked sum passes,
    the slot's own input (a negative control) fails by far."""
    received = {"w": np.zeros(5000, np.float32)}
    slots = Slots(ddg=CONFIG.ddg_params(5000))
    slots.round(received=received)
    shift = np.uint64(slots.ddg.bits - 3)
    for arrays in slots.masked.values():
        bins = np.bincount((arrays["updates"] >> shift).astype(np.int64), minlength=8)
        assert chisquare(bins).pvalue > 1e-6, bins
    seed = round_public_seed(CONFIG.seed, 1)
    chunk = [device_reply(u, received) for u in USERS[0::3]]
    plain = slot_inputs(CONFIG, chunk, 1, received, slots.ddg, seed).update
    bins = np.bincount((plain >> shift).astype(np.int64), minlength=8)
    assert chisquare(bins).pvalue < 1e-30, bins


def test_a_stage_out_of_order_or_without_keys_is_refused(played):
    with pytest.raises(SecAggRefusal, match="without a session"):
        slot_stage(CONFIG, {"stage": "masked", "round": 1}, RECEIVED, None, CONFIG.ddg_params(17))
    keys = slot_stage(
        CONFIG,
        {"stage": "keys", "round": 1, "devices": 3, "index": 1, "public-seed": 5},
        None,
        None,
        CONFIG.ddg_params(17),
    )
    with pytest.raises(SecAggRefusal, match="after 'keys'"):
        slot_stage(CONFIG, {"stage": "unmask", "round": 1}, None, keys.kept, CONFIG.ddg_params(17))

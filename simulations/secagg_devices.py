"""A round of the in-process transport under SecAgg+ with the distributed discrete Gaussian
(`secure-aggregation-protocol = "secagg"`).

Every sampled device plays its round (`device_reply`: DP-SGD clipping without continuous noise,
`fedrec.client.training`), then the devices and the server run SecAgg+'s four stages in this
process: each device encodes its update's change from the received parameters (an idle device:
a zero vector, so only its discrete noise share) with `encode_update` and its counters with
`encode_counters`, masks both, and the server (`fedrec.server.secagg_round.SecAggRound`) learns
the survivors' modular totals only, decoded into one pooled reply. A device whose round failed,
or whose update cannot be encoded, drops out after the key stages (its pairwise masks are
removed through its neighbours' shares: the protocol's dropout path). Fewer than K_min survivors
at any stage: nothing is unmasked and the server's run discards the round.

The Flower transport of the simulation runs the same stages with its execution slots as the
parties, each the sum of the devices it plays (`fedrec.simulations.secagg_slots`). A
deployment runs them over real devices (`fedrec.server.secagg_deployment`,
`fedrec.client.secagg_device`).
"""

from __future__ import annotations

import logging

import numpy as np

from fedrec.common.privacy.randomness import privacy_randomness
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg.counters import encode_counters
from fedrec.common.secagg.encoding import DDGParams, encode_update
from fedrec.common.secagg.protocol import SecAggAbort, SecAggConfig, SecAggDevice, SecAggRefusal
from fedrec.common.secagg.round_inputs import round_public_seed
from fedrec.server.secagg_round import COUNTERS, SecAggRound, secagg_configs
from fedrec.server.secure_aggregation import reply_counters

log = logging.getLogger(__name__)


def public_seed(config: SimulationConfig, round: int) -> int:
    """The round's public randomness (rotation signs, neighbour graph): known to everyone."""
    return round_public_seed(config.seed, round)


class SimulatedSecAggDevice:
    """One device's two SecAgg+ instances (updates, counters), stage by stage."""

    def __init__(self, user: int, configs: tuple[SecAggConfig, SecAggConfig]) -> None:
        self.updates = SecAggDevice(user, configs[0])
        self.counters = SecAggDevice(user, configs[1])

    def advertise_keys(self) -> tuple[dict, dict]:
        return self.updates.advertise_keys(), self.counters.advertise_keys()

    def share_keys(self, roster: dict) -> tuple[dict, dict]:
        return self.updates.share_keys(roster["updates"]), self.counters.share_keys(
            roster["counters"]
        )

    def masked_input(
        self, routed: tuple[dict, dict], update: np.ndarray, tally: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.updates.masked_input(routed[0], update),
            self.counters.masked_input(routed[1], tally),
        )

    def unmask(self, survivors: list[int], dropouts: list[int]) -> tuple[dict, dict]:
        return self.updates.unmask(survivors, dropouts), self.counters.unmask(survivors, dropouts)


def device_inputs(
    config: SimulationConfig,
    reply: DeviceReply,
    round: int,
    received: dict[str, np.ndarray],
    ddg: DDGParams,
    seed: int,
) -> tuple[np.ndarray, np.ndarray] | str | None:
    """A device's two secure-sum inputs (its DDG-encoded change, its counters); else it drops
    out: with the reason it failed, or None when it had nothing to send (a decline without a
    noise share, which is no failure)."""
    if reply.error is not None:
        return reply.error
    if reply.params is None and reply.metrics.get("noise_only") != 1.0:
        return None
    if reply.params is None:  # idle: only its noise share
        change = {name: np.zeros(value.shape) for name, value in received.items()}
    else:
        if set(reply.params) != set(received):
            return "invalid update: parameter names differ from the received ones"
        change = {
            name: np.asarray(reply.params[name], np.float64) - value
            for name, value in received.items()
        }
    randomness = privacy_randomness(config.noise_seed, "ddg", round, reply.user)
    try:
        encoded = encode_update(change, ddg, seed, randomness)
    except ValueError as err:
        return f"invalid update: {err}"
    return encoded, encode_counters(reply_counters(reply.metrics), COUNTERS)


def secagg_round(
    config: SimulationConfig,
    replies: list[DeviceReply],
    round: int,
    received: dict[str, np.ndarray],
) -> list[DeviceReply]:
    """SecAgg+ over `replies`' devices: what the server may see of them (module docstring):
    per device only its ledger commitment and whether it failed, and one pooled reply (none
    when the round was aborted below K_min)."""
    ddg = config.ddg_params(sum(int(v.size) for v in received.values()))
    seed = public_seed(config, round)
    configs = secagg_configs(
        ddg, devices=len(replies), min_survivors=config.min_survivors, public_seed=seed
    )
    server = SecAggRound(ddg, configs, received)
    devices = {r.user: SimulatedSecAggDevice(r.user, configs) for r in replies}
    errors: dict[int, str] = {}
    pooled: list[DeviceReply] = []
    try:
        roster = server.collect_keys({u: d.advertise_keys() for u, d in devices.items()})
        routed = server.route_shares({u: d.share_keys(roster) for u, d in devices.items()})
        masked = {}
        for reply in replies:
            inputs = device_inputs(config, reply, round, received, ddg, seed)
            if inputs is None or isinstance(inputs, str):
                if inputs is not None:
                    errors[reply.user] = inputs
                continue
            masked[reply.user] = devices[reply.user].masked_input(routed[reply.user], *inputs)
        survivors, dropouts = server.collect_masked(masked)
        pooled.append(server.unmask({u: devices[u].unmask(survivors, dropouts) for u in survivors}))
    except (SecAggAbort, SecAggRefusal) as err:
        # the server learns nothing of the round; finish_round discards it (below K_min, or
        # too few devices to hold a threshold of each one's shares)
        log.warning("round %d: secure aggregation aborted, nothing unmasked: %s", round, err)
    out = [
        DeviceReply(r.user, None, 0, {}, error=errors.get(r.user), ledger_head=r.ledger_head)
        for r in replies
    ]
    return out + pooled

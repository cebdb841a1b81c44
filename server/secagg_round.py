"""The server's side of a round under SecAgg+ with the distributed discrete Gaussian.

Two SecAgg+ instances over the same devices (`fedrec.common.secagg.protocol`): the updates'
DDG encodings mod 2^b (`fedrec.common.secagg.encoding`) and the round counters, fixed point
mod 2^62 (`fedrec.common.secagg.counters`; a separate modulus, since a wider one would reveal
the encodings' carries). The server routes the stages' messages; after the unmask stage it
holds each instance's modular total over the survivors and nothing else, and decodes them
(`decode_sum`) into ONE pooled reply, the only thing `FederatedRun.finish_round` reads of the
round. Fewer than K_min devices at any stage: `SecAggAbort`, nothing is unmasked, the round
is discarded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fedrec.common.replies import DeviceReply
from fedrec.common.secagg import counters
from fedrec.common.secagg.encoding import DDGParams, decode_sum
from fedrec.common.secagg.protocol import DeviceId, SecAggConfig, SecAggServer
from fedrec.common.secagg.round_inputs import COUNTERS, secagg_configs  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

WRAP_WARNING = 0.01  # share of coordinates near the modulus' edge worth a warning


class SecAggRound:
    """Routes one round's stages for both instances; `unmask` returns the pooled reply."""

    def __init__(
        self,
        ddg: DDGParams,
        configs: tuple[SecAggConfig, SecAggConfig],
        received: Mapping[str, np.ndarray],
    ) -> None:
        self.ddg = ddg
        self.public_seed = configs[0].public_seed
        self.shapes = {name: tuple(value.shape) for name, value in received.items()}
        self.updates, self.counters = SecAggServer(configs[0]), SecAggServer(configs[1])
        self.survivors: list[DeviceId] = []

    def collect_keys(self, adverts: Mapping[DeviceId, tuple[dict, dict]]) -> dict:
        return {
            "updates": self.updates.collect_keys({i: a[0] for i, a in adverts.items()}),
            "counters": self.counters.collect_keys({i: a[1] for i, a in adverts.items()}),
        }

    def route_shares(self, outgoing: Mapping[DeviceId, tuple[dict, dict]]) -> dict:
        updates = self.updates.route_shares({i: o[0] for i, o in outgoing.items()})
        tallies = self.counters.route_shares({i: o[1] for i, o in outgoing.items()})
        return {i: (updates[i], tallies.get(i, {})) for i in updates}

    def collect_masked(
        self, masked: Mapping[DeviceId, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[list[DeviceId], list[DeviceId]]:
        survivors, dropouts = self.updates.collect_masked({i: m[0] for i, m in masked.items()})
        self.counters.collect_masked({i: m[1] for i, m in masked.items()})
        self.survivors = survivors
        return survivors, dropouts

    def unmask(
        self, responses: Mapping[DeviceId, tuple[dict, dict]], *, members: int | None = None
    ) -> DeviceReply:
        """The survivors' modular totals, decoded: the round's sum of update changes from the
        received parameters (float32) and its counters, as one pooled reply. `members`: the
        devices in the sum when a survivor may be several (default: one per survivor)."""
        update_total = self.updates.unmask({i: r[0] for i, r in responses.items()})
        counter_total = self.counters.unmask({i: r[1] for i, r in responses.items()})
        n = len(self.survivors) if members is None else members
        changes, at_risk = decode_sum(
            update_total, self.shapes, self.ddg, self.public_seed, survivors=n
        )
        if at_risk > WRAP_WARNING * self.ddg.padded_dim:
            log.warning(
                "secure sum: %d of %d coordinates near the modulus' edge (wrap-around risk)",
                at_risk,
                self.ddg.padded_dim,
            )
        return DeviceReply(
            min(self.survivors),
            {name: value.astype(np.float32) for name, value in changes.items()},
            0,
            counters.decode_counters(counter_total, COUNTERS),
            pooled=n,
        )

"""A deployed round under SecAgg+ (`secure-aggregation-protocol = "secagg"`): the stages of
`fedrec.server.secagg_round.SecAggRound` over real devices, one message exchange per stage.

    keys     every sampled device gets its protocol index (1..n), n and the round's public
             seed; it replies with its public keys (U1)
    shares   U1 gets the roster; each replies with shares encrypted to its neighbours (U2)
    masked   U2 gets the model and the shares routed to it; each trains and replies with its
             masked DDG encoding and counters (U3: survivors), or that it declined
    unmask   U3 gets the survivors and the dropouts (U2 \\ U3); each replies with the shares
             that rebuild the survivors' self masks and the dropouts' pairwise masks

A device that does not answer a stage (no reply in time, an error, a refusal) drops out of
the rest of the round; the protocol's reconstruction path removes its masks. Fewer than
K_min at any stage, or too few shares: nothing is unmasked, the round's only reply is that
the devices took part, and `FederatedRun.finish_round` discards it (it sees 0 survivors).
The transport is a callable, so this file does not import Flower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg import wire
from fedrec.common.secagg.encoding import DDGParams
from fedrec.common.secagg.protocol import SecAggAbort, SecAggRefusal
from fedrec.common.secagg.round_inputs import round_public_seed, secagg_configs
from fedrec.server.secagg_round import SecAggRound

log = logging.getLogger(__name__)


@dataclass
class StageReply:
    """A device's answer to one stage: its protocol fields and arrays, its status
    ("error", "declined", "ledger_head"), or only an error (no reply, a failed reply)."""

    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str:
        return self.status.get("error", "")


# exchange(stage, {node: (fields, parameters or None)}) -> {node: StageReply}, one per node
# that was sent a request (an error reply for one that did not answer in time)
Exchange = Callable[
    [str, Mapping[int, tuple[dict[str, Any], dict[str, np.ndarray] | None]]],
    dict[int, StageReply],
]


def masked_inputs(reply: StageReply, configs) -> tuple[np.ndarray, np.ndarray]:
    """A device's two masked vectors, checked (a malformed one drops that device, not the
    round)."""
    out = []
    for name, cfg in zip(wire.INSTANCES, configs, strict=True):
        y = reply.arrays.get(name)
        if y is None or y.shape != (cfg.length,) or y.dtype != np.uint64:
            raise wire.MalformedStage(f"masked {name}: not uint64 of shape ({cfg.length},)")
        out.append(y)
    return out[0], out[1]


def secagg_deployed_round(
    exchange: Exchange,
    config: SimulationConfig,
    ddg: DDGParams,
    nodes: Sequence[int],
    params: dict[str, np.ndarray],
    round: int,
    *,
    masked_fields: Mapping[int, dict[str, Any]] | None = None,
    members: Callable[[StageReply], int] | None = None,
) -> list[tuple[DeviceReply, str | None]]:
    """The round's replies as the server may see them: per device only whether it failed or
    declined (and its ledger head), and the pooled reply of the survivors' decoded sums
    (none when the round was aborted).

    A party may be several devices (an execution slot of the simulation, which sums its
    devices' encodings: `fedrec.simulations.secagg_slots`): `masked_fields` adds fields to a
    node's masked-stage request (the users it plays), and `members(reply)` reads how many
    devices a party's masked input holds. K_min then counts the survivors' members: the
    server aborts below it, and the unmask request lists each survivor's members, so that a
    party can check the total it is asked to reveal for."""
    index = {node: k + 1 for k, node in enumerate(sorted(nodes))}
    node_of = {k: node for node, k in index.items()}
    seed = round_public_seed(config.seed, round)
    # the devices' own K_min check (SecAggDevice.unmask) counts parties; a party of several
    # devices checks their total instead (`party_check`), so the parties' count only needs 1
    configs = secagg_configs(
        ddg,
        devices=len(nodes),
        min_survivors=config.min_survivors if members is None else 1,
        public_seed=seed,
    )
    server = SecAggRound(ddg, configs, params)
    errors: dict[int, str] = {}
    status: dict[int, dict[str, str]] = {}

    def ask(stage: str, requests: dict[int, tuple[dict, dict | None]], decode) -> dict[int, Any]:
        """Send one stage to the protocol ids in `requests`; each answer decoded, for those
        that are not errors, declines or malformed (the device drops out of the round)."""
        sent = {
            node_of[k]: ({"round": round, "stage": stage, **f}, p) for k, (f, p) in requests.items()
        }
        answered = {}
        for node, reply in exchange(stage, sent).items():
            mine = status.setdefault(node, {})
            for key in ("ledger_head", "declined"):
                if reply.status.get(key):
                    mine[key] = reply.status[key]
            if reply.error:
                errors[node] = f"{stage}: {reply.error}"
            elif not reply.status.get("declined"):
                try:
                    answered[index[node]] = decode(reply, index[node])
                except (wire.MalformedStage, KeyError, ValueError, TypeError) as err:
                    errors[node] = f"{stage}: malformed reply: {err}"
        return answered

    pooled: list[tuple[DeviceReply, str | None]] = []
    try:
        common = {"devices": len(nodes), "public-seed": seed}
        adverts = ask(
            "keys",
            {k: (common | {"index": k}, None) for k in node_of},
            lambda r, k: wire.unpack_keys(r.fields),
        )
        roster = wire.pack_roster(server.collect_keys(adverts))
        outgoing = ask(
            "shares",
            {k: (roster, None) for k in adverts},
            lambda r, k: wire.unpack_pair("shares", r.fields),
        )
        routed = server.route_shares(outgoing)
        extra = masked_fields or {}
        weights: dict[int, int] = {}

        def masked_input(reply: StageReply, k: int) -> tuple[np.ndarray, np.ndarray]:
            inputs = masked_inputs(reply, configs)
            if members is not None:
                weights[k] = members(reply)
            return inputs

        masked = ask(
            "masked",
            {
                k: (wire.pack_pair("routed", routed[k]) | extra.get(node_of[k], {}), params)
                for k in routed
            },
            masked_input,
        )
        survivors, dropouts = server.collect_masked(masked)
        total = len(survivors) if members is None else sum(weights[k] for k in survivors)
        if total < config.min_survivors:
            raise SecAggAbort(f"{total} devices in the masked inputs, fewer than K_min")
        log.info(
            "round %d: %d masked inputs, %d dropped after sharing keys: unmasking",
            round,
            len(survivors),
            len(dropouts),
        )
        request = {"survivors": survivors, **({"dropouts": dropouts} if dropouts else {})}
        if members is not None:
            request["members"] = [weights[k] for k in survivors]
        responses = ask(
            "unmask",
            {k: (request, None) for k in survivors},
            lambda r, k: wire.unpack_unmask(r.fields),
        )
        pooled.append((server.unmask(responses, members=total), None))
    except (SecAggAbort, SecAggRefusal) as err:
        log.warning("round %d: secure aggregation aborted, nothing unmasked: %s", round, err)
    out = []
    for node in nodes:
        mine = status.get(node, {})
        reply = DeviceReply(
            node, None, 0, {}, error=errors.get(node), ledger_head=mine.get("ledger_head")
        )
        out.append((reply, mine.get("declined")))
    return out + pooled

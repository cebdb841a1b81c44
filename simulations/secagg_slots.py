"""SecAgg+ in the Flower transport of the simulation (`secure-aggregation-protocol = "secagg"`):
each execution slot takes part in the round's SecAgg+ as ONE party whose input is the modular
sum of the DDG encodings of the devices it plays.

The server runs the same stages as over real devices (`fedrec.server.secagg_deployment`: keys,
shares, masked, unmask), with the slots as parties. In the masked stage a slot plays its users'
devices, rounds each trained device's change on its own, draws all its members' discrete
Gaussian shares as one (`fedrec.common.secagg.encoding.noised_residues` says why the
accountant's bound at n devices still holds), and sends the sum masked: what the server
receives of a slot looks uniform mod 2^b, and only the total over the surviving slots unmasks.
Per device the server learns what it learns under any secure sum: whether the device failed,
and its ledger commitment. A slot refuses to unmask unless the survivors it is told of hold at
least K_min devices, its own count as it sent it (`party_check`).

Plain functions: `fedrec.simulations.client_app` keeps the slot's session between messages
(Flower's `context.state`) and `fedrec.simulations.server_app` moves the messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrec.client import secagg_device as sa
from fedrec.common.privacy.randomness import privacy_randomness
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg import wire
from fedrec.common.secagg.encoding import DDGParams, rounded_update
from fedrec.common.secagg.protocol import SecAggRefusal
from fedrec.common.secagg.round_inputs import encode_members

MEMBERS = "members"  # a masked reply's field: the devices in the slot's sum


@dataclass
class SlotInputs:
    """A slot's two secure-sum inputs and what the server may see of each of its devices."""

    update: np.ndarray
    tally: np.ndarray
    members: int
    replies: list[DeviceReply] = field(default_factory=list)  # per device: error and head


def slot_inputs(
    config: SimulationConfig,
    replies: Sequence[DeviceReply],
    round: int,
    received: Mapping[str, np.ndarray],
    ddg: DDGParams,
    public_seed: int,
) -> SlotInputs:
    """The devices' replies (`played_replies`, idle shares owed) summed into the slot's inputs.

    A member is a device that trained or is idle (it owes a noise share); a failed device, or
    one whose update cannot be encoded, is not, and says so; a decline without a share is not
    a member and no failure (as in `fedrec.simulations.secagg_devices.device_inputs`)."""
    users = [r.user for r in replies]
    randomness = privacy_randomness(config.noise_seed, "ddg-slot", round, min(users, default=0))
    rounded, metrics, seen = [], [], []
    for reply in replies:
        error = reply.error
        idle = reply.params is None and reply.metrics.get("noise_only") == 1.0
        if error is None and reply.params is not None:
            try:
                change = sa.change_from(reply.params, dict(received))
                rounded.append(rounded_update(change, ddg, public_seed, randomness))
            except ValueError as err:
                error = f"invalid update: {err}"
        if error is None and (idle or reply.params is not None):
            metrics.append(reply.metrics)
        seen.append(
            DeviceReply(reply.user, None, 0, {}, error=error, ledger_head=reply.ledger_head)
        )
    update, tally = encode_members(rounded, metrics, ddg, randomness)
    return SlotInputs(update, tally, len(metrics), seen)


def party_check(request: Mapping[str, Any], index: int, sent: int, min_survivors: int) -> None:
    """Refuse to unmask unless the announced survivors hold at least K_min devices and this
    slot is counted with the members it sent (what a party of several devices can check)."""
    survivors = [int(i) for i in request.get("survivors", [])]
    counts = [int(c) for c in request.get(MEMBERS, [])]
    if len(counts) != len(survivors):
        raise SecAggRefusal("the unmask request does not count every survivor's devices")
    if index in survivors and counts[survivors.index(index)] != sent:
        raise SecAggRefusal(f"this slot sent {sent} devices, the request counts another number")
    if sum(counts) < min_survivors:
        raise SecAggRefusal(
            f"{sum(counts)} devices among the survivors, fewer than K_min = {min_survivors}"
        )


@dataclass
class SlotStage:
    """A slot's answer to one stage, and the state it keeps for the next (None: round over)."""

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    replies: list[DeviceReply]
    kept: dict[str, Any] | None


def slot_stage(
    config: SimulationConfig,
    request: Mapping[str, Any],
    received: dict[str, np.ndarray] | None,
    kept: Mapping[str, Any] | None,
    ddg: DDGParams,
) -> SlotStage:
    """One stage of the round on a slot: `request` the stage's fields, `received` the model
    (masked stage), `kept` what the previous stage left ({"session": bytes, "members": int}).
    SecAggRefusal or ValueError when the stage cannot be answered (the slot drops out)."""
    stage, round_ = str(request.get(wire.STAGE_KEY, "")), int(request.get("round", 0))
    if stage == "keys":
        session, fields = sa.start_session(round_, dict(request), ddg, 1)
        return SlotStage(dict(fields), {}, [], {"session": session.to_bytes(), MEMBERS: 0})
    if not kept or "session" not in kept:
        raise SecAggRefusal(f"stage {stage!r} without a session (keys not exchanged)")
    session = sa.SecAggSession.from_bytes(bytes(kept["session"]))
    session.expect(round_, stage)
    sent = int(kept.get(MEMBERS, 0))
    if stage == "shares":
        fields, arrays, replies = sa.share_keys(session, dict(request)), {}, []
    elif stage == "masked":
        from fedrec.simulations.devices import played_replies

        if received is None:
            raise ValueError("the masked stage came without the model")
        users = [int(u) for u in request.get("users", [])]
        played = played_replies(config, users, round_, received, draw_idle_noise=False)
        inputs = slot_inputs(config, played, round_, received, ddg, session.public_seed)
        routed = wire.unpack_pair("routed", dict(request))
        arrays = {
            "updates": session.updates.masked_input(routed[0], inputs.update),
            "counters": session.counters.masked_input(routed[1], inputs.tally),
        }
        fields, replies, sent = {MEMBERS: inputs.members}, inputs.replies, inputs.members
    elif stage == "unmask":
        party_check(request, session.index, sent, config.min_survivors)
        return SlotStage(sa.unmask(session, dict(request)), {}, [], None)
    else:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    return SlotStage(fields, arrays, replies, {"session": session.to_bytes(), MEMBERS: sent})

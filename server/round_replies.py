"""A round's replies sorted into what the server may aggregate and what it only counts.

The first step of `FederatedRun.finish_round`, as a plain function: every reply is checked
(`check_update`) before anything is added, a device that failed is counted, and under
secure aggregation the server takes nothing from a device but the round's sum.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedrec.common.replies import DeviceReply
from fedrec.server.aggregation import ClientUpdate, Rejection, check_reply_fields, check_update
from fedrec.server.secure_aggregation import add_pooled

log = logging.getLogger(__name__)


@dataclass
class RoundReplies:
    """What a round's replies give the server."""

    updates: list[ClientUpdate]  # to aggregate: the secure sum first, then devices' own
    devices: list[DeviceReply]  # one per device asked (the pooled sums left out)
    total: DeviceReply | None  # the secure sum of the pooled replies that passed the check
    survivors: int = 0  # devices whose update is in `updates` (a sum counts its devices)
    declined: int = 0  # devices outside a sum that said they had nothing to train on
    failed: int = 0
    dropped: list[str] = field(default_factory=list)  # why each refused reply was refused
    # the server's verdict on each device whose reply it refused (device -> reason), for
    # per-device records such as a deployment's devices.jsonl
    dropped_devices: dict[int, str] = field(default_factory=dict)
    # how many refused replies of each kind (`fedrec.server.aggregation.REJECTION_KINDS`)
    dropped_kinds: Counter[str] = field(default_factory=Counter)
    accepted: set[int] = field(default_factory=set)  # devices whose own update is in `updates`

    def drop(self, rejection: Rejection, user: int | None = None) -> None:
        self.dropped.append(rejection.reason)
        self.dropped_kinds[rejection.kind] += 1
        if user is not None:
            self.dropped_devices[user] = rejection.reason


def collect_updates(
    round: int,
    replies: Sequence[DeviceReply],
    params: Mapping[str, np.ndarray],
    *,
    secure: bool,
    update_bound: float | None,
) -> RoundReplies:
    """Sort `replies` against the global `params` they were computed from.

    Pooled replies (secure sums) are checked like an update (names, shapes, float32, finite)
    and added into one: the total is all the server learns of them. A device's own reply
    counts as failed (an error), declined, or an update within `update_bound`; under secure
    aggregation (`secure`) a device's own update or metrics are refused, since it may say only
    whether it failed (`fedrec.server.secure_aggregation.secure_sum`)."""
    pooled = [r for r in replies if r.pooled]
    devices = [r for r in replies if not r.pooled]
    rejected: list[Rejection] = []
    valid = []
    for reply in pooled:
        rejection = check_update(reply.params or {}, params)
        if rejection is not None:
            rejected.append(rejection)
            log.warning(
                "round %d: dropped a sum of %d devices: %s", round, reply.pooled, rejection.reason
            )
            continue
        valid.append(reply)
    total = add_pooled(valid)
    collected = RoundReplies(updates=[], devices=devices, total=total)
    for rejection in rejected:
        collected.drop(rejection)
    if total is not None:
        shares = {n: params[n] + total.params[n] for n in params}
        collected.updates.append(ClientUpdate("secure-sum", shares, 0))
        collected.survivors += total.pooled
    for reply in devices:
        _collect_device(round, reply, params, collected, secure=secure, bound=update_bound)
    return collected


def _collect_device(
    round: int,
    reply: DeviceReply,
    params: Mapping[str, np.ndarray],
    collected: RoundReplies,
    *,
    secure: bool,
    bound: float | None,
) -> None:
    """One device's own reply, counted into `collected`."""
    if reply.error is not None:
        collected.failed += 1
        if reply.rejected is not None:  # refused by the secure sum's input check
            collected.dropped_kinds[reply.rejected] += 1
        log.warning("round %d: device %d failed: %s", round, reply.user, reply.error)
        return
    if secure and (reply.params is not None or reply.metrics):
        reason = "a device's own update or metrics under secure aggregation"
        collected.drop(Rejection("secure-aggregation", reason), reply.user)
        log.warning("round %d: dropped device %d: %s", round, reply.user, reason)
        return
    rejection = check_reply_fields(reply)
    if rejection is not None:
        collected.drop(rejection, reply.user)
        log.warning("round %d: dropped device %d: %s", round, reply.user, rejection.reason)
        return
    if reply.metrics.get("declined") == 1.0:
        collected.declined += 1  # under secure aggregation counted in the sum instead
    if reply.params is None:
        return
    rejection = check_update(reply.params, params, bound)
    if rejection is not None:
        collected.drop(rejection, reply.user)
        log.warning(
            "round %d: dropped update of device %d: %s", round, reply.user, rejection.reason
        )
        return
    if reply.user in collected.accepted:
        # counting a device twice would double its influence
        rejection = Rejection("duplicate", f"a second update of device {reply.user}")
        collected.drop(rejection)
        log.warning("round %d: dropped %s", round, rejection.reason)
        return
    collected.updates.append(ClientUpdate(str(reply.user), reply.params, reply.num_examples))
    collected.accepted.add(reply.user)
    collected.survivors += 1

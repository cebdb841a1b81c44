"""What secure aggregation lets the server learn of a round: sums, never a device's own reply.

`secure_sum` runs where the devices' replies are (in simulation: an execution slot's message,
or the in-process loop; the devices of a real secure aggregation protocol would compute the
same with masks), `add_pooled` on the server, which adds the pooled replies up before reading
anything (`fedrec.server.federated_run.FederatedRun.finish_round`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedrec.common.replies import DeviceReply
from fedrec.common.secagg.round_inputs import (  # noqa: F401 (re-exported)
    EPS_BIN,
    EPS_BINS,
    SUMMED_METRICS,
    epsilon_bin_key,
    reply_counters,
)
from fedrec.server.aggregation import check_reply_fields, check_update


def epsilon_bound(counters: dict[str, float]) -> float | None:
    """The upper edge of the highest non-empty ε bin; None if no device reported an ε, or one
    fell in the open bin (above EPS_BINS * EPS_BIN: no finite bound)."""
    edges = [int(k.split("/")[1]) for k, v in counters.items() if k.startswith("eps_bin/") and v]
    if not edges or max(edges) > EPS_BINS:
        return None
    return max(edges) * EPS_BIN


def secure_sum(
    replies: Sequence[DeviceReply],
    received: dict[str, np.ndarray],
    max_change: float | None = None,
    idle_noise: Callable[[int], dict[str, np.ndarray]] | None = None,
) -> list[DeviceReply]:
    """What secure aggregation lets the server learn of these devices' replies (DISTRIBUTED).

    Per device only whether it failed (and why): its reply carries no parameters and no
    metrics. Everything else is ONE pooled reply: the sum of the updates' changes from the
    `received` parameters, and the sum of the counters in SUMMED_METRICS, plus "trained",
    "loss" and "loss_count" (devices that trained, and the sum of their finite losses) and
    a histogram of the devices' worst interaction ε (`epsilon_bin_key`);
    `pooled` is the number of devices in the sum. A device's update is checked before it
    joins (shape, dtype, finite, and at most `max_change` from `received`: what input
    validation in a secure aggregation protocol checks on the device), and one that fails
    is a failed device, not a poisoned sum.
    In simulation this runs where the devices' replies are (a slot's message, or the
    sequential loop); the server adds the pooled replies up before reading anything.

    `idle_noise(k)`: the sum of k idle devices' noise shares, drawn at once (simulated devices
    that run in one process). Replies without parameters but with "noise_only" are then
    members whose share is in that draw: the sum of k independent N(0, s²) vectors is one
    N(0, k·s²) vector, so the sum has the distribution it would have with one draw per
    device. What the one draw skips is each share's input check, which an N(0, s²) share
    fails with probability below 1e-20 (`SimulationConfig.update_norm_bound`)."""
    out: list[DeviceReply] = []
    total = {name: np.zeros(value.shape, np.float64) for name, value in received.items()}
    counters = dict.fromkeys((*SUMMED_METRICS, "trained", "loss", "loss_count"), 0.0)
    members: list[int] = []
    idle_shares = 0  # members whose noise share `idle_noise` draws
    for reply in replies:
        error, rejected = reply.error, None
        if error is None:  # what it adds to the counters must be numbers
            rejection = check_reply_fields(reply)
            if rejection is not None:
                error, rejected = f"invalid reply: {rejection.reason}", rejection.kind
        share_owed = (
            idle_noise is not None
            and error is None
            and reply.params is None
            and reply.metrics.get("noise_only") == 1.0
        )
        if error is None and reply.params is not None:
            rejection = check_update(reply.params, received, max_change)
            if rejection is not None:
                error, rejected = f"invalid update: {rejection.reason}", rejection.kind
        if error is not None or (reply.params is None and not share_owed):
            out.append(
                DeviceReply(
                    reply.user,
                    None,
                    0,
                    {},
                    error=error,
                    ledger_head=reply.ledger_head,
                    rejected=rejected,
                )
            )
            continue
        if share_owed:
            idle_shares += 1
        else:
            for name, value in reply.params.items():
                total[name] += value.astype(np.float64) - received[name]
        for key, value in reply_counters(reply.metrics).items():
            counters[key] = counters.get(key, 0.0) + value
        members.append(reply.user)
        # a keyed commitment to its ledger's head: looks random to the server (not a count)
        out.append(DeviceReply(reply.user, None, 0, {}, ledger_head=reply.ledger_head))
    if idle_shares:
        for name, noise in idle_noise(idle_shares).items():
            total[name] += noise
    if members:
        changes = {name: value.astype(np.float32) for name, value in total.items()}
        out.append(DeviceReply(min(members), changes, 0, counters, pooled=len(members)))
    return out


def add_pooled(pooled: Sequence[DeviceReply]) -> DeviceReply | None:
    """The pooled replies of one round added into one (None if there are none): what the
    server of a secure aggregation learns is this total, never a part of it."""
    if not pooled:
        return None
    params = {
        n: np.sum([r.params[n] for r in pooled], axis=0, dtype=np.float64) for n in pooled[0].params
    }
    metrics: dict[str, float] = {}
    for reply in pooled:
        for key, value in reply.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    return DeviceReply(
        min(r.user for r in pooled),
        {n: v.astype(np.float32) for n, v in params.items()},
        0,
        metrics,
        pooled=sum(r.pooled for r in pooled),
    )

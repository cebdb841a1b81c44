"""Flower ServerApp: sample devices, send them the model, hand their replies to FederatedRun.

Everything that decides anything (sampling, validation, aggregation, accounting, checkpoints,
the report) is plain code in `fedrec.simulations.federation` / `.report`; this file only moves
messages. It raises on failure, so the run ends as failed (a `sys.exit` in a ServerApp thread
would be reported as completed).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrec.common.console import apply_inherited_level
from fedrec.common.deployment import (
    REPLY_KEY,
    DeploymentSettings,
    MalformedParameters,
    parameters_from,
    parameters_record,
    split_reply,
    split_run_config,
)
from fedrec.common.run_lock import WriterGuard
from fedrec.simulations.config import SimulationConfig
from fedrec.simulations.federation import DeviceReply, FederatedRun
from fedrec.simulations.report import finalize

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    apply_inherited_level()  # the `fedrec` command's --log-level
    settings, flat = split_run_config(dict(context.run_config))
    config = SimulationConfig.from_flat(flat)
    # An orphan of a killed launcher must not write a folder another run now owns.
    with WriterGuard(Path(config.out), str(context.run_config.get("run-token", ""))) as guard:
        if settings.deployment:
            deploy(grid, config, settings, guard)
        else:
            simulate_rounds(grid, context, config, guard)


def simulate_rounds(
    grid: Grid, context: Context, config: SimulationConfig, guard: WriterGuard
) -> None:
    run = FederatedRun(config)
    slots = wait_for_nodes(grid, int(context.run_config.get("expected-nodes", 0)))
    for round_ in run.pending_rounds():
        guard.check()
        if not run.budget_allows_next_round():
            log.warning("user-level budget reached before round %d: stopping", round_)
            break
        start = time.perf_counter()
        users = [int(u) for u in run.begin_round(round_)]
        arrays = parameters_record(run.params)  # once per round
        size = devices_per_message(len(users), len(slots))
        chunks = [users[i : i + size] for i in range(0, len(users), size)]
        replies = []
        # one message per slot at a time: a slot's second message waits a polling pass
        for wave in range(0, len(chunks), len(slots)):
            batch = chunks[wave : wave + len(slots)]
            messages = [
                Message(
                    RecordDict(
                        {
                            "arrays": arrays,
                            "config": ConfigRecord({"users": chunk, "round": round_}),
                        }
                    ),
                    dst_node_id=node,
                    message_type="train",
                )
                for node, chunk in zip(slots, batch, strict=False)
            ]
            answered = grid.send_and_receive(messages)
            named = set()
            for reply in answered:  # in any order: each names its devices
                if not reply.has_error():
                    users_in_reply = [int(u) for u in reply.content["status"]["users"]]
                    named.update(users_in_reply)
                    replies.extend(unpack_devices(users_in_reply, reply))
            # a failed message names nobody: its devices are the ones no reply accounted for
            lost = [u for chunk in batch for u in chunk if u not in named]
            errors = [str(r.error.reason) for r in answered if r.has_error()]
            for user in lost:
                reason = errors[0] if errors else "no reply"
                replies.append(DeviceReply(user, None, 0, {}, error=reason))
        row = run.finish_round(round_, replies, time.perf_counter() - start)
        print(f"[fedrec] round {round_}: {row}", flush=True)
    finalize(run)


# Virtual devices per simulation message: a device round takes ~10 ms, Flower's handling of a
# message about as much again; 8 per message cut a round of 200 devices from 3.7 s to ~2 s.
DEVICES_PER_MESSAGE = 8


def devices_per_message(devices: int, slots: int) -> int:
    """At least 8, and few enough messages for one per slot: a round is one wave (a wave
    waits for its slowest message)."""
    return max(DEVICES_PER_MESSAGE, math.ceil(devices / max(1, slots)))


def unpack_devices(users: list[int], reply: Message) -> list[DeviceReply]:
    """Split a slot's reply for several devices ("<user>/<key>") into one DeviceReply each."""
    if reply.has_error():
        return [DeviceReply(u, None, 0, {}, error=str(reply.error.reason)) for u in users]
    content = reply.content
    metrics, status = dict(content["metrics"]), dict(content["status"])
    arrays = {}
    if "arrays" in content:
        try:
            arrays = parameters_from(content["arrays"])
        except MalformedParameters as err:
            reason = f"malformed parameters in the reply: {err}"
            return [DeviceReply(u, None, 0, {}, error=reason) for u in users]
    stacked = {k[len("stacked/") :]: v for k, v in arrays.items() if k.startswith("stacked/")}
    row = {int(u): i for i, u in enumerate(status.get("stacked", []))}
    pooled_users = {int(u) for u in status.get("pooled", [])}
    # members of the sum as the sum itself counted them (devices that sent no update are not)
    pooled_count = int(status.get("pooled_count", 0))
    out = []
    if pooled_count:  # the secure sum of those devices (fedrec.simulations.federation.secure_sum)
        shares = {k[len("pooled/") :]: v for k, v in arrays.items() if k.startswith("pooled/")}
        counters = {
            k[len("pooled/") :]: float(v) for k, v in metrics.items() if k.startswith("pooled/")
        }
        out.append(DeviceReply(min(pooled_users), shares, 0, counters, pooled=pooled_count))
    for user in users:
        prefix = f"{user}/"
        mine = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}
        if user in row:
            params = {name: values[row[user]] for name, values in stacked.items()}
        elif user in pooled_users:
            params = {}  # its share is in the pooled sum
        else:
            params = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        error = str(status.get(f"{prefix}error", "missing from the reply"))
        out.append(
            DeviceReply(
                user,
                params or None,
                int(mine.pop("num-examples", 0)),
                mine,
                error=error or None,
                ledger_head=str(status.get(f"{prefix}head", "")) or None,
            )
        )
    return out


def unpack(user: int, reply: Message) -> DeviceReply:
    if reply.has_error():
        return DeviceReply(user, None, 0, {}, error=str(reply.error.reason))
    content = reply.content
    if REPLY_KEY not in content:
        return DeviceReply(user, None, 0, {}, error=f"reply without its {REPLY_KEY!r} record")
    metrics, status = split_reply(dict(content[REPLY_KEY]))
    error = str(status.get("error", ""))
    head = str(status.get("ledger_head", "")) or None
    params = None
    if "arrays" in content and not error:
        try:
            params = parameters_from(content["arrays"])
        except MalformedParameters as err:
            error = f"malformed parameters in the reply: {err}"
    return DeviceReply(
        int(metrics.pop("user", user)),
        params,
        int(metrics.pop("num-examples", 0)),
        {k: float(v) for k, v in metrics.items()},
        error=error or None,
        ledger_head=head,
    )


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 120.0) -> list[int]:
    """The simulation registers its SuperNodes after the ServerApp starts: wait for them."""
    deadline = time.monotonic() + timeout
    previous = -1
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if (expected and len(nodes) >= expected) or (
            not expected and nodes and len(nodes) == previous
        ):
            return nodes
        previous = len(nodes)
        time.sleep(0.5)
    raise RuntimeError(
        f"only {previous} of {expected or 'the'} SuperNodes registered in {timeout:.0f}s"
    )


def deploy(
    grid: Grid, config: SimulationConfig, settings: DeploymentSettings, guard: WriterGuard
) -> None:
    """A run over real devices: every connected SuperNode is one device."""
    from fedrec.common.flower_patches import shorten_pull_backoff
    from fedrec.server.deployment import run_deployment

    shorten_pull_backoff()

    def send(nodes, params, round_):
        guard.check()
        arrays = parameters_record(params)
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({"round": round_})}),
                dst_node_id=node,
                message_type="train",
            )
            for node in nodes
        ]
        answered = {}
        for node, reply in send_and_receive(grid, messages, settings.round_timeout_s):
            declined = ""
            if not reply.has_error() and REPLY_KEY in reply.content:
                declined = str(reply.content[REPLY_KEY].get("declined", ""))
            answered[node] = (unpack(node, reply), declined or None)
        return [
            answered.get(
                node,
                (
                    DeviceReply(node, None, 0, error=f"no reply in {settings.round_timeout_s:g}s"),
                    None,
                ),
            )
            for node in nodes
        ]

    def on_round(row: dict) -> None:
        print(f"[fedrec] round {row['round']}: {row}", flush=True)

    run_deployment(config, settings, lambda: list(grid.get_node_ids()), send, on_round)


# Flower's own send_and_receive polls every 3 s: most of a short round. One ServerApp asks
# its SuperLink 20 times a second; 0.2 s cost a warm message ~0.1 s on average.
REPLY_POLL_S = 0.05


def send_and_receive(
    grid: Grid, messages: list[Message], timeout: float
) -> list[tuple[int, Message]]:
    """Push, then pull replies every REPLY_POLL_S until all arrived or `timeout` passed; each
    reply with the node its message went to. (The SuperLink answers a message to a node that
    missed its heartbeats with a NODE_UNAVAILABLE error reply of its own, whose source is the
    SuperLink, not the node: the message id is what ties a reply to its device.)"""
    ids = list(grid.push_messages(messages))
    node_of = {mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, messages, strict=True)}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    replies: list[tuple[int, Message]] = []
    while pending:
        got = _pull_replies(grid, pending)
        for reply in got:
            replies.append((node_of[reply.metadata.reply_to_message_id], reply))
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(REPLY_POLL_S)
    return replies


def _pull_replies(grid: Grid, pending: set[str]) -> list[Message]:
    """The replies that arrived; none this time when the SuperLink failed transiently. Under
    load (10 devices on 2 cores) the SuperLink's SQLite state answered a pull with
    `database is locked` (HTTP 500), which ended the whole run; the failed pull's transaction
    is rolled back, so the replies are still there at the next poll."""
    try:
        return list(grid.pull_messages(pending))
    except Exception as err:
        if not is_transient_transport_error(err):
            raise
        log.warning("pulling replies failed (%s); retrying at the next poll", err)
        return []


def is_transient_transport_error(err: BaseException) -> bool:
    """A SuperLink error worth retrying: an HTTP 5xx, or gRPC UNAVAILABLE / INTERNAL /
    DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED. Anything else (4xx: a bad request, an unknown
    run) is not transient."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500
    code = getattr(err, "code", None)
    if callable(code):
        import grpc

        try:
            value = code()
        except Exception:
            return False
        return value in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return False

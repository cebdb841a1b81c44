"""The deployment's Flower ServerApp: every connected SuperNode is one device; send each
sampled one the model, hand their replies to the run.

Everything that decides anything (sampling, validation, aggregation, accounting, checkpoints)
is plain code in `fedrec.server.federated_run` / `.deployment`; this file only moves messages.
It raises on failure, so the run ends as failed (a `sys.exit` in a ServerApp thread would be
reported as completed). A simulation runs its own ServerApp (`fedrec.simulations.server_app`),
which plays many virtual devices per message.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
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
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.run_lock import WriterGuard

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    apply_inherited_level()  # the `fedrec` command's --log-level
    settings, flat = split_run_config(dict(context.run_config))
    if not settings.deployment:
        raise ValueError(
            "this ServerApp runs a deployment (run config deployment = true, as `fedrec server "
            "start` submits it); a simulation runs fedrec.simulations.server_app:app"
        )
    config = SimulationConfig.from_flat(flat)
    # An orphan of a killed launcher must not write a folder another run now owns.
    with WriterGuard(Path(config.out), str(context.run_config.get("run-token", ""))) as guard:
        deploy(grid, config, settings, guard)


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


def deploy(
    grid: Grid, config: SimulationConfig, settings: DeploymentSettings, guard: WriterGuard
) -> None:
    """A run over real devices: every connected SuperNode is one device."""
    from fedrec.common.flower_patches import retry_transient_errors_of_grid, shorten_pull_backoff
    from fedrec.server.deployment import run_deployment

    shorten_pull_backoff()
    retry_transient_errors_of_grid(grid)

    traffic = {"to": 0, "from": 0}  # the round's message bytes, both ways

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
        traffic["to"] += sum(content_bytes(m.content) for m in messages)
        answered = {}
        for node, reply in send_and_receive(grid, messages, settings.round_timeout_s):
            traffic["from"] += content_bytes(reply.content) if not reply.has_error() else 0
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

    def exchange(stage, requests):
        """One SecAgg+ stage: a message to each node, its reply unpacked (plain values)."""
        from fedrec.server.secagg_deployment import StageReply

        guard.check()
        nodes = list(requests)
        messages = []
        for node in nodes:
            fields, params = requests[node]
            content = RecordDict({"config": ConfigRecord(fields)})
            if params is not None:
                content["arrays"] = parameters_record(params)
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        traffic["to"] += sum(content_bytes(m.content) for m in messages)
        out = {
            node: StageReply(status={"error": f"no reply in {settings.round_timeout_s:g}s"})
            for node in nodes
        }
        for node, reply in send_and_receive(grid, messages, settings.round_timeout_s):
            out[node] = unpack_stage(reply)
            traffic["from"] += content_bytes(reply.content) if not reply.has_error() else 0
        answered = sum(not r.error for r in out.values())
        print(f"[fedrec] secure aggregation {stage}: {answered} of {len(nodes)}", flush=True)
        return out

    def send_secagg(nodes, params, round_):
        from fedrec.server.secagg_deployment import secagg_deployed_round

        ddg = config.ddg_params(sum(int(v.size) for v in params.values()))
        return secagg_deployed_round(exchange, config, ddg, nodes, params, round_)

    def on_round(row: dict) -> None:
        print(f"[fedrec] round {row['round']}: {row}", flush=True)
        # what the messages of the round weighed (benchmarks/deployment.py reads it)
        print(
            f"[fedrec] traffic round {row['round']}: {traffic['to']} bytes to devices, "
            f"{traffic['from']} bytes from devices, {row['sampled']} sampled",
            flush=True,
        )
        traffic.update({"to": 0, "from": 0})

    run_deployment(
        config,
        settings,
        lambda: list(grid.get_node_ids()),
        send_secagg if config.secagg else send,
        on_round,
    )


def content_bytes(content: RecordDict) -> int:
    """The serialised size of a message's content (its records), as the transport carries it."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def unpack_stage(reply: Message):
    """A device's reply to a SecAgg+ stage as plain values (`StageReply`)."""
    from fedrec.common.secagg.wire import MASKED_KEY, SECAGG_KEY
    from fedrec.server.secagg_deployment import StageReply

    if reply.has_error():
        return StageReply(status={"error": str(reply.error.reason)})
    content = reply.content
    if REPLY_KEY not in content:
        return StageReply(status={"error": f"reply without its {REPLY_KEY!r} record"})
    _, status = split_reply(dict(content[REPLY_KEY]))
    fields = dict(content[SECAGG_KEY]) if SECAGG_KEY in content else {}
    arrays = {}
    if MASKED_KEY in content:
        try:
            arrays = {k: np.asarray(v.numpy()) for k, v in content[MASKED_KEY].items()}
        except Exception as err:  # a device's malformed arrays end its round, not the run
            return StageReply(status={"error": f"malformed masked input: {err}"})
    return StageReply(fields, arrays, {k: v for k, v in status.items() if v})


# Flower's own send_and_receive polls every 3 s: most of a short round. A reply waits half
# the interval on average, and one ServerApp asking its SuperLink 20 times a second costs it
# little (benchmarks/results/deployment-transport-before-after.json).
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
    load the SuperLink's SQLite state can answer a pull with `database is locked` (HTTP 500),
    which must not end the whole run; the failed pull's transaction is rolled back, so the
    replies are still there at the next poll."""
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

"""The simulation's Flower ServerApp: sample devices, send each execution slot the model and
the users whose devices it plays, hand their replies to the run, and write the report.

Everything that decides anything (sampling, validation, aggregation, accounting, checkpoints)
is plain code in `fedrec.server.federated_run`, the report in `fedrec.simulations.report`; this
file only moves messages. The virtual SuperNodes are execution slots: each message names the
users whose devices the slot plays (`fedrec.simulations.client_app`). It raises on failure, so
the run ends as failed (a `sys.exit` in a ServerApp thread would be reported as completed).
A deployment runs its own ServerApp (`fedrec.server.app`), one device per SuperNode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrec.common.console import apply_inherited_level
from fedrec.common.deployment import (
    MalformedParameters,
    parameters_from,
    parameters_record,
    split_run_config,
)
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.run_lock import WriterGuard
from fedrec.server.federated_run import FederatedRun, run_rounds
from fedrec.simulations.report import finalize

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    apply_inherited_level()  # the `fedrec` command's --log-level
    settings, flat = split_run_config(dict(context.run_config))
    if settings.deployment:
        raise ValueError(
            "this ServerApp runs a simulation; a deployment (run config deployment = true) "
            "runs fedrec.server.app:app, as `fedrec server start` submits it"
        )
    config = SimulationConfig.from_flat(flat)
    # An orphan of a killed launcher must not write a folder another run now owns.
    with WriterGuard(Path(config.out), str(context.run_config.get("run-token", ""))) as guard:
        simulate_rounds(grid, context, config, guard)


def simulate_rounds(
    grid: Grid, context: Context, config: SimulationConfig, guard: WriterGuard
) -> None:
    # The run is prepared (data, model, calibration: seconds) while the slots register and
    # warm up (`warm_up`), instead of one after the other.
    with ThreadPoolExecutor(1) as preparing:
        prepared = preparing.submit(FederatedRun, config)
        slots = wait_for_nodes(grid, int(context.run_config.get("expected-nodes", 0)))
        warming = warm_up(grid, slots)
        run = prepared.result()
    wait_for_replies(grid, warming)

    def send_round(round_: int, users: list[int], params: dict[str, np.ndarray]):
        arrays = parameters_record(params)  # once per round
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
        return replies

    def send_secagg_round(round_: int, users: list[int], params: dict[str, np.ndarray]):
        return secagg_slot_round(grid, config, slots, round_, users, params)

    def on_round(row: dict) -> None:
        print(f"[fedrec] round {row['round']}: {row}", flush=True)

    # the run folder may have passed to another launch meanwhile: checked before every round
    run_rounds(
        run,
        send_secagg_round if config.secagg else send_round,
        before_round=lambda _: guard.check(),
        on_round=on_round,
    )
    finalize(run)


# Virtual devices per simulation message: Flower's handling of a message costs about as much
# as a device round, so several devices share one (benchmarks/results/federated.json,
# "speed_before_batching").
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
    if pooled_count:  # those devices' secure sum (fedrec.server.secure_aggregation)
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


def secagg_slot_round(
    grid: Grid,
    config: SimulationConfig,
    slots: list[int],
    round_: int,
    users: list[int],
    params: dict[str, np.ndarray],
) -> list[DeviceReply]:
    """A round under SecAgg+ with the slots as parties (`fedrec.simulations.secagg_slots`): the
    stages of `secagg_deployed_round`, each one message per slot; every slot plays an equal
    share of `users` in the masked stage. Per device the reply says only whether it failed
    (and its ledger commitment); the pooled reply is the unmasked total (none if aborted)."""
    from fedrec.server.secagg_deployment import secagg_deployed_round
    from fedrec.simulations.secagg_slots import MEMBERS

    parties = slots[: max(1, min(len(slots), len(users)))]
    chunks = {node: users[k :: len(parties)] for k, node in enumerate(parties)}
    masked: dict[int, Message] = {}

    def exchange(stage: str, requests: dict) -> dict:
        replies = exchange_with_slots(grid, requests)
        if stage == "masked":
            masked.update(replies)
        return {node: stage_reply(replies.get(node)) for node in requests}

    ddg = config.ddg_params(sum(int(v.size) for v in params.values()))
    results = secagg_deployed_round(
        exchange,
        config,
        ddg,
        parties,
        params,
        round_,
        masked_fields={node: {"users": chunk} for node, chunk in chunks.items()},
        members=lambda reply: int(reply.fields[MEMBERS]),
    )
    out = [reply for reply, _ in results if reply.pooled]
    failed = {reply.user: reply.error for reply, _ in results if not reply.pooled}
    for node, chunk in chunks.items():
        reply, reason = masked.get(node), failed.get(node)
        if reply is not None and "users" in reply.content.get("status", {}):
            named = unpack_devices(chunk, reply)  # it played its devices
        else:
            named, reason = [DeviceReply(u, None, 0, {}) for u in chunk], reason or "no reply"
        if reason:  # its devices' shares are not in the sum
            why = f"its execution slot dropped out of secure aggregation: {reason}"
            named = [dataclasses.replace(r, error=r.error or why) for r in named]
        out.extend(named)
    return out


def exchange_with_slots(grid: Grid, requests: dict, timeout: float = 3600.0) -> dict[int, Message]:
    """One message per node ({node: (fields, parameters or None)}), and the replies that came
    back, by node (a message's id ties its reply to its node)."""
    messages = []
    for node, (fields, params) in requests.items():
        content = RecordDict({"config": ConfigRecord(fields)})
        if params is not None:
            content["arrays"] = parameters_record(params)
        messages.append(Message(content, dst_node_id=node, message_type="train"))
    ids = list(grid.push_messages(messages))
    node_of = dict(zip(ids, requests, strict=True))
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(ids) and time.monotonic() < deadline:
        for reply in grid.pull_messages([i for i in ids if node_of[i] not in replies]):
            replies[node_of[reply.metadata.reply_to_message_id]] = reply
        if len(replies) < len(ids):
            time.sleep(0.02)
    return replies


def stage_reply(reply: Message | None):
    """A slot's reply to a stage as plain values (`StageReply`)."""
    from fedrec.common.secagg.wire import MASKED_KEY, SECAGG_KEY
    from fedrec.server.secagg_deployment import StageReply

    if reply is None:
        return StageReply(status={"error": "no reply"})
    if reply.has_error():
        return StageReply(status={"error": str(reply.error.reason)})
    content = reply.content
    error = str(dict(content["status"]).get("error", "")) if "status" in content else "no status"
    fields = dict(content[SECAGG_KEY]) if SECAGG_KEY in content else {}
    arrays = {}
    if MASKED_KEY in content:
        arrays = {k: np.asarray(v.numpy()) for k, v in content[MASKED_KEY].items()}
    return StageReply(fields, arrays, {"error": error} if error else {})


def warm_up(grid: Grid, slots: list[int]) -> list[str]:
    """Ask every slot to load torch, the data and the model now (`client_app.warm_up`): a few
    seconds per slot that then overlap the run's own preparation instead of delaying round 1."""
    messages = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in slots]
    return list(grid.push_messages(messages))


def wait_for_replies(grid: Grid, message_ids: list[str], timeout: float = 120.0) -> None:
    """Collect the replies to `message_ids` (errors included: a slot that failed to warm up
    loads on its first round instead), at most `timeout` seconds."""
    pending, deadline = set(message_ids), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(0.05)


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

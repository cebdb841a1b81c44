"""The simulation's Flower ClientApp: each virtual SuperNode is an execution slot that plays,
one after the other, the devices of the users the ServerApp names in its message (`users` in
the config record); every device's state lives in its own folder, so any slot can serve any
device (`fedrec.simulations.devices`).

A deployment runs its own ClientApp (`fedrec.client.app`), one real device per SuperNode.
Heavy modules (torch, opacus, the data) are imported inside the handler, when needed.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.common.deployment import parameters_from, parameters_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from fedrec.common.console import apply_inherited_level

    apply_inherited_level()  # the `fedrec` command's --log-level
    torch.set_num_threads(1)  # one Ray actor per CPU: more threads only contend
    from fedrec.common.run_config import SimulationConfig
    from fedrec.common.secagg.wire import STAGE_KEY
    from fedrec.simulations.devices import simulated_replies

    config = SimulationConfig.from_flat(dict(context.run_config))
    instructions = msg.content["config"]
    if STAGE_KEY in instructions or config.secagg:
        # its devices add no continuous noise: only SecAgg+ may carry their sum
        return secagg_stage(msg, context, config)
    users, round_ = [int(u) for u in instructions["users"]], int(instructions["round"])
    params = parameters_from(msg.content["arrays"])
    # Several devices per message: Flower's per-message cost is paid once for all of them.
    # Keys are "<user>/<name>"; the ServerApp splits them back (`server_app.unpack_devices`).
    # Updates of the global parameters' shapes travel stacked, one array per parameter (a
    # Flower Array is an object hashed and stored on its own: 6 per device cost more than
    # the training), and all arrays of the reply in one bundle (fedrec.common.deployment);
    # any other update travels alone under "<user>/<name>" and the server's validation
    # drops it with its reason.
    # Under DISTRIBUTED the server may learn only sums (secure aggregation, simulated): the
    # message's devices are summed here (`secure_sum`): one update sum and one sum of their
    # counters travel as "pooled/<name>", and each device's own reply says only whether it
    # failed. (At every device per round this is also most of a round's bytes saved.)
    replies = simulated_replies(config, users, round_, params)
    return Message(pack_devices(users, replies, params, config.secure_aggregation), reply_to=msg)


SLOT_STATE = "fedrec-secagg-slot"  # context.state: the slot's SecAgg+ session of the round


def secagg_stage(msg: Message, context: Context, config) -> Message:
    """One SecAgg+ stage with this slot as a party (`fedrec.simulations.secagg_slots`). The
    session stays in the slot's `context.state` between the round's messages. A failure is
    the reply's "error": the server counts the slot as dropped at that stage."""
    from flwr.app import Array, ArrayRecord

    from fedrec.client.runtime import model_update_dim, template_for
    from fedrec.common.secagg.wire import MASKED_KEY, SECAGG_KEY, STAGE_KEY
    from fedrec.simulations.secagg_slots import slot_stage

    request = dict(msg.content["config"])
    content, error = RecordDict(), ""
    try:
        if not config.secagg or STAGE_KEY not in request:
            raise ValueError(
                'a secure-aggregation stage needs secure-aggregation-protocol = "secagg", and '
                "that protocol runs its rounds in stages"
            )
        received = parameters_from(msg.content["arrays"]) if "arrays" in msg.content else None
        kept = dict(context.state[SLOT_STATE]) if SLOT_STATE in context.state else None
        model, _ = template_for(config)
        result = slot_stage(
            config, request, received, kept, config.ddg_params(model_update_dim(model))
        )
        if result.replies:
            users = [r.user for r in result.replies]
            content = pack_devices(users, result.replies, received or {}, secure=True)
        if result.fields:
            content[SECAGG_KEY] = ConfigRecord(result.fields)
        if result.arrays:
            content[MASKED_KEY] = ArrayRecord({k: Array(v) for k, v in result.arrays.items()})
        if result.kept is None:
            del context.state[SLOT_STATE]  # answered the unmask stage: nothing more to reveal
        else:
            context.state[SLOT_STATE] = ConfigRecord(result.kept)
    except Exception as err:  # the reply carries it; a failed stage ends the slot's round
        error = f"{type(err).__name__}: {err}"
        if SLOT_STATE in context.state:
            del context.state[SLOT_STATE]
    status = dict(content["status"]) if "status" in content else {}
    content["status"] = ConfigRecord(status | {"error": error})
    return Message(content, reply_to=msg)


@app.query()
def warm_up(msg: Message, context: Context) -> Message:
    """Load what every device round needs (torch, the data stream, the model template) while
    the ServerApp prepares the run: the slot's first round then starts at once."""
    import torch

    torch.set_num_threads(1)
    from fedrec.client.runtime import template_for
    from fedrec.common.data.stream import load_stream
    from fedrec.common.run_config import SimulationConfig
    from fedrec.simulations import devices  # noqa: F401 (imports the device round's modules)

    config = SimulationConfig.from_flat(dict(context.run_config))
    template_for(config)
    load_stream(config.data, config.rounds, config.stream_protocol)
    return Message(RecordDict({}), reply_to=msg)


def pack_devices(
    users: list[int], replies: list, params: dict[str, np.ndarray], secure: bool
) -> RecordDict:
    """A slot's reply for several devices; `fedrec.simulations.server_app.unpack_devices`
    reverses it.

    Under secure aggregation the pooled reply's own count of members travels as
    "pooled_count": a device without an error is not necessarily in the sum (one that sent
    no update is not), and the server's K_min rule and noise credit must count only the
    devices whose noise share is really in it."""
    metrics, status, arrays, stacked = {}, {}, {}, []
    shapes = {name: value.shape for name, value in params.items()}
    pooled_users, pooled_count = [], 0
    for reply in replies:
        if reply.pooled:
            arrays |= {f"pooled/{name}": value for name, value in reply.params.items()}
            metrics |= {f"pooled/{k}": v for k, v in reply.metrics.items()}
            pooled_count = reply.pooled
            continue
        user = reply.user
        status[f"{user}/error"] = reply.error or ""
        status[f"{user}/head"] = reply.ledger_head or ""  # a keyed commitment: looks random
        if secure:  # nothing of its own beyond a failure
            if reply.error is None:
                pooled_users.append(user)
            continue
        metrics |= {f"{user}/{k}": v for k, v in reply.metrics.items()}
        metrics[f"{user}/num-examples"] = reply.num_examples
        if reply.params is None:
            continue
        if {k: v.shape for k, v in reply.params.items()} == shapes:
            stacked.append((user, reply.params))
        else:
            arrays |= {f"{user}/{k}": np.asarray(v) for k, v in reply.params.items()}
    if stacked:
        for name in shapes:
            arrays[f"stacked/{name}"] = np.stack([p[name] for _, p in stacked])
    status["stacked"] = [user for user, _ in stacked]
    status["pooled"] = pooled_users
    status["pooled_count"] = pooled_count
    status["users"] = users  # replies come back in any order: each names its devices
    content = RecordDict({"metrics": MetricRecord(metrics), "status": ConfigRecord(status)})
    if arrays:  # one bundle: every Flower Array is objects moved one request each
        content["arrays"] = parameters_record(arrays)
    return content

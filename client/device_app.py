"""The deployment ClientApp's round: one SuperNode is one device, whose folder and config file
its SuperNode names (`--node-config 'store="PATH" device-config="FILE"'`).

Unpack the message, call `device_round`, pack only what the device's policy lets leave. Any
failure (unreadable store, corrupt ledger, bad parameters) becomes an error in the reply: the
federation goes on without this device, and the device's state is left as it was.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.common.deployment import REPLY_KEY, parameters_record, reply_record
from fedrec.common.secagg.wire import MASKED_KEY, SECAGG_KEY, STAGE_KEY

STORE_KEY, CONFIG_KEY = "store", "device-config"
# The run settings (and the device's catalogue file) of the last message handled in this
# process, for a warm executor that forked it (fedrec.client.warm_exec): it prepares the same
# model before the next message.
last_run_settings: list[dict] = []


def is_device(context: Context) -> bool:
    return STORE_KEY in context.node_config


def ledger_head(folder: Path) -> str:
    """The head hash of the device's ledger (verified on open), reported every round."""
    from fedrec.client.device import LEDGER_FILE
    from fedrec.client.ledger import PrivacyLedger

    if not (folder / LEDGER_FILE).exists():
        return ""
    with PrivacyLedger.open(folder / LEDGER_FILE) as ledger:
        return ledger.head_hash


def train_on_device(msg: Message, context: Context) -> Message:
    import time

    start = time.perf_counter()
    from fedrec.client.device import load_device_config
    from fedrec.client.device_round import device_round, reply_metrics
    from fedrec.common.deployment import parameters_from, split_run_config

    metrics: dict[str, float] = {}
    status = {"error": "", "declined": ""}
    params_out = None
    try:
        config_file = str(context.node_config.get(CONFIG_KEY, "") or "")
        device = load_device_config(
            Path(config_file) if config_file else None, Path(str(context.node_config[STORE_KEY]))
        )
        settings, run_flat = split_run_config(dict(context.run_config))
        last_run_settings[:] = [
            {
                "run": run_flat,
                "catalogue": str(device.catalogue) if device.catalogue else None,
                "digest": settings.catalogue_digest,
            }
        ]
        round_ = int(msg.content["config"]["round"])
        params = parameters_from(msg.content["arrays"])
        result = device_round(device, run_flat, round_, params, settings.catalogue_digest)
        metrics = reply_metrics(result, device.policy)
        if device.policy.allow_evaluation_metrics:  # timings are the device's to share too
            metrics["message_seconds"] = time.perf_counter() - start
        params_out = result.params
        # a noise-only update does not say it is one (that would tell what the device holds)
        status["declined"] = (result.declined or "") if params_out is None else ""
        status["ledger_head"] = ledger_head(Path(device.store))
    except Exception as err:  # the reply carries it; the device stays as it was
        status["error"] = f"{type(err).__name__}: {err}"
    metrics["num-examples"] = 1 if params_out is not None else 0
    content = RecordDict({REPLY_KEY: ConfigRecord(reply_record(metrics, status))})
    if params_out is not None:
        content["arrays"] = parameters_record(params_out)
    return Message(content, reply_to=msg)


SESSION_KEY = "fedrec-secagg"  # context.state: this device's SecAgg+ session of the round


def secagg_on_device(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage (`fedrec.client.secagg_device`): the session is kept in
    `context.state` between the round's messages (the device's own SuperNode). Any failure
    becomes an error in the reply: the server counts the device as dropped at that stage."""
    from flwr.app import Array, ArrayRecord

    from fedrec.client import secagg_device as sa
    from fedrec.client.device import load_device_config
    from fedrec.client.device_round import device_round
    from fedrec.client.runtime import device_template, model_update_dim
    from fedrec.common.deployment import parameters_from, split_run_config
    from fedrec.common.run_config import SimulationConfig

    status = {"error": "", "declined": ""}
    content = RecordDict()
    request = dict(msg.content["config"])
    stage, round_ = str(request.get(STAGE_KEY, "")), int(request.get("round", 0))
    try:
        config_file = str(context.node_config.get(CONFIG_KEY, "") or "")
        device = load_device_config(
            Path(config_file) if config_file else None, Path(str(context.node_config[STORE_KEY]))
        )
        settings, run_flat = split_run_config(dict(context.run_config))
        if stage == "keys":
            run = SimulationConfig.from_flat(run_flat)
            if not run.secagg:
                raise ValueError("a secure-aggregation stage in a run without secagg")
            model, _ = device_template(run, device.catalogue, settings.catalogue_digest)
            session, fields = sa.start_session(
                round_, request, run.ddg_params(model_update_dim(model)), run.min_survivors
            )
            details: dict = {}
        else:
            if SESSION_KEY not in context.state:
                raise sa.SecAggRefusal(f"stage {stage!r} without a session (keys not exchanged)")
            session = sa.SecAggSession.from_bytes(context.state[SESSION_KEY]["session"])
            session.expect(round_, stage)
            details = {}
            if stage == "shares":
                fields = sa.share_keys(session, request)
            elif stage == "masked":
                received = parameters_from(msg.content["arrays"])
                result = device_round(device, run_flat, round_, received, settings.catalogue_digest)
                status["ledger_head"] = ledger_head(Path(device.store))
                idle = result.params is None and result.metrics.get("noise_only") == 1.0
                if result.params is None and not idle:  # a policy decline: no share to send
                    status["declined"] = result.declined or "declined"
                    fields, details = {}, {"declined": status["declined"]}
                else:
                    change = sa.change_from(result.params, received)
                    masked = sa.masked_input(session, request, change, dict(result.metrics))
                    content[MASKED_KEY] = ArrayRecord({k: Array(v) for k, v in masked.items()})
                    fields = {}
            elif stage == "unmask":
                fields = sa.unmask(session, request)
                details = {
                    "survivors": len(request.get("survivors", [])),
                    "dropouts": len(request.get("dropouts", [])),
                }
            else:
                raise ValueError(f"unknown secure-aggregation stage {stage!r}")
        if stage == "unmask":
            del context.state[SESSION_KEY]  # answered once: nothing more to reveal
        else:
            context.state[SESSION_KEY] = ConfigRecord({"session": session.to_bytes()})
        sa.record_stage(Path(device.store), round_, stage, **details)
        if fields:
            content[SECAGG_KEY] = ConfigRecord(fields)
    except Exception as err:  # the reply carries it; the device stays as it was
        status["error"] = f"{type(err).__name__}: {err}"
        if SESSION_KEY in context.state:
            del context.state[SESSION_KEY]  # a failed stage ends the device's round
    content[REPLY_KEY] = ConfigRecord(reply_record({}, status))
    return Message(content, reply_to=msg)

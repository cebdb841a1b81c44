"""The deployment's Flower ClientApp: one SuperNode is one real device, whose folder and config
file its `--node-config` names; `fedrec.client.device_app` runs the round under the device's
own privacy policy and packs only what that policy lets leave.

A simulation runs its own ClientApp (`fedrec.simulations.client_app`), whose SuperNodes are
execution slots playing many virtual devices. Heavy modules (torch, opacus, the data) are
imported inside the handlers, when needed.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrec.client.device_app import STORE_KEY, is_device, secagg_on_device, train_on_device
from fedrec.common.secagg.wire import STAGE_KEY

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from fedrec.common.console import apply_inherited_level

    apply_inherited_level()  # the `fedrec` command's --log-level
    torch.set_num_threads(1)  # a device's round is small: more threads only contend
    if not is_device(context):
        raise ValueError(
            f"this ClientApp serves a device: its SuperNode's --node-config names no "
            f"{STORE_KEY!r} folder (`fedrec client start` names it; a simulation runs "
            "fedrec.simulations.client_app:app)"
        )
    if STAGE_KEY in msg.content["config"]:  # a stage of a SecAgg+ round
        return secagg_on_device(msg, context)
    return train_on_device(msg, context)

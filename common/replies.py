"""What a device's round sends back to the server, whatever carries it.

One type for every transport (Flower messages of a deployment or of a simulation's slots, the
in-process loop) and both sides of it: devices and the simulation build replies, the server's
run reads them (`fedrec.server.federated_run`), so it lives in `fedrec.common`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class DeviceReply:
    user: int
    params: dict[str, np.ndarray] | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the device failed (bad store, bad parameters, crash)
    # head hash of the device's ledger after its round (deployment: reported every round, so
    # an auditor can later detect a truncated or rewritten ledger); in simulation a keyed
    # commitment to it (`fedrec.simulations.devices.device_commitment`), recorded by the server
    ledger_head: str | None = None
    # > 0: not one device's reply but the secure sum of this many devices' replies (their
    # updates minus the received parameters, and their counters:
    # `fedrec.server.secure_aggregation.secure_sum`), summed where they were computed; each
    # of those devices also has its own reply, with nothing in it
    pooled: int = 0
    # the kind of check a secure sum's input validation refused the device's reply by
    # (`fedrec.server.aggregation.REJECTION_KINDS`), with `error` saying why
    rejected: str | None = None

"""A deployed device's side of a SecAgg+ round (`secure-aggregation-protocol = "secagg"`):
the same protocol code as the simulation (`fedrec.common.secagg.protocol.SecAggDevice`, two
instances: the DDG-encoded update and the round counters), one stage per server message.

    keys     the device derives the round's configurations itself (the run's K_min and DDG
             parameters, the server's device count and public seed) and sends its public keys
    shares   from the roster, Shamir shares of its secrets, encrypted to its neighbours
    masked   it trains (DP-SGD clipping, no continuous noise; the ledger charges the discrete
             mechanism before anything leaves), encodes its change with its discrete Gaussian
             share (an idle device: the share alone) and sends it masked
    unmask   it reveals the shares the protocol allows, and refuses below K_min survivors

Between messages the protocol state (its secrets, the shares it holds) is a `SecAggSession`
kept by the ClientApp in the device's own SuperNode (Flower's `context.state`), never sent
anywhere. Each answered stage is appended to the device's `secagg.jsonl`: its own record of
what it revealed. Plain functions (no Flower).
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.privacy.randomness import PrivacyRandomness, privacy_randomness
from fedrec.common.secagg import wire
from fedrec.common.secagg.encoding import DDGParams
from fedrec.common.secagg.protocol import SecAggDevice, SecAggRefusal
from fedrec.common.secagg.round_inputs import encode_inputs, secagg_configs

RECORD_FILE = "secagg.jsonl"
STAGES = ("keys", "shares", "masked", "unmask")


@dataclass
class SecAggSession:
    """One round's protocol state on a device."""

    round: int
    index: int  # the device's id in this round's protocol (the server numbers the sampled)
    public_seed: int
    ddg: DDGParams
    updates: SecAggDevice
    counters: SecAggDevice
    stage: str = "keys"

    def to_bytes(self) -> bytes:
        # the device's own state, read back only by this device's ClientApp
        return pickle.dumps(self)

    @staticmethod
    def from_bytes(data: bytes) -> SecAggSession:
        session = pickle.loads(data)
        if not isinstance(session, SecAggSession):
            raise TypeError("the kept secure-aggregation state is not a session")
        return session

    def expect(self, round: int, stage: str) -> None:
        """Refuse a stage out of order, or one of another round."""
        if round != self.round:
            raise SecAggRefusal(f"a stage of round {round} during round {self.round}")
        if STAGES.index(stage) != STAGES.index(self.stage) + 1:
            raise SecAggRefusal(f"stage {stage!r} after {self.stage!r}")
        self.stage = stage


def start_session(
    round: int,
    request: dict[str, Any],
    ddg: DDGParams,
    min_survivors: int,
) -> tuple[SecAggSession, dict[str, bytes]]:
    """Stage keys: a new session (the configurations derived here, from the run's K_min) and
    the public keys to send."""
    devices, index = int(request["devices"]), int(request["index"])
    if not 1 <= index <= devices:
        raise SecAggRefusal(f"protocol index {index} outside 1..{devices}")
    public_seed = int(request["public-seed"])
    configs = secagg_configs(
        ddg, devices=devices, min_survivors=min_survivors, public_seed=public_seed
    )
    session = SecAggSession(
        round,
        index,
        public_seed,
        ddg,
        SecAggDevice(index, configs[0]),
        SecAggDevice(index, configs[1]),
    )
    keys = wire.pack_keys((session.updates.advertise_keys(), session.counters.advertise_keys()))
    return session, keys


def share_keys(session: SecAggSession, request: dict[str, Any]) -> dict[str, Any]:
    """Stage shares: the encrypted shares for each neighbour, per instance."""
    roster = wire.unpack_roster(request)
    return wire.pack_pair(
        "shares",
        (
            session.updates.share_keys(roster["updates"]),
            session.counters.share_keys(roster["counters"]),
        ),
    )


def change_from(
    params: dict[str, np.ndarray] | None, received: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A trained update's change from the received parameters; zeros for an idle device."""
    if params is None:
        return {name: np.zeros(value.shape) for name, value in received.items()}
    if set(params) != set(received):
        raise ValueError("parameter names differ from the received ones")
    return {n: np.asarray(params[n], np.float64) - v for n, v in received.items()}


def masked_input(
    session: SecAggSession,
    request: dict[str, Any],
    change: dict[str, np.ndarray],
    metrics: dict[str, float],
    randomness: PrivacyRandomness | None = None,
) -> dict[str, np.ndarray]:
    """Stage masked: the change encoded with the device's discrete noise share and its
    counters, each masked. `randomness`: fresh OS entropy unless given (tests only: a
    device's noise never comes from a seed anyone chose)."""
    randomness = privacy_randomness(None) if randomness is None else randomness
    update, tally = encode_inputs(change, metrics, session.ddg, session.public_seed, randomness)
    routed = wire.unpack_pair("routed", request)
    return {
        "updates": session.updates.masked_input(routed[0], update),
        "counters": session.counters.masked_input(routed[1], tally),
    }


def unmask(session: SecAggSession, request: dict[str, Any]) -> dict[str, Any]:
    """Stage unmask: the shares it may reveal (`SecAggDevice.unmask` refuses below K_min)."""
    survivors = [int(i) for i in request.get("survivors", [])]
    dropouts = [int(i) for i in request.get("dropouts", [])]
    return wire.pack_unmask(
        (session.updates.unmask(survivors, dropouts), session.counters.unmask(survivors, dropouts))
    )


def record_stage(folder: Path, round: int, stage: str, **details: Any) -> None:
    """Append the stage this device answered to its own record of what it revealed."""
    line = {"round": round, "stage": stage, "time": time.time(), **details}
    with open(Path(folder) / RECORD_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")

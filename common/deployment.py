"""The settings of a deployed run that are about transport, not learning, parsed in one place.

They travel in Flower's run_config beside the run's settings (`SimulationConfig`) and are split
off here, so nothing else sees them."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DeploymentSettings:
    deployment: bool = False  # a run over real SuperNodes (each one device)
    min_nodes: int = 2  # devices connected before a round starts
    wait_nodes_s: float = 600.0  # give up when fewer connect in this time
    # A round waits this long for replies; a device that does not answer in time (killed,
    # offline) is counted as failed and the round completes with the others.
    round_timeout_s: float = 300.0
    # The digest of the public catalogue the server built the model from: a device that reads
    # its own copy (fedrec.common.data.public_catalogue) checks it before training.
    catalogue_digest: str = ""

    def __post_init__(self) -> None:
        if self.min_nodes < 1 or self.wait_nodes_s <= 0 or self.round_timeout_s <= 0:
            raise ValueError("min-nodes >= 1, wait-nodes-s > 0 and round-timeout-s > 0")


KEYS = frozenset(f.name.replace("_", "-") for f in fields(DeploymentSettings))


def split_run_config(flat: dict[str, Any]) -> tuple[DeploymentSettings, dict[str, Any]]:
    """(transport settings, the run's own settings) from one flat run_config."""
    defaults = DeploymentSettings()
    values, rest = {}, {}
    for key, raw in flat.items():
        name = str(key).replace("_", "-")
        if name in KEYS:
            attr = name.replace("-", "_")
            current = getattr(defaults, attr)
            if isinstance(current, bool):
                values[attr] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true")
            else:
                values[attr] = type(current)(raw)
        else:
            rest[key] = raw
    return DeploymentSettings(**values), rest


# A deployed message carries the model's tensors as ONE byte array: an .npz (numpy's own
# self-describing container: names, dtypes, shapes). Flower 1.42 stores and moves every Array
# of a message as separate objects (the Array and its chunks, plus one per record), each one
# HTTP(S) request on every hop: ServerApp -> SuperLink -> SuperNode -> ClientApp and back,
# most of a warm message's transport time for a model of several tensors
# (benchmarks/results/deployment-transport-before-after.json).
PARAMETERS_KEY = "npz"


class MalformedParameters(ValueError):
    """Parameters in a message that are not a readable bundle."""


def pack_parameters(params: dict[str, np.ndarray]) -> np.ndarray:
    """Named tensors as one uint8 array (an uncompressed .npz)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in params.items()})
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def unpack_parameters(packed: np.ndarray) -> dict[str, np.ndarray]:
    """The named tensors of `pack_parameters`; MalformedParameters says what is wrong with a
    bundle that is not one (never unpickles anything)."""
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise MalformedParameters(
            f"parameters must be one uint8 byte array, got {packed.dtype} of shape {packed.shape}"
        )
    raw = packed.tobytes()
    try:
        # `pack_parameters` stores entries uncompressed, so a bundle never unpacks to more
        # than its own size: a compressed entry (a "zip bomb" from a malicious device) is
        # refused before anything is decompressed
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            entries = archive.infolist()
        if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
            raise MalformedParameters("parameters bundle has compressed entries")
        if sum(e.file_size for e in entries) > len(raw):
            raise MalformedParameters("parameters bundle declares more bytes than it holds")
        with np.load(io.BytesIO(raw), allow_pickle=False) as bundle:
            return {name: bundle[name] for name in bundle.files}
    except MalformedParameters:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise MalformedParameters(f"parameters are not a readable .npz bundle: {err}") from err


def parameters_record(params: dict[str, np.ndarray]):
    """A Flower ArrayRecord holding `params` as one bundle (`pack_parameters`)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({PARAMETERS_KEY: Array(pack_parameters(params))})


def parameters_from(record) -> dict[str, np.ndarray]:
    """The named tensors of a `parameters_record`; MalformedParameters if it holds none."""
    if PARAMETERS_KEY not in record:
        raise MalformedParameters(f"no {PARAMETERS_KEY!r} bundle among the message's arrays")
    return unpack_parameters(np.asarray(record[PARAMETERS_KEY].numpy()))


# A device's reply carries its metrics and its status in ONE record (one object fewer per
# reply on every hop, same reason as above): metrics under "metric/<name>", beside the
# status strings.
REPLY_KEY, METRIC_PREFIX = "reply", "metric/"


def reply_record(metrics: dict[str, float], status: dict[str, str]) -> dict[str, float | str]:
    """Metrics and status of a device's reply as one flat mapping (a Flower ConfigRecord)."""
    return {**status, **{METRIC_PREFIX + name: float(value) for name, value in metrics.items()}}


def split_reply(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, status) of `reply_record`'s mapping."""
    metrics = {
        key[len(METRIC_PREFIX) :]: float(value)
        for key, value in record.items()
        if key.startswith(METRIC_PREFIX)
    }
    status = {key: str(value) for key, value in record.items() if not key.startswith(METRIC_PREFIX)}
    return metrics, status

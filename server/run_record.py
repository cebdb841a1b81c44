"""The server's own record of a run, written so that an auditor can check every other record
against it (`fedrec audit`, `fedrec.common.audit.run_record`).

participation.jsonl: one line per round, appended BEFORE the round's checkpoint commits it.
Canonical JSON (keys sorted, no whitespace):
    v           format, 1
    round       the round
    registered  N, the devices the round sampled from (user-level q = expected / N)
    devices     {name: commitment} for every device sampled (name: its store folder,
                clients/<name>/); the commitment is what the device reported with its reply
                (16 hex, `fedrec.simulations.devices.device_commitment`: HMAC-SHA256 under the
                devices' key of "name\0round\0head", head = its ledger's head hash after the
                round, 64 zeros while empty), "" when it reported none
    failed      names of the sampled devices that failed, sorted
    summed      devices whose update is in the round's sum
    discarded   the round was discarded (secure aggregation below K_min): nothing published

A commitment is a keyed hash of the device's privacy records: without the devices' key it
looks random, so the server learns nothing from it (not even whether the ledger changed, i.e.
whether the device trained), and it travels beside the failure flag under secure aggregation
too. With the key, an auditor checks each device's ledger against what it committed to, round
by round: a forger who rewrites a ledger (deletes a train and a retire entry, re-hashes the
chain) cannot make it agree with commitments the server recorded before.

attempts.jsonl: one line per attempt at a round, {"v", "round", "devices": [names, sorted]},
appended and fsync'ed BEFORE any sampled device is asked, and never truncated. A round that a
crash interrupted is run again under a fresh sample (participation.jsonl keeps only the attempt
that committed), but the devices asked in the lost attempt may have trained and charged their
ledgers for that round, rightly: their update may have left. The audit accepts a ledger entry
of round r from a device that any recorded attempt of round r asked: without this record a
resumed run's ledgers would fail their audit.

Each checkpoint's `extra["run_record"]` (`round_record`) chains the run's files together:
    params_sha256   of the model arrays (`params_digest`)
    config_sha256   of config.json's bytes when the round was saved; config: its content
    previous        {"round", "file", "sha256"} of the checkpoint committed before this one
    metrics         {"rows", "sha256"} of metrics.jsonl including this round's row
    participation   {"rows", "sha256"} of participation.jsonl including this round's line
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.io import atomic_write

PARTICIPATION_FILE = "participation.jsonl"
ATTEMPTS_FILE = "attempts.jsonl"
RECORD_KEY = "run_record"
FORMAT = 1


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def params_digest(params: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order: name, dtype, shape and little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(params):
        value = np.ascontiguousarray(params[name])
        h.update(f"{name}\0{value.dtype.newbyteorder('<').str}\0{value.shape}\0".encode())
        h.update(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def _file_digest(data: bytes) -> dict[str, Any]:
    return {"rows": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def round_record(out: Path, params: Mapping[str, np.ndarray], metrics_line: str) -> dict:
    """What the checkpoint of this round records about the run folder (see the top).
    `metrics_line` is this round's metrics.jsonl row, appended after the checkpoint."""
    config = _read(out / "config.json")
    previous = None
    try:
        latest = json.loads((out / "checkpoints" / "latest.json").read_text())
        data = (out / "checkpoints" / latest["file"]).read_bytes()
        previous = {
            "round": latest["round"],
            "file": latest["file"],
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the first round of a run
    return {
        "v": FORMAT,
        "params_sha256": params_digest(params),
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "config": json.loads(config) if config else None,
        "previous": previous,
        "metrics": _file_digest(_read(out / "metrics.jsonl") + metrics_line.encode()),
        "participation": _file_digest(_read(out / PARTICIPATION_FILE)),
    }


class ParticipationLog:
    """participation.jsonl of a run, appended one line per round. Opened at the committed
    round: lines of later rounds (written before a crash that kept their checkpoint from
    committing) are dropped, as those rounds are run again."""

    def __init__(self, path: Path, committed: int):
        self.path = Path(path)
        kept = [
            line + "\n"
            for line in _read(self.path).decode().splitlines()
            if json.loads(line)["round"] <= committed
        ]
        if self.path.exists():
            text = "".join(kept).encode()
            atomic_write(self.path, lambda f: f.write(text))

    def append(
        self,
        round: int,
        *,
        registered: int,
        devices: Mapping[str, str | None],
        failed: Sequence[str],
        summed: int,
        discarded: bool,
    ) -> None:
        line = {
            "v": FORMAT,
            "round": round,
            "registered": registered,
            "devices": {name: commit or "" for name, commit in devices.items()},
            "failed": sorted(failed),
            "summed": summed,
            "discarded": bool(discarded),
        }
        with open(self.path, "a") as f:
            f.write(canonical(line) + "\n")


def record_attempt(out: Path, round: int, devices: Sequence[str]) -> None:
    """Append this attempt at `round` to attempts.jsonl (see the top), durably: call it before
    the first device is asked."""
    line = canonical({"v": FORMAT, "round": round, "devices": sorted(devices)}) + "\n"
    with open(Path(out) / ATTEMPTS_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())

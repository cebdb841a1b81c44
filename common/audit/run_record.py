"""The run's own records checked against each other: checkpoints, config.json, metrics.jsonl
and the server's participation record (participation.jsonl).

Formats (written by `fedrec.server.run_record` and `fedrec.server.checkpoint`; re-read here
with numpy and hashlib alone): every checkpoint `checkpoints/round-NNNN.npz` carries in its
`__meta__` JSON `extra.run_record` = {params_sha256, config_sha256, config, previous: {round,
file, sha256}, metrics: {rows, sha256}, participation: {rows, sha256}}: a hash chain over the
checkpoints that also pins the prefix of each log a round had written, and the configuration
in force. So the audit sees a deleted or edited checkpoint, a deleted, edited or appended log
row, an edited config.json, and every privacy setting that changed within the run (a budget
raised on `--resume`).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.audit.records import Finding, RecordsError, read_bytes

PARTICIPATION = "participation.jsonl"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
RUN_FILES = frozenset({PARTICIPATION, METRICS, CONFIG, "summary.json", "devices.jsonl"})
# Settings that define a guarantee, its mechanism or its budget: none may change within a run.
# (`rounds` may: extending a run is accounted round by round, each round's own mechanism.)
PRIVACY_KEYS = (
    "dp",
    "epsilon",
    "delta",
    "user-epsilon",
    "aggregate-noise-multiplier",
    "local-noise-multiplier",
    "min-survivors",
    "clip-norm",
    "update-clip-norm",
    "local-lr",
    "local-steps",
    "sample-rate",
    "reference-batch",
    "clients-per-round",
    "model-user-embedding",
)
_ROUND_FILE = "round-{:04d}.npz"


@dataclass
class RunRecord:
    """What the run's own records say, once they were checked against each other."""

    latest: int  # the committed round
    configs: dict[int, dict[str, Any]]  # round -> configuration its checkpoint recorded
    config: dict[str, Any]  # config.json
    participation: dict[int, dict[str, Any]]  # round -> participation line
    metrics: dict[int, dict[str, Any]]  # round -> metrics.jsonl row
    checkpoints: list[str] = field(default_factory=list)

    def config_at(self, round: int) -> dict[str, Any]:
        """The configuration in force in `round`: its checkpoint's, else the last before it."""
        earlier = [r for r in self.configs if r <= round]
        return self.configs[max(earlier)] if earlier else self.config

    def strictest(self, key: str) -> float | None:
        """The smallest value a (budget) setting had anywhere in the run."""
        values = [c.get(key) for c in [*self.configs.values(), self.config]]
        values = [float(v) for v in values if isinstance(v, (int, float))]
        return min(values) if values else None


def is_run_folder(root: Path) -> bool:
    return any((root / n).exists() for n in ("checkpoints", METRICS, PARTICIPATION, CONFIG))


def params_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order: name, dtype, shape, little-endian bytes (the
    writer's `params_digest`, re-implemented)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        little = value.dtype.newbyteorder("<")
        h.update(f"{name}\0{little.str}\0{value.shape}\0".encode())
        h.update(value.astype(little, copy=False).tobytes())
    return h.hexdigest()


def _lines(root: Path, name: str) -> list[bytes]:
    path = root / name
    if not path.exists():
        raise RecordsError(f"{path}: missing (every run writes it)")
    return read_bytes(path).splitlines(keepends=True)


def _rows(lines: list[bytes], path: Path) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError as err:
            raise RecordsError(f"{path}: line {number} is not valid JSON") from err
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise RecordsError(f"{path}: line {number} has no round")
        out.append(row)
    return out


def _checkpoint(path: Path, findings: list[Finding]) -> tuple[dict, str, int] | None:
    """(run record, sha256 of the file, round) of one checkpoint; the model arrays are read
    (every zip CRC checked) and hashed against the record."""
    data = read_bytes(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["__meta__"].tobytes().decode())
            names = meta["param_names"]
            record = meta["extra"]["run_record"]
            try:
                arrays = {n: z[f"params/{n}"] for n in names}
            except (zipfile.BadZipFile, ValueError, OSError, KeyError) as err:
                findings.append(
                    Finding("record", f"{path.name}: the model arrays are unreadable ({err})")
                )
                arrays = None
    except KeyError as err:
        raise RecordsError(
            f"{path}: no run record ({err}): written by an older fedrec, not auditable"
        ) from err
    except (zipfile.BadZipFile, ValueError, OSError, TypeError) as err:
        raise RecordsError(f"{path}: unreadable checkpoint ({err})") from err
    if arrays is not None and params_digest(arrays) != record.get("params_sha256"):
        findings.append(
            Finding("record", f"{path.name}: the model is not the one the round recorded")
        )
    return record, hashlib.sha256(data).hexdigest(), int(meta["round"])


def _check_log(
    name: str, lines: list[bytes], records: dict[int, dict], findings: list[Finding]
) -> None:
    """Each checkpoint pins the prefix of the log written by its round: the first mismatch
    (an edited, deleted or inserted row) and rows beyond the last checkpoint are named."""
    key = "metrics" if name == METRICS else "participation"
    for r in sorted(records):
        pinned = records[r].get(key) or {}
        rows, digest = pinned.get("rows"), pinned.get("sha256")
        if not isinstance(rows, int):
            continue
        if len(lines) < rows:
            findings.append(
                Finding(
                    "record",
                    f"{name} has {len(lines)} rows, round {r}'s checkpoint recorded {rows}: "
                    "rows were deleted",
                )
            )
            return
        if hashlib.sha256(b"".join(lines[:rows])).hexdigest() != digest:
            findings.append(
                Finding(
                    "record",
                    f"{name}: its first {rows} rows are not those round {r}'s checkpoint "
                    "recorded: a row was edited, deleted or inserted",
                )
            )
            return
    if records:
        last = records[max(records)].get(key) or {}
        if isinstance(last.get("rows"), int) and len(lines) > last["rows"]:
            findings.append(
                Finding(
                    "record",
                    f"{name} has {len(lines) - last['rows']} rows after the last checkpoint "
                    f"(round {max(records)}): appended after the run",
                )
            )


def _diff(a: dict, b: dict) -> list[str]:
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in PRIVACY_KEYS if a.get(k) != b.get(k)]


def check_run_record(root: Path, findings: list[Finding], notes: list[str]) -> RunRecord:
    """Read and cross-check the run's checkpoints, config.json, metrics.jsonl and
    participation.jsonl; every inconsistency is a finding. RecordsError if one is missing."""
    folder = root / "checkpoints"
    latest_path = folder / "latest.json"
    if not latest_path.exists():
        raise RecordsError(f"{latest_path}: missing (a finished run commits its last round)")
    try:
        latest = int(json.loads(read_bytes(latest_path))["round"])
    except (ValueError, KeyError, TypeError) as err:
        raise RecordsError(f"{latest_path}: unreadable ({err})") from err
    config_bytes = read_bytes(root / CONFIG) if (root / CONFIG).exists() else None
    if config_bytes is None:
        raise RecordsError(f"{root / CONFIG}: missing (every run writes it)")
    config = json.loads(config_bytes)
    metric_lines, part_lines = _lines(root, METRICS), _lines(root, PARTICIPATION)

    records: dict[int, dict] = {}
    digests: dict[int, str] = {}
    present = {int(p.name[6:10]): p for p in folder.glob("round-*.npz") if p.name[6:10].isdigit()}
    for r in sorted(present):
        if r > latest:
            notes.append(f"{present[r].name}: newer than the committed round {latest}: ignored")
            continue
        record, digests[r], inside = _checkpoint(present[r], findings)
        if inside != r:
            findings.append(Finding("record", f"{present[r].name} holds round {inside}"))
        records[r] = record
    for r in range(1, latest + 1):
        if r not in present:
            findings.append(
                Finding(
                    "record",
                    f"checkpoints/{_ROUND_FILE.format(r)} is missing: every committed round "
                    "keeps its checkpoint, so it was deleted",
                )
            )
    for r, record in sorted(records.items()):
        prev = record.get("previous")
        if prev is None:
            if r != min(records) or r != 1:
                findings.append(
                    Finding("record", f"{_ROUND_FILE.format(r)} names no previous checkpoint")
                )
            continue
        before = prev.get("round")
        if before in digests and digests[before] != prev.get("sha256"):
            findings.append(
                Finding(
                    "record",
                    f"{_ROUND_FILE.format(before)} is not the checkpoint round {r} chained to: "
                    "edited or replaced after it was saved",
                )
            )
    _check_log(METRICS, metric_lines, records, findings)
    _check_log(PARTICIPATION, part_lines, records, findings)

    configs = {
        r: rec["config"] for r, rec in records.items() if isinstance(rec.get("config"), dict)
    }
    if latest in records:
        if hashlib.sha256(config_bytes).hexdigest() != records[latest].get("config_sha256"):
            changed = _diff(configs.get(latest, {}), config)
            findings.append(
                Finding(
                    "config",
                    f"config.json is not the configuration the last checkpoint (round {latest}) "
                    f"recorded: edited after the run ({'; '.join(changed) or 'no privacy setting'})",
                )
            )
    first = min(configs, default=None)
    previous = configs.get(first, {})
    for r in sorted(configs)[1:]:
        for change in _diff(previous, configs[r]):
            findings.append(
                Finding(
                    "config",
                    f"privacy setting changed within the run, from round {r}: {change} "
                    "(a guarantee and its budget hold for one configuration)",
                )
            )
        previous = configs[r]
    participation = {row["round"]: row for row in _rows(part_lines, root / PARTICIPATION)}
    metrics = {row["round"]: row for row in _rows(metric_lines, root / METRICS)}
    return RunRecord(
        latest=latest,
        configs=configs,
        config=config,
        participation=participation,
        metrics=metrics,
        checkpoints=[present[r].name for r in sorted(records)],
    )

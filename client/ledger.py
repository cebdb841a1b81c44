"""A client's lifelong privacy ledger: append-only, hash-chained JSON Lines, one file per client.

Each line is one entry in canonical JSON (keys sorted, no whitespace, ASCII):
  every entry: v (format, 1), seq (0, 1, ...), kind, round, time (Unix s), prev_hash, hash
  train:     mechanism (`Mechanism.to_dict()`), cohorts ({cohort: interactions present})
  retire:    cohorts (sorted list), reason, guarantee, delta, epsilons ({cohort: ε, "inf" if none})
  survivors: train_seq (the train entry of that round), n (devices in the aggregate)
`hash` is the sha256 hex of the canonical JSON of the entry without `hash`; `prev_hash` is the
previous entry's hash, GENESIS for the first. An edited, deleted or reordered entry breaks the
chain; deleting whole trailing entries is caught only against a head hash kept elsewhere (run
summaries record `head_hash`; check with `contains`).

Appends are durable (fsync) before they return, or, inside `synced_once()`, before it exits
(one fsync for a round's entries, still before any update built on them leaves). A crash mid-append leaves a final line without a
newline that is not valid JSON: it was never acknowledged, so `open` truncates it with a warning.
Anything else that does not verify raises LedgerCorruptError and leaves the file untouched.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.privacy import accounting
from fedrec.common.privacy.accounting import RETIRE, SURVIVORS, TRAIN, Guarantee, Mechanism

log = logging.getLogger(__name__)

FILENAME = "ledger.jsonl"
FORMAT_VERSION = 1
GENESIS = "0" * 64
_COMMON = {"v", "seq", "kind", "round", "time", "prev_hash", "hash"}
_FIELDS = {
    TRAIN: _COMMON | {"mechanism", "cohorts"},
    RETIRE: _COMMON | {"cohorts", "reason", "guarantee", "delta", "epsilons"},
    SURVIVORS: _COMMON | {"train_seq", "n"},
}


def path_for(client_dir: str | Path) -> Path:
    """Where a client's ledger lives: one file per client."""
    return Path(client_dir) / FILENAME


class LedgerCorruptError(RuntimeError):
    """The file does not verify. Names the file, the line / entry seq and the problem."""


class LedgerBusyError(RuntimeError):
    """Another open PrivacyLedger holds this file."""


class RetiredCohortError(ValueError):
    """A retired cohort was about to be trained on again."""


def canonical(entry: Mapping[str, Any]) -> str:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def entry_hash(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("ascii")).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _eps_out(eps: float) -> float | str:
    return "inf" if math.isinf(eps) else float(eps)


def _eps_in(eps: Any) -> float:
    if eps == "inf":
        return math.inf
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"epsilon must be a number >= 0 or 'inf', got {eps!r}")
    return float(eps)


def check_entry(
    entry: Mapping[str, Any], history: list[dict[str, Any]], gone: set[str] | frozenset[str]
) -> None:
    """Raise ValueError unless `entry` is a well-formed successor of `history` (hash excluded);
    `gone` = the cohorts `history` retired."""
    kind = entry.get("kind")
    if kind not in _FIELDS:
        raise ValueError(f"unknown kind {kind!r}")
    if set(entry) != _FIELDS[kind]:
        raise ValueError(f"fields {sorted(entry)} != {sorted(_FIELDS[kind])}")
    if not _is_int(entry["v"]) or entry["v"] != FORMAT_VERSION:
        raise ValueError(f"format version {entry['v']!r} != {FORMAT_VERSION}")
    if not _is_int(entry["seq"]) or entry["seq"] != len(history):
        raise ValueError(f"seq {entry['seq']!r} where {len(history)} was expected")
    prev = history[-1]["hash"] if history else GENESIS
    if entry["prev_hash"] != prev:
        raise ValueError(f"prev_hash {entry['prev_hash']!r} != hash of previous entry {prev!r}")
    if not _is_int(entry["round"]) or entry["round"] < 0:
        raise ValueError(f"round must be an integer >= 0, got {entry['round']!r}")
    if not _is_real(entry["time"]) or not math.isfinite(entry["time"]):
        raise ValueError(f"time must be a finite number, got {entry['time']!r}")
    if kind == TRAIN:
        accounting.parse_mechanism(entry["mechanism"])  # validated once per distinct one
        cohorts = entry["cohorts"]
        if not isinstance(cohorts, dict):
            raise ValueError("cohorts must map cohort -> interaction count")
        for c, n in cohorts.items():
            if not isinstance(c, str) or not c or not _is_int(n) or n < 0:
                raise ValueError(f"bad cohort {c!r}: {n!r}")
        if again := sorted(set(cohorts) & gone):
            raise RetiredCohortError(f"cohorts {again} are retired and cannot be trained on")
    elif kind == RETIRE:
        cohorts, epsilons = entry["cohorts"], entry["epsilons"]
        if not isinstance(cohorts, list) or not cohorts or cohorts != sorted(set(cohorts)):
            raise ValueError("retired cohorts must be a non-empty sorted list without repeats")
        if not all(isinstance(c, str) and c for c in cohorts):
            raise ValueError("cohort names must be non-empty strings")
        if again := sorted(set(cohorts) & gone):
            raise ValueError(f"cohorts {again} are already retired")
        if not isinstance(entry["reason"], str):
            raise ValueError("reason must be a string")
        guarantee, delta = Guarantee(entry["guarantee"]), entry["delta"]
        if not _is_real(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not isinstance(epsilons, dict) or sorted(epsilons) != cohorts:
            raise ValueError("epsilons must have exactly the retired cohorts as keys")
        charged = accounting.cohort_rdp(history, guarantee)
        known = [c for c in cohorts if c in charged]
        spent = dict(
            zip(known, accounting.epsilons_of_rdp([charged[c] for c in known], delta), strict=True)
        )
        for c in cohorts:
            eps, true = _eps_in(epsilons[c]), float(spent.get(c, 0.0))
            if eps < true and not math.isclose(eps, true, rel_tol=1e-9):
                raise ValueError(f"recorded ε {eps} of cohort {c!r} is below its spent ε {true}")
    else:
        if not _is_int(entry["n"]) or entry["n"] < 1:
            raise ValueError(f"survivors n must be an integer >= 1, got {entry['n']!r}")
        ts = entry["train_seq"]
        if not _is_int(ts) or not 0 <= ts < len(history) or history[ts]["kind"] != TRAIN:
            raise ValueError(f"train_seq {ts!r} is not an earlier train entry")
        if history[ts]["round"] != entry["round"]:
            raise ValueError(f"train entry {ts} is of round {history[ts]['round']}, not this one")


def _read(path: Path, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Verified entries and the length of their bytes (shorter than data iff a torn tail)."""
    entries: list[dict[str, Any]] = []
    gone: set[str] = set()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends in a newline
    good = len(data) - len(tail)
    for number, raw in enumerate([*lines, tail] if tail else lines, start=1):
        is_tail = tail and number == len(lines) + 1
        try:
            entry = json.loads(raw.decode("ascii"))
        except ValueError as err:
            if is_tail:  # torn append: never acknowledged, so nothing was released under it
                log.warning("%s: dropping torn last line %d (%d bytes)", path, number, len(tail))
                return entries, good
            raise LedgerCorruptError(f"{path}: line {number}: not valid JSON ({err})") from err
        if not isinstance(entry, dict):
            raise LedgerCorruptError(f"{path}: line {number}: not a JSON object")
        where = f"{path}: line {number}, entry seq {entry.get('seq')!r}"
        try:
            if raw.decode("ascii") != canonical(entry):
                raise ValueError("line is not in canonical form (sorted keys, no whitespace)")
            check_entry(entry | {"hash": None}, entries, gone)
            if entry.get("hash") != entry_hash(entry):
                raise ValueError(f"hash {entry.get('hash')!r} does not match the content")
        except (ValueError, TypeError, KeyError) as err:
            raise LedgerCorruptError(f"{where}: {err}") from err
        entries.append(entry)
        if entry["kind"] == RETIRE:
            gone |= set(entry["cohorts"])
    return entries, len(data)


class PrivacyLedger:
    """The open ledger of one client. Holds an exclusive lock until `close()`."""

    def __init__(
        self,
        path: Path,
        fd: int,
        entries: list[dict[str, Any]],
        *,
        fsync: bool,
        clock: Callable[[], float],
        new_file: bool = False,
    ) -> None:
        self.path, self._fd, self._entries = path, fd, entries
        self._fsync, self._clock, self._broken = fsync, clock, False
        self._retired = set(accounting.retired(entries))
        # a new file's folder entry is synced with its first append; writes not yet synced
        self._new_file, self._unsynced, self._deferring = new_file, False, False

    @classmethod
    def open(
        cls, path: str | Path, *, fsync: bool = True, clock: Callable[[], float] = time.time
    ) -> PrivacyLedger:
        """Open the ledger file (creating it and its folder if missing) and verify it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise LedgerBusyError(f"{path} is open in another PrivacyLedger") from err
            data = path.read_bytes()
            entries, good = _read(path, data)
            if good < len(data):
                os.ftruncate(fd, good)
            elif data and not data.endswith(b"\n"):
                os.write(fd, b"\n")  # a complete last entry whose newline was lost
            if good < len(data) or (data and not data.endswith(b"\n")):
                cls._sync(fd, path.parent, fsync)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, entries, fsync=fsync, clock=clock, new_file=created)

    @staticmethod
    def _sync(fd: int, directory: Path, fsync: bool) -> None:
        if fsync:
            os.fsync(fd)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _sync_appends(self) -> None:
        if self._fsync and self._unsynced:
            if self._new_file:
                self._sync(self._fd, self.path.parent, True)
                self._new_file = False
            else:
                os.fsync(self._fd)
        self._unsynced = False

    @contextlib.contextmanager
    def synced_once(self):
        """Appends inside are written at once and made durable together when the block exits
        (also on an error): one fsync per round instead of one per entry. Nothing built on
        them may leave before the block has exited."""
        if self._deferring:
            yield self
            return
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
            if self._fd >= 0 and not self._broken:
                self._sync_appends()

    def close(self) -> None:
        if self._fd >= 0:
            if not self._broken:
                self._sync_appends()
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appends -----------------------------------------------------------------------------

    def _append(self, kind: str, round: int, **fields: Any) -> dict[str, Any]:
        if self._fd < 0 or self._broken:
            raise RuntimeError(f"{self.path}: ledger is closed or a failed write left it unusable")
        entry = {
            "v": FORMAT_VERSION,
            "seq": len(self._entries),
            "kind": kind,
            "round": round,
            "time": float(self._clock()),
            "prev_hash": self.head_hash,
            **fields,
        }
        check_entry(entry | {"hash": None}, self._entries, self._retired)
        entry["hash"] = entry_hash(entry)
        line = (canonical(entry) + "\n").encode("ascii")
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            self._unsynced = True
            if not self._deferring:
                self._sync_appends()
        except BaseException:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                self._broken = True
            raise
        self._entries.append(entry)
        if kind == RETIRE:
            self._retired |= set(entry["cohorts"])
        return copy.deepcopy(entry)

    def append_train(self, round: int, mechanism: Mechanism, cohorts: Mapping[str, int]) -> dict:
        """Record a finished local round; RetiredCohortError if it touched a retired cohort."""
        return self._append(TRAIN, round, mechanism=mechanism.to_dict(), cohorts=dict(cohorts))

    def append_retire(
        self,
        round: int,
        cohorts: Iterable[str],
        reason: str,
        epsilons: Mapping[str, float],
        *,
        guarantee: Guarantee,
        delta: float,
    ) -> dict:
        """Retire cohorts for good; `epsilons` (e.g. from `plan`) may not be below their spent ε."""
        cohorts = sorted(set(cohorts))
        if missing := [c for c in cohorts if c not in epsilons]:
            raise ValueError(f"no epsilon given for cohorts {missing}")
        eps = {c: _eps_out(float(epsilons[c])) for c in cohorts}
        guarantee = Guarantee(guarantee).value
        return self._append(
            RETIRE,
            round,
            cohorts=cohorts,
            reason=reason,
            guarantee=guarantee,
            delta=delta,
            epsilons=eps,
        )

    def append_survivors(self, round: int, n: int) -> dict:
        """Record how many devices the server summed in `round` (our latest train entry there)."""
        seqs = [e["seq"] for e in self._entries if e["kind"] == TRAIN and e["round"] == round]
        if not seqs:
            raise ValueError(f"no train entry for round {round} to report survivors on")
        return self._append(SURVIVORS, round, train_seq=seqs[-1], n=n)

    # -- reads -------------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[dict[str, Any], ...]:
        return tuple(copy.deepcopy(self._entries))

    @property
    def head_hash(self) -> str:
        return self._entries[-1]["hash"] if self._entries else GENESIS

    def contains(self, hash: str) -> bool:
        """Whether `hash` (e.g. a head recorded in an earlier run summary) is in the chain."""
        return hash == GENESIS or any(e["hash"] == hash for e in self._entries)

    def retired_cohorts(self) -> frozenset[str]:
        return frozenset(self._retired)

    def epsilons(self, guarantee: Guarantee, delta: float) -> dict[str, float]:
        return accounting.cohort_epsilons(self._entries, guarantee, delta)

    def cohort_rdp(self, guarantee: Guarantee) -> dict[str, np.ndarray]:
        """Accumulated RDP of every cohort: `epsilons` before its conversion, so a caller over
        many ledgers converts them all at once (`accounting.epsilons_of_rdp`)."""
        return accounting.cohort_rdp(self._entries, guarantee)

    def plan(
        self,
        mechanism: Mechanism,
        cohorts: Iterable[str],
        budget: float,
        guarantee: Guarantee,
        delta: float,
    ) -> tuple[list[str], dict[str, float]]:
        """(trainable, {cohort to retire: ε it would reach}); see `accounting.plan`."""
        return accounting.plan(self._entries, mechanism, cohorts, budget, guarantee, delta)


def ledgers_epsilons(paths: Iterable[str | Path], delta: float) -> LedgerEpsilons:
    """Open (and verify) each ledger once and give each cohort's ε at `delta` under both
    guarantees, as the report over a whole run needs them (all cohorts converted in one
    vectorised pass); a corrupt ledger raises LedgerCorruptError naming it."""
    distributed: list[np.ndarray] = []
    local: list[np.ndarray] = []
    retired, heads = 0, {}
    for path in paths:
        with PrivacyLedger.open(path) as ledger:
            distributed.extend(ledger.cohort_rdp(Guarantee.DISTRIBUTED).values())
            local.extend(ledger.cohort_rdp(Guarantee.LOCAL).values())
            retired += len(ledger.retired_cohorts())
            if ledger.head_hash != GENESIS:
                heads[Path(path).parent.name] = ledger.head_hash
    return LedgerEpsilons(
        accounting.epsilons_of_rdp(distributed, delta),
        accounting.epsilons_of_rdp(local, delta),
        retired,
        heads,
    )


@dataclass(frozen=True)
class LedgerEpsilons:
    """Over many ledgers: each cohort's ε at one δ under the distributed and the local
    guarantee, the number of retired cohorts, and each folder's head hash (ledgers with
    entries; an auditor detects a truncated ledger against it)."""

    distributed: np.ndarray
    local: np.ndarray
    retired: int
    heads: dict[str, str]

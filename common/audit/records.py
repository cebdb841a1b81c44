"""Reading the persisted records of a run and verifying the ledgers' hash chains.

Independent of the code that wrote them: this module shares nothing with `fedrec.client.ledger`
but the file format, which it parses and re-hashes itself. Format (ledger format 1):
one canonical JSON object per line (keys sorted, separators "," and ":", ASCII escapes);
`hash` = sha256 hex of the canonical JSON of the entry without `hash`; `prev_hash` = the previous
entry's `hash`, 64 zeros for the first; `seq` = 0, 1, 2, ...
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GENESIS = "0" * 64
LEDGER_FILE = "ledger.jsonl"
TRAIN, RETIRE, SURVIVORS = "train", "retire", "survivors"
_COMMON = frozenset({"v", "seq", "kind", "round", "time", "prev_hash", "hash"})
FIELDS = {
    TRAIN: _COMMON | {"mechanism", "cohorts"},
    RETIRE: _COMMON | {"cohorts", "reason", "guarantee", "delta", "epsilons"},
    SURVIVORS: _COMMON | {"train_seq", "n"},
}
MECHANISM_FIELDS = frozenset(
    {
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "delta",
        "aggregate_noise_multiplier",
        "min_survivors",
    }
)
# A mechanism may add "ddg": the discrete Gaussian of a SecAgg+ round (then no continuous noise)
DDG_FIELDS = frozenset({"sigma", "gamma", "clip_norm", "bits", "dim", "target_epsilon"})


def _ddg_problem(m: dict) -> str | None:
    d = m["ddg"]
    if not isinstance(d, dict) or set(d) != DDG_FIELDS:
        return "ddg fields are not those of format 1"
    if not all(_real(d[k]) and math.isfinite(d[k]) for k in ("sigma", "gamma", "clip_norm")):
        return "bad ddg sigma, gamma or clip_norm"
    if not (d["sigma"] >= 0 and d["gamma"] > 0 and d["clip_norm"] > 0):
        return "bad ddg sigma, gamma or clip_norm"
    if not (_int(d["bits"]) and _int(d["dim"]) and d["bits"] >= 1 and d["dim"] >= 1):
        return "bad ddg bits or dim"
    if m["noise_multiplier"] != 0:
        return "a ddg mechanism with continuous noise"
    return None


class RecordsError(RuntimeError):
    """A record the audit needs is missing or unreadable (exit code 2). Names the file."""


@dataclass(frozen=True)
class Finding:
    """One violated claim: which client (None: the run), which ledger entry, what."""

    check: str  # chain | entry | retired | budget | recompute | guarantee
    what: str
    client: str | None = None
    seq: int | None = None

    def line(self) -> str:
        where = [] if self.client is None else [f"client {self.client}"]
        if self.seq is not None:
            where.append(f"entry seq {self.seq}")
        return f"[{self.check}] {', '.join(where) + ': ' if where else ''}{self.what}"


@dataclass
class Ledger:
    client: str
    path: Path
    entries: list[dict[str, Any]]  # every parsed entry, in file order (also the broken ones)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.entries[-1].get("hash", "") if self.entries else GENESIS


def canonical(entry: Mapping[str, Any]) -> str:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(
        canonical({k: v for k, v in entry.items() if k != "hash"}).encode("ascii")
    ).hexdigest()


def _hash_matches(text: str, entry: Mapping[str, Any]) -> bool:
    """The fast path: hash the line's own bytes with the hash field cut out. In canonical form
    `"hash":"<hex>",` sits between other keys ("hash" is never the last key), so a match means
    the line is exactly the canonical text that was hashed (no re-serialisation needed)."""
    digest = entry.get("hash")
    if not isinstance(digest, str):
        return False
    field = f'"hash":"{digest}",'
    if text.count(field) != 1:
        return False
    return hashlib.sha256(text.replace(field, "", 1).encode("ascii")).hexdigest() == digest


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def malformed(entry: Mapping[str, Any]) -> str | None:
    """Why `entry` is not a well-formed entry of format 1, or None. Only what the recomputation
    relies on: a malformed entry is reported and left out of every figure."""
    kind = entry.get("kind")
    if kind not in FIELDS:
        return f"unknown kind {kind!r}"
    if set(entry) != FIELDS[kind]:
        return f"fields {sorted(entry)} are not those of a {kind} entry"
    if entry["v"] != 1 or not _int(entry["seq"]) or not _int(entry["round"]):
        return "bad v, seq or round"
    if kind == TRAIN:
        m, cohorts = entry["mechanism"], entry["cohorts"]
        if not isinstance(m, dict) or set(m) - {"ddg"} != MECHANISM_FIELDS:
            return "mechanism fields are not those of format 1"
        if "ddg" in m and (reason := _ddg_problem(m)) is not None:
            return reason
        if not (_real(m["noise_multiplier"]) and m["noise_multiplier"] >= 0):
            return "bad noise_multiplier"
        if not (_real(m["sample_rate"]) and 0 < m["sample_rate"] <= 1):
            return "bad sample_rate"
        if not (_int(m["steps"]) and m["steps"] >= 0):
            return "bad steps"
        if (m["min_survivors"] is None) != (m["aggregate_noise_multiplier"] is None):
            return "aggregate_noise_multiplier and min_survivors must be set together"
        if m["min_survivors"] is not None and not (
            _int(m["min_survivors"]) and m["min_survivors"] >= 1
        ):
            return "bad min_survivors"
        if not isinstance(cohorts, dict) or not all(
            isinstance(c, str) and c and _int(n) and n >= 0 for c, n in cohorts.items()
        ):
            return "cohorts must map cohort name -> interaction count"
    elif kind == RETIRE:
        if not isinstance(entry["cohorts"], list) or not all(
            isinstance(c, str) for c in entry["cohorts"]
        ):
            return "retired cohorts must be a list of names"
        if entry["guarantee"] not in ("local", "distributed"):
            return f"unknown guarantee {entry['guarantee']!r}"
        if not (_real(entry["delta"]) and 0 < entry["delta"] < 1):
            return "bad delta"
        eps = entry["epsilons"]
        if not isinstance(eps, dict) or sorted(eps) != sorted(entry["cohorts"]):
            return "epsilons must have exactly the retired cohorts as keys"
        if not all(v == "inf" or (_real(v) and v >= 0) for v in eps.values()):
            return "epsilons must be numbers >= 0 or 'inf'"
    elif not (_int(entry["n"]) and entry["n"] >= 1 and _int(entry["train_seq"])):
        return "survivors needs integers n >= 1 and train_seq"
    return None


def verify_chain(client: str, path: Path, data: bytes) -> Ledger:
    """Parse a ledger file and report every break of its chain, each named by entry seq.

    An edit shows as a hash that does not match the content (or, if the hash was recomputed,
    as the next entry's prev_hash); a deletion as a gap in seq and a prev_hash mismatch; an
    insertion or reordering as a seq out of order. Truncation, and edits that rewrite every
    later hash, are only visible against a head hash kept elsewhere (`check_heads`).
    """
    ledger = Ledger(client, path, [])
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        lines.append(tail)
    prev: dict[str, Any] | None = None
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("ascii")
            entry = json.loads(text)
        except ValueError:
            if tail and number == len(lines):
                # a crash mid-append: never acknowledged, nothing was released under it
                ledger.notes.append(f"{path}: torn last line {number} ignored (crash mid-append)")
                break
            ledger.findings.append(Finding("chain", f"line {number} is not valid JSON", client))
            continue
        if not isinstance(entry, dict):
            ledger.findings.append(Finding("chain", f"line {number} is not an object", client))
            continue
        seq = entry.get("seq")
        seq = seq if _int(seq) else None

        def bad(what: str, entry_seq: int | None = seq) -> None:
            ledger.findings.append(Finding("chain", what, client, entry_seq))

        if not _hash_matches(text, entry):
            if text != canonical(entry):
                bad(f"line {number} is not in canonical form: edited by hand")
            if entry.get("hash") != entry_hash(entry):
                bad(f"line {number}: hash does not match the content: the entry was edited")
        prev_seq = None if prev is None else prev.get("seq")
        expected = 0 if prev is None else (prev_seq + 1 if _int(prev_seq) else None)
        if seq is not None and expected is not None and seq != expected:
            if seq > expected:
                bad(f"line {number}: seq {seq} where {expected} was expected: entries deleted")
            else:
                bad(f"line {number}: seq {seq} after seq {expected - 1}: inserted or reordered")
        prev_hash = GENESIS if prev is None else prev.get("hash")
        if entry.get("prev_hash") != prev_hash:
            bad(
                f"line {number}: prev_hash does not match the previous line's hash: an entry "
                "before it was edited, deleted, inserted or reordered"
            )
        if why := malformed(entry):
            ledger.findings.append(Finding("entry", f"line {number}: {why}", client, seq))
            entry = {**entry, "_malformed": True}
        ledger.entries.append(entry)
        prev = entry
    return ledger


def check_heads(ledger: Ledger, recorded: str | None, source: str) -> None:
    """Compare the chain with a head hash recorded elsewhere (the run summary)."""
    if recorded is None:
        return
    hashes = [e.get("hash") for e in ledger.entries]
    if recorded == ledger.head:
        return
    if recorded == GENESIS or recorded in hashes:
        at = 0 if recorded == GENESIS else hashes.index(recorded) + 1
        extra = len(hashes) - at
        ledger.findings.append(
            Finding(
                "chain",
                f"{extra} entries after the head recorded in {source}: appended later, or "
                "inserted with every later hash rewritten",
                ledger.client,
                ledger.entries[at].get("seq"),
            )
        )
    else:
        last = ledger.entries[-1].get("seq") if ledger.entries else None
        ledger.findings.append(
            Finding(
                "chain",
                f"the head recorded in {source} is not in the chain (which ends at seq {last}): "
                "truncated, or edited with the later hashes rewritten",
                ledger.client,
                last,
            )
        )


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise RecordsError(f"{path}: unreadable ({err.strerror or err})") from err


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_bytes(path))
    except ValueError as err:
        raise RecordsError(f"{path}: not valid JSON ({err})") from err


def find_ledgers(root: Path) -> dict[str, Path]:
    """client -> ledger file, for a run folder, a device's store folder or a folder of ledgers."""
    if (root / LEDGER_FILE).is_file():  # one device's store folder
        return {root.name: root / LEDGER_FILE}
    base = root / "clients" if (root / "clients").is_dir() else root
    found = {p.parent.name: p for p in base.glob(f"*/{LEDGER_FILE}")}
    if not (root / "summary.json").exists():  # a plain folder of ledgers: NAME.jsonl too
        run_logs = {"metrics", "participation", "attempts", "devices"}  # a run's logs, not ledgers
        found |= {
            p.stem: p
            for p in root.glob("*.jsonl")
            if p.stem not in found and p.stem not in run_logs
        }
    return dict(sorted(found.items()))


def load_ledgers(root: Path, heads: Mapping[str, str] | None, source: str) -> list[Ledger]:
    """Every ledger under `root`, chain-verified; ledgers named in `heads` must all exist."""
    paths = find_ledgers(root)
    heads = dict(heads or {})
    missing = sorted(set(heads) - set(paths))
    if missing:
        shown = ", ".join(str(root / "clients" / c / LEDGER_FILE) for c in missing[:5])
        raise RecordsError(f"{len(missing)} ledgers recorded in {source} are missing: {shown}")
    if not paths:
        raise RecordsError(f"{root}: no ledgers found (ledger.jsonl, clients/*/ledger.jsonl)")
    out = []
    for client, path in paths.items():
        ledger = verify_chain(client, path, read_bytes(path))
        if heads:
            if client in heads:
                check_heads(ledger, heads[client], source)
            elif ledger.entries:  # a ledger without entries has no head to record
                ledger.findings.append(
                    Finding("chain", f"this ledger is not listed in {source}", client)
                )
        out.append(ledger)
    return out


def parse_heads(items: list[str]) -> dict[str, str]:
    """summary.json's ledger_heads ("client:hash") as a mapping."""
    heads = {}
    for item in items:
        client, _, digest = str(item).rpartition(":")
        heads[client] = digest
    return heads


def server_record(root: Path) -> tuple[dict[str, Any], Path]:
    """The user-level accountant record in the committed checkpoint: (record, file).

    Read from the `__meta__` member of the round file latest.json names (the layout of
    `fedrec.server.checkpoint`, parsed here with numpy alone)."""
    latest = root / "checkpoints" / "latest.json"
    info = read_json(latest)
    name = info.get("file") if isinstance(info, dict) else None
    if not isinstance(name, str) or "/" in name:
        raise RecordsError(f"{latest}: names no round file")
    path = latest.parent / name
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["__meta__"].tobytes().decode())
        record = meta["extra"]["user_privacy"]
        rounds = record["rounds"]
        if not isinstance(rounds, list):
            raise TypeError("rounds is not a list")
    except FileNotFoundError as err:
        raise RecordsError(f"{path}: missing") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecordsError(f"{path}: no readable user-level record ({err})") from err
    return record, path


def earlier_records(root: Path) -> dict[Path, list[Any]]:
    """The user-level record of every round file (earlier checkpoints kept by the run)."""
    out = {}
    for path in sorted((root / "checkpoints").glob("round-*.npz")):
        try:
            with np.load(path, allow_pickle=False) as z:  # reads only the metadata member
                meta = json.loads(z["__meta__"].tobytes().decode())
            out[path] = meta["extra"]["user_privacy"]["rounds"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RecordsError(f"{path}: no readable user-level record ({err})") from err
    return out

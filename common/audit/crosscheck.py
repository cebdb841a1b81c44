"""Every device ledger checked against the server's records: its mechanisms against the
configuration in force (re-derived here from config.json's keys, as fedrec documents them,
not imported), its rounds against the server's participation record, and its head hash,
round by round, against the heads the server recorded.

A ledger is a device's own record, hash-chained, so a forger can rewrite it consistently
(every entry edited and re-hashed: a doubled σ; a train and a retire entry deleted and the
chain re-hashed). What the forger cannot rewrite consistently is the server's record of the
same rounds: each mechanism must be the one the configuration prescribes, each round a round
in which the server sampled the device, and the ledger's head after each round the one the
device committed to in its reply (a keyed hash the server recorded in participation.jsonl).
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import json
import math
from pathlib import Path
from typing import Any

from fedrec.common.audit.ledgers import DISTRIBUTED, LOCAL
from fedrec.common.audit.records import (
    GENESIS,
    RETIRE,
    TRAIN,
    Finding,
    Ledger,
    RecordsError,
    read_bytes,
)
from fedrec.common.audit.run_record import RunRecord


def dp_parts(config: dict[str, Any]) -> frozenset[str]:
    text = str(config.get("dp", "off")).strip().lower()
    return frozenset() if text in ("off", "none", "") else frozenset(text.split("+"))


def mechanism_key(mechanism: dict[str, Any]) -> tuple:
    """A recorded mechanism as a hashable, order-free key (its "ddg" mapping as items)."""
    return tuple(
        sorted(
            (k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
            for k, v in mechanism.items()
        )
    )


def secagg(config: dict[str, Any]) -> bool:
    return str(config.get("secure-aggregation-protocol", "clear")) == "secagg"


def expected_ddg(config: dict[str, Any], dim: int) -> dict[str, Any]:
    """The discrete Gaussian a "secagg" configuration prescribes for updates of `dim`
    coordinates (the dimension as recorded: the size of the model's global parameters, public).
    Re-derived from config.json's keys by fedrec's deterministic rule
    (`fedrec.common.secagg.round_params`: per-round ε of the aggregate noise multiplier, σ
    calibrated to it at K_min, γ and the bits from the provisioned devices), so a doctored σ,
    γ, bits or target differs from it."""
    from fedrec.common.secagg.round_params import ddg_round_params, max_devices, per_round_target

    target = per_round_target(
        aggregate_noise_multiplier=float(config["aggregate-noise-multiplier"]),
        sample_rate=float(config["sample-rate"]),
        steps=int(config["local-steps"]),
        delta=float(config["delta"]),
    )
    params = ddg_round_params(
        target_epsilon=target,
        delta=float(config["delta"]),
        sample_rate=float(config["sample-rate"]),
        min_survivors=int(config["min-survivors"]),
        max_devices=max_devices(int(config["clients-per-round"])),
        dim=dim,
        clip_norm=float(config["local-lr"]) * float(config["clip-norm"]),
    )
    return {
        "sigma": params.sigma,
        "gamma": params.gamma,
        "clip_norm": params.clip_norm,
        "bits": params.bits,
        "dim": dim,
        "target_epsilon": target,
    }


def expected_mechanism(config: dict[str, Any]) -> dict[str, Any] | None:
    """The device mechanism a configuration prescribes (fedrec's definition, restated): under
    `distributed` each device adds σ = aggregate-noise-multiplier/√min-survivors so a sum of
    K_min devices carries the aggregate σ; under `local` σ = local-noise-multiplier; without
    either, devices run no DP-SGD (None: no train entry may exist)."""
    dp = dp_parts(config)
    agg, k = None, None
    if "distributed" in dp:
        agg, k = float(config["aggregate-noise-multiplier"]), int(config["min-survivors"])
        sigma = agg / math.sqrt(k)
    elif "local" in dp:
        sigma = float(config["local-noise-multiplier"])
    else:
        return None
    if "distributed" in dp and secagg(config):  # no continuous noise: the "ddg" field's
        sigma = agg = 0.0
    return {
        "noise_multiplier": sigma,
        "sample_rate": float(config["sample-rate"]),
        "steps": int(config["local-steps"]),
        "clip_norm": float(config["clip-norm"]),
        "delta": float(config["delta"]),
        "aggregate_noise_multiplier": agg,
        "min_survivors": k,
    }


def budget_view(config: dict[str, Any]) -> str | None:
    """The guarantee the devices hold their budgets in: distributed, unless a local user
    vector voids it (trained under the device's own noise only)."""
    dp = dp_parts(config)
    if "distributed" in dp and not _true(config.get("model-user-embedding", False)):
        return DISTRIBUTED
    return LOCAL if dp & {"distributed", "local"} else None


def _true(x: Any) -> bool:
    return x if isinstance(x, bool) else str(x).strip().lower() in ("1", "true", "yes")


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)


def check_mechanisms(ledgers: list[Ledger], run: RunRecord, findings: list[Finding]) -> int:
    """Every train entry's mechanism and every retirement's guarantee and δ against the
    configuration of its round. Returns the number of entries checked."""
    cache: dict[tuple, list[str]] = {}
    checked = 0
    for ledger in ledgers:
        for e in ledger.entries:
            if e.get("_malformed") or e["kind"] not in (TRAIN, RETIRE):
                continue
            config = run.config_at(int(e["round"]))
            checked += 1
            if e["kind"] == RETIRE:
                view = budget_view(config)
                if e["guarantee"] != view or not _same(e["delta"], config.get("delta")):
                    findings.append(
                        Finding(
                            "mechanism",
                            f"retirement in guarantee {e['guarantee']} at δ={e['delta']}; the "
                            f"configuration of round {e['round']} budgets in {view} at "
                            f"δ={config.get('delta')}",
                            ledger.client,
                            e["seq"],
                        )
                    )
                continue
            key = (id(config), mechanism_key(e["mechanism"]))
            if key not in cache:
                cache[key] = _mechanism_differences(e["mechanism"], config)
            for what in cache[key]:
                findings.append(
                    Finding("mechanism", f"round {e['round']}: {what}", ledger.client, e["seq"])
                )
    return checked


def _mechanism_differences(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    want = expected_mechanism(config)
    if want is None:
        return [f"a DP-SGD train entry, but dp={config.get('dp')!r} runs no DP-SGD"]
    names = {
        "noise_multiplier": "σ on the device",
        "aggregate_noise_multiplier": "aggregate σ",
        "min_survivors": "K_min",
        "sample_rate": "sampling rate q",
        "steps": "steps",
        "clip_norm": "clipping norm",
        "delta": "δ",
    }
    out = [
        f"{label} {recorded.get(k)} != {want[k]:.10g} that config.json prescribes"
        if want[k] is not None
        else f"{label} {recorded.get(k)} where the configuration has none"
        for k, label in names.items()
        if not _same(recorded.get(k), want[k])
    ]
    return out + _ddg_differences(recorded.get("ddg"), config)


def _ddg_differences(recorded: Any, config: dict[str, Any]) -> list[str]:
    """The recorded discrete Gaussian against the one a "secagg" configuration prescribes."""
    wanted = "distributed" in dp_parts(config) and secagg(config)
    if recorded is None:
        return ["no discrete Gaussian recorded; the configuration runs secagg"] if wanted else []
    if not wanted:
        return ["a discrete Gaussian recorded; the configuration runs no secagg"]
    try:
        want = expected_ddg(config, int(recorded["dim"]))
    except (KeyError, TypeError, ValueError) as err:
        return [f"discrete Gaussian {recorded!r} cannot be re-derived: {err}"]
    return [
        f"discrete Gaussian {k} {recorded.get(k)} != {v:.10g} that config.json prescribes"
        for k, v in want.items()
        if not _same(recorded.get(k), v)
    ]


COMMIT_KEY_FILE = "commit.key"  # the simulated devices' key, in clients/


def commitment(key: bytes, device: str, round: int, head: str) -> str:
    """A device's commitment to its ledger head after a round (fedrec's format, restated):
    HMAC-SHA256(key, "device\\0round\\0head"), first 16 hex."""
    message = f"{device}\0{round}\0{head}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:16]


def _head_after(entries: list[dict[str, Any]], rounds: list[int], round: int) -> str:
    """The chain's head once every entry of rounds <= `round` was appended."""
    at = bisect.bisect_right(rounds, round)
    return str(entries[at - 1].get("hash")) if at else GENESIS


ATTEMPTS = "attempts.jsonl"


def attempted_rounds(root: Path) -> dict[str, set[int]]:
    """device -> the rounds any attempt asked it in (attempts.jsonl: a line per attempt at a
    round, written before its devices were asked, kept when a crash cut the attempt short).
    A final line without its newline was cut by a crash while being written: ignored. Runs
    written before that file have none."""
    path = root / ATTEMPTS
    if not path.exists():
        return {}
    lines = read_bytes(path).split(b"\n")[:-1]  # the last piece: empty, or a torn line
    out: dict[str, set[int]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            round, devices = int(row["round"]), [str(d) for d in row["devices"]]
        except (ValueError, KeyError, TypeError) as err:
            raise RecordsError(f"{path}, line {number}: not an attempt record ({err})") from err
        for name in devices:
            out.setdefault(name, set()).add(round)
    return out


def check_participation(
    root: Path, ledgers: list[Ledger], run: RunRecord, findings: list[Finding]
) -> dict[str, int]:
    """Each ledger against the server's per-round record: every entry in a round in which the
    server sampled the device (in the attempt that committed, or in one a crash interrupted:
    `attempted_rounds`), and the ledger's head after each such round the one the device
    committed to in its reply."""
    by_name = {ledger.client: ledger for ledger in ledgers}
    attempted = attempted_rounds(root)
    interrupted = 0  # entries of attempts a crash cut short
    sampled: dict[str, set[int]] = {}
    commits: dict[str, list[tuple[int, str]]] = {}
    for r, row in sorted(run.participation.items()):
        for name, commit in (row.get("devices") or {}).items():
            sampled.setdefault(str(name), set()).add(r)
            if commit:
                commits.setdefault(str(name), []).append((r, str(commit)))
    key = None
    if commits:
        path = root / "clients" / COMMIT_KEY_FILE
        if not path.exists():
            raise RecordsError(f"{path}: missing: the devices' commitments cannot be checked")
        key = read_bytes(path)
    checked = 0
    for name in sorted(set(by_name) | set(commits)):
        ledger = by_name.get(name)
        entries = [] if ledger is None else [e for e in ledger.entries if not e.get("_malformed")]
        for e in entries:
            if e["kind"] not in (TRAIN, RETIRE):
                continue
            r = int(e["round"])
            if r not in run.participation:
                what = "a round the server never recorded"
            elif r not in sampled.get(name, set()):
                if r in attempted.get(name, set()):
                    interrupted += 1
                    continue
                what = "a round in which the server did not sample this device"
            else:
                continue
            findings.append(
                Finding(
                    "participation", f"a {e['kind']} entry of round {r}, {what}", name, e["seq"]
                )
            )
        rounds = [int(e["round"]) for e in entries]
        if rounds != sorted(rounds):
            continue  # out of order: the chain check names it
        for r, commit in commits.get(name, []):
            checked += 1
            if commitment(key, name, r, _head_after(entries, rounds, r)) != commit:
                findings.append(
                    Finding(
                        "participation",
                        f"its ledger after round {r} is not the one it committed to in its "
                        "reply to the server: entries of that round or earlier were edited, "
                        "deleted or inserted (and the chain re-hashed)",
                        name,
                    )
                )
                break
    return {
        "rounds": len(run.participation),
        "commitments_checked": checked,
        "entries_of_interrupted_attempts": interrupted,
    }


def check_metrics_rows(run: RunRecord, findings: list[Finding]) -> None:
    """metrics.jsonl's counts against the participation record of the same round."""
    for r, row in sorted(run.metrics.items()):
        part = run.participation.get(r)
        if part is None:
            findings.append(
                Finding("participation", f"metrics.jsonl: round {r} has no participation record")
            )
            continue
        pairs = (
            ("sampled", len(part.get("devices", {}))),
            ("failed", len(part.get("failed", []))),
            ("aggregated", part.get("summed")),
            ("discarded", part.get("discarded")),
        )
        for key, value in pairs:
            if key in row and row[key] != value:
                findings.append(
                    Finding(
                        "participation",
                        f"metrics.jsonl round {r}: {key} {row[key]!r} != {value!r} in the "
                        "server's participation record",
                    )
                )
    for r in sorted(set(run.participation) - set(run.metrics)):
        findings.append(
            Finding("participation", f"round {r} recorded by the server but not in metrics.jsonl")
        )


def interactions(ledgers: list[Ledger]) -> int:
    """Interactions the devices trained on (each cohort at its largest recorded size)."""
    total = 0
    for ledger in ledgers:
        sizes: dict[str, int] = {}
        for e in ledger.entries:
            if e.get("kind") == TRAIN and not e.get("_malformed"):
                for c, n in e["cohorts"].items():
                    sizes[c] = max(sizes.get(c, 0), int(n))
        total += sum(sizes.values())
    return total

"""The user-level guarantee, recomputed from the server's own record.

The record is the user-level accountant state in the committed checkpoint (one entry per
published round: noise multiplier z, client sampling rate q, clipping norm, δ), read without
fedrec's server code. ε is recomputed with the same independent accountant as the ledgers and
checked against summary.json, every round of metrics.jsonl and the user-level budget; every
earlier checkpoint's record must be a prefix of the final one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from fedrec.common.audit.recompute import key_of, pld_below, rdp_agrees
from fedrec.common.audit.records import (
    Finding,
    RecordsError,
    earlier_records,
    read_bytes,
    server_record,
)


def user_level(root, summary, rec, findings, notes) -> dict[str, Any] | None:
    """User-level ε recomputed from the server's own record (checkpoint), checked against the
    summary, the per-round log and the user-level budget."""
    privacy, dp = summary.get("privacy", {}), summary.get("dp", {})
    if "user" not in dp.get("mode", ""):
        return None
    record, path = server_record(root)
    delta = float(privacy.get("delta"))
    counts: Counter = Counter()
    rounds, per_round = [], {}
    for item in record["rounds"]:
        m = item["mechanism"]
        counts[(float(m["sample_rate"]), float(m["noise_multiplier"]))] += int(m["steps"])
        rounds.append(item["round"])
        per_round[item["round"]] = rec.epsilon(key_of(counts), delta)
    key = key_of(counts)
    eps, pld = rec.epsilon(key, delta), rec.epsilon_pld(key, delta)
    mechanisms = {
        (
            m["mechanism"]["sample_rate"],
            m["mechanism"]["noise_multiplier"],
            m["mechanism"]["clip_norm"],
        )
        for m in record["rounds"]
    }
    out = {
        "record": str(path),
        "rounds": len(rounds),
        "mechanisms": [
            {"sample_rate": q, "noise_multiplier": z, "clip_norm": c}
            for q, z, c in sorted(mechanisms)
        ],
        "epsilon_rdp": eps,
        "epsilon_pld": pld,
        "reported": privacy.get("user_epsilon"),
        "budget": privacy.get("user_budget_epsilon"),
        "per_round": per_round,
    }
    where = f"user-level ({path.name})"
    reported = privacy.get("user_epsilon")
    if reported is not None and not rdp_agrees(float(reported), eps):
        findings.append(Finding("recompute", f"{where}: reported ε={reported} != recomputed {eps}"))
    if reported is not None and not pld_below(float(reported), pld):
        findings.append(Finding("recompute", f"{where}: reported ε={reported} < PLD ε {pld}"))
    budget = privacy.get("user_budget_epsilon")
    if budget is not None and eps > float(budget) * (1 + 1e-9):
        findings.append(Finding("budget", f"{where}: ε={eps:.4f} > user budget {budget}"))
    if (z := dp.get("user_noise_multiplier")) is not None and {m[1] for m in mechanisms} - {z}:
        findings.append(Finding("guarantee", f"{where}: recorded noise != summary's {z}"))
    if (q := dp.get("client_sample_rate")) is not None and {m[0] for m in mechanisms} - {q}:
        findings.append(Finding("guarantee", f"{where}: recorded sampling rate != summary's {q}"))
    if summary.get("rounds") is not None and summary["rounds"] != len(rounds):
        findings.append(
            Finding(
                "guarantee",
                f"{where}: {len(rounds)} rounds recorded, {summary['rounds']} published",
            )
        )
    out["sampled_per_round"] = _check_metrics(root, per_round, findings, notes)
    out["discard_delta"] = _discard_delta(summary, eps, len(rounds), findings, notes)
    # An earlier checkpoint's record must be a prefix of the final one: spend is never erased.
    for earlier, rounds_then in earlier_records(root).items():
        if rounds_then != record["rounds"][: len(rounds_then)]:
            findings.append(
                Finding(
                    "guarantee",
                    f"{where}: the record in {earlier.name} is not a prefix of "
                    f"the final record: published rounds were rewritten or removed",
                )
            )
    return out


def _check_metrics(root, per_round, findings, notes) -> list[int]:
    """Per-round user-level ε of metrics.jsonl against the record; returns devices sampled."""
    path = root / "metrics.jsonl"
    sampled: list[int] = []
    if not path.exists():
        notes.append(f"{path}: missing, per-round user-level ε not checked")
        return sampled
    for number, line in enumerate(read_bytes(path).decode().splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError as err:
            raise RecordsError(f"{path}: line {number} is not valid JSON") from err
        reported, rnd = row.get("user_epsilon"), row.get("round")
        sampled.append(row.get("sampled"))
        if reported is None:
            continue
        if rnd not in per_round:
            findings.append(
                Finding(
                    "guarantee",
                    f"{path.name}: round {rnd} published but not in the server's record",
                )
            )
        elif not rdp_agrees(float(reported), per_round[rnd]):
            findings.append(
                Finding(
                    "recompute",
                    f"{path.name}: round {rnd} user ε={reported} != recomputed {per_round[rnd]}",
                )
            )
    return sampled


def _discard_delta(summary, eps: float, rounds: int, findings, notes) -> float | None:
    """The extra δ a run that discards rounds with fewer than K_min survivors states for it
    (`delta_from_discarded_rounds` of the user-level guarantee), recomputed:
    rounds·(1 + e^ε)·P[Binomial(N - 1, q) < K_min], with N = clients per round / q."""
    from scipy.stats import binom

    g = next(
        (g for g in summary["privacy"].get("guarantees", []) if "delta_from_discarded_rounds" in g),
        None,
    )
    if g is None:
        return None
    dp, config = summary.get("dp", {}), summary.get("config", {})
    q, k_min, expected = (
        dp.get("client_sample_rate"),
        dp.get("min_survivors"),
        config.get("clients-per-round"),
    )
    if q is None or k_min is None or expected is None or q >= 1:
        notes.append("discard δ not recomputed: the population N is not recorded (q = 1)")
        return None
    n = round(float(expected) / float(q))  # q = expected / N when expected <= N
    extra = 0.0
    if k_min > 1 and rounds > 0:
        tail = float(binom.cdf(k_min - 1, max(n - 1, 0), q))
        extra = min(1.0, rounds * (1.0 + math.exp(min(eps, 700.0))) * tail)
    reported = float(g["delta_from_discarded_rounds"])
    if not math.isclose(reported, extra, rel_tol=1e-6, abs_tol=1e-300):
        findings.append(
            Finding("recompute", f"user-level: discard δ {reported} != recomputed {extra}")
        )
    base = float(summary["privacy"]["delta"])
    if not math.isclose(float(g["delta"]), base + extra, rel_tol=1e-9):
        findings.append(
            Finding(
                "guarantee", f"user-level: stated δ {g['delta']} != δ + discard δ {base + extra}"
            )
        )
    return extra

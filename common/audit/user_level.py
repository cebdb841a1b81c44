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

from fedrec.common.audit.ledgers import DISTRIBUTED, effective_sigma
from fedrec.common.audit.recompute import DDGCharge, key_of, pld_below, rdp_agrees
from fedrec.common.audit.records import (
    Finding,
    RecordsError,
    earlier_records,
    read_bytes,
    server_record,
)


def user_level(root, summary, rec, findings, notes, run=None) -> dict[str, Any] | None:
    """User-level ε recomputed from the server's own record (checkpoint), checked against the
    summary, the per-round log, the user-level budget and, with the run's records (`run`),
    the configuration and participation of every round."""
    privacy, dp = summary.get("privacy", {}), summary.get("dp", {})
    if "user" not in dp.get("mode", ""):
        return None
    record, path = server_record(root)
    # the accountant's δ, as the server recorded it: the target δ less what the discard rule
    # may add under secure aggregation (re-derived from the configuration below, with `run`)
    deltas = {float(item["mechanism"]["delta"]) for item in record["rounds"]}
    delta = deltas.pop() if len(deltas) == 1 else float(privacy.get("delta"))
    if deltas:
        findings.append(Finding("guarantee", f"user-level ({path.name}): δ differs across rounds"))
    counts: Counter = Counter()
    rounds, per_round = [], {}
    for item in record["rounds"]:
        m = item["mechanism"]
        counts[(float(m["sample_rate"]), _user_sigma(m))] += int(m["steps"])
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
    if budget is not None and not (
        isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0
    ):
        raise RecordsError(f"summary.json: user_budget_epsilon {budget!r} is not a number > 0")
    if run is not None:  # the strictest budget the run ever had (one raised on --resume)
        strictest = run.strictest("user-epsilon")
        budget = strictest if budget is None or strictest is None else min(budget, strictest)
        out["budget"] = budget
        out["registered"] = _check_against_config(record["rounds"], run, rec, findings)
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
    out["discard_delta"] = _discard_delta(summary, eps, len(rounds), delta, findings, notes)
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


def _user_sigma(m: dict[str, Any]) -> float | DDGCharge:
    """The server's noise multiplier z, or, for a round paid by the devices' discrete
    Gaussian alone (secagg, "ddg"), its charge at n = K_min."""
    if m.get("ddg") is not None:
        return effective_sigma(m, DISTRIBUTED, None)
    return float(m["noise_multiplier"])


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


def _discard_delta(
    summary, eps: float, rounds: int, accountant_delta: float, findings, notes
) -> float | None:
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
    if "distributed" not in dp.get("mode", ""):
        # no secure aggregation, no threshold: no round is ever discarded, no δ for it
        extra = 0.0
        reported = float(g["delta_from_discarded_rounds"])
        if reported != 0.0:
            findings.append(
                Finding(
                    "recompute", f"user-level: discard δ {reported} where no round is discarded"
                )
            )
        return extra
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
    base = accountant_delta
    if not math.isclose(float(g["delta"]), base + extra, rel_tol=1e-9):
        findings.append(
            Finding(
                "guarantee", f"user-level: stated δ {g['delta']} != δ + discard δ {base + extra}"
            )
        )
    return extra


def _check_against_config(rounds, run, rec, findings) -> int | None:
    """Each published round's mechanism against the configuration in force and the number of
    registered devices the server recorded: q = min(clients-per-round, N)/N; the clipping
    norm is the update bound (local-lr·clip-norm with DP-SGD on the device, else
    update-clip-norm); z is the smallest multiple of 0.001 whose `rounds`-round ε fits the
    user budget, or the devices' own noise when that is larger (user+distributed:
    aggregate-noise-multiplier/(reference-batch·√local-steps)). Returns N."""
    from fedrec.common.audit.crosscheck import dp_parts, mechanism_key

    recorded = {item["round"] for item in rounds}
    for r in sorted(set(run.participation) - recorded):
        findings.append(
            Finding("guarantee", f"user-level: round {r} ran but is not in the server's record")
        )
    cache: dict[tuple, list[str]] = {}
    registered = None
    for item in rounds:
        r, m = item["round"], item["mechanism"]
        part = run.participation.get(r)
        if part is None:
            findings.append(
                Finding("guarantee", f"user-level: round {r} has no participation record")
            )
            continue
        config, registered = run.config_at(r), int(part["registered"])
        key = (id(config), registered, mechanism_key(m))
        if key not in cache:
            cache[key] = _user_differences(m, config, registered, rec, dp_parts(config))
        for what in cache[key]:
            findings.append(Finding("mechanism", f"user-level round {r}: {what}"))
    return registered


def _user_differences(m, config, registered, rec, dp) -> list[str]:
    out = []
    q = min(int(config["clients-per-round"]), registered) / registered
    if dp & {"distributed", "local"}:
        clip = float(config["local-lr"]) * float(config["clip-norm"])
    else:
        clip = float(config["update-clip-norm"])
    from_devices = 0.0
    if "distributed" in dp:
        from_devices = float(config["aggregate-noise-multiplier"]) / (
            int(config["reference-batch"]) * math.sqrt(int(config["local-steps"]))
        )
    if not math.isclose(float(m["sample_rate"]), q, rel_tol=1e-9):
        out.append(f"sampling rate {m['sample_rate']} != {q:.10g} (clients-per-round / N)")
    if not math.isclose(float(m["clip_norm"]), clip, rel_tol=1e-9):
        out.append(f"clipping norm {m['clip_norm']} != {clip:.10g} from the configuration")
    if int(m.get("steps", 1)) != 1:
        out.append(f"{m['steps']} compositions in one round")
    z, target = float(m["noise_multiplier"]), float(config["user-epsilon"])
    planned = int(config["rounds"])
    delta = float(config["delta"]) - _planned_discard_delta(config, registered, q, target, dp)
    if not math.isclose(float(m["delta"]), delta, rel_tol=1e-9):
        out.append(
            f"δ {m['delta']} != {delta:.10g} from the configuration (δ less the discard "
            "rule's planned share)"
        )
    if m.get("ddg") is not None:
        return out + _discrete_user_differences(m, config, q, planned, delta, target, rec)

    def fits(zz: float) -> bool:
        return zz > 0 and rec.epsilon(((q, zz, planned),), delta) <= target * (1 + 1e-9)

    if math.isclose(z, from_devices, rel_tol=1e-9) and from_devices > 0:
        if not fits(z):
            out.append(f"z {z} (the devices' noise) does not fit user-epsilon {target}")
    elif not fits(z) or (z > 0.001 and fits(round(z - 0.001, 3)) and z - 0.001 >= from_devices):
        out.append(
            f"noise multiplier z {z} is not the calibration of user-epsilon {target} over "
            f"{planned} rounds at q={q:.6g} (smallest z on a 0.001 grid that fits)"
        )
    return out


def _discrete_user_differences(m, config, q, planned, delta, target, rec) -> list[str]:
    """A round paid by the devices' discrete Gaussian alone: the one the configuration
    prescribes (`crosscheck.expected_ddg`), without server noise, at K_min, and enough for
    every planned round within the user budget."""
    from fedrec.common.audit.crosscheck import _ddg_differences, secagg

    if not secagg(config):
        return ["a discrete Gaussian round, but the configuration runs no secagg"]
    out = [f"user-level {what}" for what in _ddg_differences(m["ddg"], config)]
    if float(m["noise_multiplier"]) != 0 or m["min_survivors"] != int(config["min-survivors"]):
        out.append("a discrete Gaussian round with server noise or another K_min")
    charge = effective_sigma(m, DISTRIBUTED, None)
    if rec.epsilon(((q, charge, planned),), delta) > target * (1 + 1e-9):
        out.append(
            f"the devices' discrete Gaussian does not pay for {planned} rounds within "
            f"user-epsilon {target}, yet the server added no noise"
        )
    return out


def _planned_discard_delta(config, registered: int, q: float, target: float, dp) -> float:
    """The share of δ the server sets aside for discarding rounds below K_min (secure
    aggregation with user-level DP): planned rounds·(1 + e^ε_target)·P[Binomial(N-1, q) <
    K_min]; the accountant is calibrated for the rest, so the stated total stays within δ."""
    from scipy.stats import binom

    k_min, planned = int(config["min-survivors"]), int(config["rounds"])
    if not {"user", "distributed"} <= dp or k_min <= 1 or planned <= 0:
        return 0.0
    tail = float(binom.cdf(k_min - 1, max(registered - 1, 0), q))
    return min(1.0, planned * (1.0 + math.exp(min(target, 700.0))) * tail)

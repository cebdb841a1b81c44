"""Replaying a verified ledger: every cohort's ε over time, budgets, retirements.

A cohort (interactions that arrived together) is charged by every train entry listing it with
`steps` compositions of the Poisson-subsampled Gaussian mechanism. The σ an adversary faces is
  LOCAL:        σ_dev (the device's own noise);
  DISTRIBUTED:  σ_dev·√min(n, K_min), n from the survivors entry of that round, K_min if none;
                a mechanism without K_min is charged as LOCAL.
(The definition fedrec states; re-derived here from the recorded fields, not imported.)
A discrete Gaussian entry (SecAgg+, "ddg" in the mechanism) is charged the summed discrete
Gaussian's RDP at that n (`DDGCharge`) instead of a Gaussian σ.
A survivors entry arriving later re-charges its train entry: ε is replayed as each entry
arrived, so an entry that pushed a cohort past its budget is named by its own seq.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fedrec.common.audit.recompute import DDGCharge, Key, Recomputer, key_of, rdp_agrees
from fedrec.common.audit.records import RETIRE, SURVIVORS, TRAIN, Finding, Ledger

LOCAL, DISTRIBUTED = "local", "distributed"
VIEWS = (LOCAL, DISTRIBUTED)


def effective_sigma(
    mechanism: dict[str, Any], view: str, survivors: int | None
) -> float | DDGCharge:
    """σ of the Gaussian the view's adversary faces; for a discrete Gaussian entry ("ddg"),
    the `DDGCharge` of n = min(survivors, K_min) devices' shares (n = 1 under LOCAL)."""
    k = mechanism["min_survivors"]
    if mechanism.get("ddg") is not None:
        d = mechanism["ddg"]
        n = 1 if view == LOCAL or k is None else (k if survivors is None else min(survivors, k))
        padded = 1 << (int(d["dim"]) - 1).bit_length()
        return DDGCharge(float(d["sigma"]), float(d["gamma"]), float(d["clip_norm"]), padded, n)
    sigma = float(mechanism["noise_multiplier"])
    if view == LOCAL or k is None:
        return sigma
    return sigma * math.sqrt(k if survivors is None else min(survivors, k))


@dataclass(frozen=True)
class Budget:
    epsilon: float
    view: str  # the guarantee the budget is stated in


@dataclass
class Replay:
    """One ledger under one view: final history of each cohort, and the client's spend."""

    cohorts: dict[str, Key] = field(default_factory=dict)
    epsilons: dict[str, float] = field(default_factory=dict)
    series: list[tuple[int, float]] = field(default_factory=list)  # (round, max ε after it)
    retired: dict[str, int] = field(default_factory=dict)  # cohort -> seq of its retirement


def replay(
    ledger: Ledger,
    view: str,
    delta: float,
    rec: Recomputer,
    budget: Budget | None,
    findings: list[Finding],
) -> Replay:
    """Walk the entries in order; append every violation to `findings` (client, seq, what)."""
    out = Replay()
    counts: dict[str, Counter] = {}
    trains: dict[int, dict[str, Any]] = {}  # seq -> train entry
    charged: dict[int, tuple[float, float, int]] = {}  # train seq -> (q, σ, steps) charged
    seen_n: dict[int, int] = {}
    over: set[str] = set()
    client, best = ledger.client, 0.0
    for e in ledger.entries:
        if e.get("_malformed"):
            continue
        seq, kind, touched = e["seq"], e["kind"], ()
        if kind == TRAIN:
            m = e["mechanism"]
            if again := sorted(c for c in e["cohorts"] if c in out.retired):
                if view == LOCAL:  # report once, not once per view
                    findings.append(
                        Finding(
                            "retired",
                            f"trains cohorts {again} in round {e['round']}, retired at seq "
                            f"{[out.retired[c] for c in again]}",
                            client,
                            seq,
                        )
                    )
            charge = (float(m["sample_rate"]), effective_sigma(m, view, None), int(m["steps"]))
            trains[seq], charged[seq] = e, charge
            for c in e["cohorts"]:
                counts.setdefault(c, Counter())[charge[:2]] += charge[2]
            touched = tuple(e["cohorts"])
        elif kind == SURVIVORS:
            t = e["train_seq"]
            if t not in trains or trains[t]["round"] != e["round"]:
                if view == LOCAL:
                    findings.append(
                        Finding(
                            "entry",
                            f"survivors refers to no train entry {t} of its round",
                            client,
                            seq,
                        )
                    )
                continue
            n = min(e["n"], seen_n.get(t, e["n"]))  # conflicting reports: the worse one
            seen_n[t] = n
            q, old, steps = charged[t]
            new = effective_sigma(trains[t]["mechanism"], view, n)
            if new != old:
                charged[t] = (q, new, steps)
                for c in trains[t]["cohorts"]:
                    counts[c][(q, old)] -= steps
                    counts[c][(q, new)] += steps
                touched = tuple(trains[t]["cohorts"])
        elif kind == RETIRE:
            _check_retire(e, view, counts, rec, findings, client)
            for c in e["cohorts"]:
                out.retired.setdefault(c, seq)
        for c in touched:
            key = key_of(counts[c])
            eps = rec.epsilon(key, delta)
            out.cohorts[c], out.epsilons[c] = key, eps
            best = max(best, eps)
            if (
                budget
                and view == budget.view
                and c not in over
                and eps > budget.epsilon * (1 + 1e-9)
            ):
                over.add(c)
                findings.append(
                    Finding(
                        "budget",
                        f"cohort {c} reached ε={eps:.4f} > budget {budget.epsilon:g} ({view}, "
                        f"δ={delta:g}) in round {e['round']}",
                        client,
                        seq,
                    )
                )
        if kind != RETIRE:
            out.series.append((int(e["round"]), best))
    return out


def _check_retire(
    e: dict[str, Any],
    view: str,
    counts: dict[str, Counter],
    rec: Recomputer,
    findings: list[Finding],
    client: str,
) -> None:
    """A retirement records each cohort's ε (the forecast that retired it): never below its
    spent ε at that moment, recomputed in the entry's own guarantee and δ."""
    if e["guarantee"] != view:
        return
    for c in e["cohorts"]:
        recorded = math.inf if e["epsilons"][c] == "inf" else float(e["epsilons"][c])
        spent = rec.epsilon(key_of(counts.get(c, Counter())), float(e["delta"]))
        if recorded < spent and not rdp_agrees(recorded, spent):
            findings.append(
                Finding(
                    "recompute",
                    f"retirement records ε={recorded:.6g} for cohort {c}, below its spent "
                    f"ε={spent:.6g} ({view})",
                    client,
                    e["seq"],
                )
            )


def run_delta(ledgers: list[Ledger]) -> float | None:
    """δ the devices targeted, as recorded in their mechanisms (None if none or several)."""
    found = {
        float(e["mechanism"]["delta"])
        for ledger in ledgers
        for e in ledger.entries
        if e.get("kind") == TRAIN and not e.get("_malformed")
    }
    return found.pop() if len(found) == 1 else None


def distributed_calibrated(ledgers: list[Ledger]) -> bool:
    """Whether the devices recorded a distributed calibration (K_min) at all."""
    return any(
        e.get("kind") == TRAIN and not e.get("_malformed") and e["mechanism"]["min_survivors"]
        for ledger in ledgers
        for e in ledger.entries
    )

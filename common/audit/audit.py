"""`audit(path)`: check every privacy claim of a run from its persisted records alone.

Records read: clients/*/ledger.jsonl (or one device's ledger.jsonl, or a folder of ledgers),
summary.json (claims, ledger head hashes), checkpoints/ (the server's user-level record) and
metrics.jsonl (per-round user-level ε). Everything is recomputed by `fedrec.common.audit`
code from the recorded parameters; fedrec's own accountant is never called.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common.audit.crosscheck import (
    budget_view,
    check_mechanisms,
    check_metrics_rows,
    check_participation,
    interactions,
    mechanism_key,
)
from fedrec.common.audit.ledgers import (
    DISTRIBUTED,
    LOCAL,
    Budget,
    Replay,
    distributed_calibrated,
    replay,
    run_delta,
)
from fedrec.common.audit.recompute import (
    ORDERS,
    PLD_REL_TOL,
    RDP_REL_TOL,
    AccountingConfig,
    Recomputer,
    pld_below,
    quantiles,
    rdp_agrees,
)
from fedrec.common.audit.records import (
    RETIRE,
    TRAIN,
    Finding,
    Ledger,
    RecordsError,
    load_ledgers,
    parse_heads,
    read_json,
)
from fedrec.common.audit.run_record import RunRecord, check_run_record, is_run_folder
from fedrec.common.audit.statement import USER, guarantee_kind, statements
from fedrec.common.audit.user_level import user_level


@dataclass(frozen=True)
class AuditOptions:
    epsilon: float | None = None  # per-interaction ε budget (default: summary.json's)
    budget_view: str | None = None  # "local" | "distributed" (default: from the run's DP mode)
    delta: float | None = None  # default: summary.json's, else the ledgers' recorded δ
    heads: Path | None = None  # summary.json or {client: head hash} JSON kept elsewhere
    accounting: AccountingConfig = field(default_factory=AccountingConfig)


@dataclass
class AuditResult:
    path: Path
    findings: list[Finding]
    notes: list[str]
    figures: dict[str, Any]
    # A run folder without summary.json (interrupted): it states no guarantee yet, so only its
    # ledgers are checked and the verdict is "unfinished" (exit 2: the records holding the
    # claims are missing), never "all claims hold"
    unfinished: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 2 if self.unfinished else 0


# where a run folder keeps its ledgers' head hashes (the file format is the interface: the
# audit imports nothing of the writer)
LEDGER_HEADS_FILE = "ledger_heads.json"


def _heads(root: Path, summary: dict | None, options: AuditOptions) -> tuple[dict, str]:
    if options.heads is not None:
        data = read_json(options.heads)
        if isinstance(data, dict) and "ledger_heads" in data:
            return parse_heads(data["ledger_heads"]), str(options.heads)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}, str(options.heads)
        raise RecordsError(f"{options.heads}: neither a summary nor a {{client: head}} map")
    if (root / LEDGER_HEADS_FILE).exists():
        data = read_json(root / LEDGER_HEADS_FILE)
        if not isinstance(data, dict):
            raise RecordsError(f"{root / LEDGER_HEADS_FILE}: not a {{client: head}} map")
        return {str(k): str(v) for k, v in data.items()}, str(root / LEDGER_HEADS_FILE)
    if summary is not None and "ledger_heads" in summary:  # runs written before that file
        return parse_heads(summary["ledger_heads"]), str(root / "summary.json")
    return {}, ""


def audit(path: str | Path, options: AuditOptions | None = None) -> AuditResult:
    """Run every check. RecordsError (exit 2) if a needed record is missing or unreadable."""
    options = options or AuditOptions()
    started = time.perf_counter()
    root = Path(path)
    if not root.is_dir():
        raise RecordsError(f"{root}: not a folder (a run, a device's store, or ledgers)")
    _check_options(options)
    summary = read_json(root / "summary.json") if (root / "summary.json").exists() else None
    if summary is not None and not isinstance(summary, dict):
        raise RecordsError(f"{root / 'summary.json'}: not a JSON object")
    privacy = (summary or {}).get("privacy", {})
    notes: list[str] = []
    run_findings: list[Finding] = []
    run: RunRecord | None = None
    unfinished = _unfinished(root) if summary is None and is_run_folder(root) else None
    if unfinished is not None:
        notes.append(unfinished)
    elif is_run_folder(root):
        run = check_run_record(root, run_findings, notes)
    heads, source = _heads(root, summary, options)
    if not heads and run is None:
        notes.append(
            "no recorded head hashes: truncation of whole trailing entries is not detectable"
        )
    ledgers = load_ledgers(root, heads, source)
    findings = [f for ledger in ledgers for f in ledger.findings] + run_findings
    notes += [n for ledger in ledgers for n in ledger.notes]
    cross: dict[str, Any] = {}
    if run is not None:
        cross["mechanism_entries_checked"] = check_mechanisms(ledgers, run, findings)
        cross |= check_participation(root, ledgers, run, findings)
        check_metrics_rows(run, findings)

    delta = options.delta or privacy.get("delta") or run_delta(ledgers)
    if not delta:
        raise RecordsError(
            f"{root}: no δ recorded (summary.json or ledger mechanisms): pass --delta"
        )
    calibrated = distributed_calibrated(ledgers)
    views = [LOCAL, DISTRIBUTED] if calibrated else [LOCAL]
    budget = _budget(options, summary, ledgers, calibrated, notes, run)

    rec = Recomputer(options.accounting)
    replays: dict[str, dict[str, Replay]] = {}
    for ledger in ledgers:
        replays[ledger.client] = {v: replay(ledger, v, delta, rec, budget, findings) for v in views}
    per_view = {v: _view_figures(v, ledgers, replays, rec, delta, findings) for v in views}
    if budget is not None and budget.view in per_view:
        left = [
            max(0.0, budget.epsilon - e)
            for r in replays.values()
            for e in r[budget.view].epsilons.values()
        ]
        per_view[budget.view]["remaining_budget"] = quantiles(left)

    figures: dict[str, Any] = {
        "path": str(root),
        "delta": delta,
        "budget": None if budget is None else {"epsilon": budget.epsilon, "view": budget.view},
        "accountant": {
            "rdp": "dp_accounting RdpAccountant (integer orders) + numerical integration "
            "(fractional orders), add/remove-one, conversion of Balle et al. 2020; discrete "
            "Gaussian (secagg) entries: fedrec's ddg_accounting (Kairouz et al. 2021, Zhu & "
            "Wang 2019), parameters re-derived from config.json, no PLD bound",
            "orders": list(ORDERS),
            "pld": f"dp_accounting PLDAccountant, pessimistic, interval {rec.config.pld_interval:g}"
            if rec.config.pld
            else "off",
            "rdp_rel_tol": RDP_REL_TOL,
            "pld_rel_tol": PLD_REL_TOL,
        },
        "ledgers": _ledger_figures(ledgers, replays, views),
        "views": per_view,
        "mechanisms": _mechanisms(ledgers),
    }
    if summary is not None:
        figures["reported"] = _compare_reported(privacy, per_view, budget, findings)
        figures["user_level"] = user_level(root, summary, rec, findings, notes, run)
        figures["deltas"] = _check_deltas(summary, run, ledgers, figures, findings)
    if run is not None:
        figures["run_record"] = {
            "committed_round": run.latest,
            "checkpoints": run.checkpoints,
            "participation_rounds": len(run.participation),
            **cross,
        }
    figures["guarantees"] = statements(summary, figures, per_view)
    figures["clients"] = _clients(ledgers, replays, views, rec, delta)
    figures["seconds"] = time.perf_counter() - started
    figures["distinct_histories"] = rec.distinct()
    return AuditResult(root, findings, notes, figures, unfinished)


def _check_options(options: AuditOptions) -> None:
    """A budget or δ given on the command line must be a number that can bound anything."""
    if options.epsilon is not None and not (math.isfinite(options.epsilon) and options.epsilon > 0):
        raise RecordsError(f"--epsilon {options.epsilon}: must be a finite number > 0")
    if options.delta is not None and not (0 < options.delta < 1):
        raise RecordsError(f"--delta {options.delta}: must be in (0, 1)")


def _unfinished(root: Path) -> str:
    """Why a run folder without summary.json is not audited: its claims are not written yet."""
    committed = "no round committed"
    try:
        committed = f"round {read_json(root / 'checkpoints' / 'latest.json')['round']} committed"
    except (RecordsError, KeyError, TypeError):
        pass
    return (
        f"{root}: an unfinished run (no summary.json; {committed}): it states no guarantee "
        "yet, so only its ledgers were checked; finish it "
        f"(`fedrec simulate --resume --out {root}`) to audit its claims"
    )


def _budget(options, summary, ledgers, calibrated, notes, run=None) -> Budget | None:
    """The per-interaction budget and the view it is held in.

    The view: --guarantee; else the guarantee the devices' own retirements name; else the run's
    DP mode (distributed unless a local user vector voids it, as fedrec decides); else, for bare
    ledgers, distributed iff the devices recorded a K_min. The budget: --epsilon; else the
    strictest the run ever had (config.json and every checkpoint's configuration: a budget
    raised on --resume does not raise it) and summary.json's."""
    privacy = (summary or {}).get("privacy", {})
    eps = options.epsilon if options.epsilon is not None else privacy.get("budget_epsilon")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise RecordsError(f"summary.json: budget_epsilon {eps!r} is not a finite number > 0")
    if options.epsilon is None and run is not None:
        strictest = run.strictest("epsilon")
        if strictest is not None and (eps is None or strictest < eps):
            eps = strictest
    named = {
        e["guarantee"]
        for ledger in ledgers
        for e in ledger.entries
        if e.get("kind") == RETIRE and not e.get("_malformed")
    }
    view = options.budget_view
    if view is None and len(named) == 1:
        view = named.pop()
    elif view is None and run is not None:
        view = budget_view(run.config_at(1))
    elif view is None and summary is not None:
        mode = summary.get("dp", {}).get("mode", "")
        user_vector = bool(summary.get("config", {}).get("model-user-embedding", False))
        if "distributed" in mode and not user_vector:
            view = DISTRIBUTED
        elif "distributed" in mode or "local" in mode:
            view = LOCAL
    elif view is None:
        view = DISTRIBUTED if calibrated else LOCAL
    if len(named) > 1:
        notes.append(f"retirements name several guarantees {sorted(named)}: budget in {view}")
    if eps is None or view is None:
        notes.append("no per-interaction budget recorded or given (--epsilon): budgets not checked")
        return None
    return Budget(float(eps), view)


def _view_figures(view, ledgers, replays, rec, delta, findings) -> dict[str, Any]:
    """ε of every cohort in one view; RDP ≥ PLD for every distinct history."""
    eps = [e for c in replays.values() for e in c[view].epsilons.values()]
    steps = [sum(n for _, _, n in k) for c in replays.values() for k in c[view].cohorts.values()]
    keys = {k for c in replays.values() for k in c[view].cohorts.values()}
    worst_pld: float | None = 0.0 if rec.config.pld else None
    for key in keys:
        rdp, pld = rec.epsilon(key, delta), rec.epsilon_pld(key, delta)
        if pld is None:  # a discrete Gaussian's history: no PLD bound, so no maximum either
            worst_pld = None
        elif worst_pld is not None and not math.isinf(pld):
            worst_pld = max(worst_pld, pld)
        if not pld_below(rdp, pld):
            findings.append(
                Finding("recompute", f"{view}: RDP ε {rdp} below the PLD ε {pld} of history {key}")
            )
    return {
        "epsilon_rdp": quantiles(eps),
        "max_epsilon_rdp": max(eps, default=0.0),
        "max_epsilon_pld": worst_pld,
        "distinct_histories": len(keys),
        "steps": quantiles(steps),
        "remaining_budget": None,
    }


def _ledger_figures(ledgers: list[Ledger], replays, views) -> dict[str, Any]:
    kinds = Counter(e.get("kind") for ledger in ledgers for e in ledger.entries)
    return {
        "count": len(ledgers),
        "entries": sum(kinds.values()),
        "entries_by_kind": dict(kinds),
        "cohorts": sum(len(r[views[0]].epsilons) for r in replays.values()),
        "retired_cohorts": sum(len(r[views[0]].retired) for r in replays.values()),
        "broken_chains": sorted({f.client for ledger in ledgers for f in ledger.findings}),
    }


def _mechanisms(ledgers: list[Ledger]) -> list[dict[str, Any]]:
    """The distinct recorded device mechanisms and how many train entries used each."""
    seen: Counter = Counter()
    for ledger in ledgers:
        for e in ledger.entries:
            if e.get("kind") == TRAIN and not e.get("_malformed"):
                seen[mechanism_key(e["mechanism"])] += 1
    return [
        {k: dict(v) if isinstance(v, tuple) else v for k, v in m} | {"train_entries": n}
        for m, n in seen.most_common()
    ]


def _clients(ledgers, replays, views, rec, delta) -> list[dict[str, Any]]:
    out = []
    for ledger in ledgers:
        row: dict[str, Any] = {
            "client": ledger.client,
            "entries": len(ledger.entries),
            "head": ledger.head,
            "chain_ok": not any(f.check == "chain" for f in ledger.findings),
        }
        for v in views:
            r = replays[ledger.client][v]
            row[f"epsilon_{v}"] = max(r.epsilons.values(), default=0.0)
            pld = [rec.epsilon_pld(k, delta) for k in r.cohorts.values()]
            row[f"epsilon_{v}_pld"] = max((p for p in pld if p is not None), default=None)
            row[f"series_{v}"] = r.series
        row["retired"] = sorted(replays[ledger.client][views[0]].retired)
        row["cohorts"] = {
            c: {v: replays[ledger.client][v].epsilons[c] for v in views}
            for c in replays[ledger.client][views[0]].epsilons
        }
        out.append(row)
    return out


def _compare_reported(privacy, per_view, budget, findings) -> list[dict[str, Any]]:
    """The per-interaction figures summary.json reports, against the recomputation."""
    rows = []
    claims = [("max_interaction_epsilon_local", LOCAL)]
    if budget is not None:
        claims.append(("max_interaction_epsilon", budget.view))
    for name, view in claims:
        if name not in privacy or view not in per_view:
            continue
        rows.append(_compare(name, float(privacy[name]), per_view[view], findings))
    for g in privacy.get("guarantees", []):
        view = guarantee_kind(g)
        if view in per_view and g.get("epsilon") is not None:  # None: stated as not claimed
            rows.append(
                _compare(f"guarantee: {g['name']}", float(g["epsilon"]), per_view[view], findings)
            )
    return rows


def _compare(name, reported, figures, findings) -> dict[str, Any]:
    rdp, pld = figures["max_epsilon_rdp"], figures["max_epsilon_pld"]
    row = {"claim": name, "reported": reported, "recomputed_rdp": rdp, "recomputed_pld": pld}
    row["agrees"] = rdp_agrees(reported, rdp)
    row["above_pld"] = pld_below(reported, pld)
    if not row["agrees"]:
        findings.append(Finding("recompute", f"{name}: reported ε={reported} != recomputed {rdp}"))
    if not row["above_pld"]:
        findings.append(Finding("recompute", f"{name}: reported ε={reported} < PLD ε {pld}"))
    return row


def _check_deltas(summary, run, ledgers, figures, findings) -> list[dict[str, Any]]:
    """A guarantee stated as held must have a δ that means something: finite ε, δ at most the
    run's target δ (the strictest it had), and δ < 1/N, N the units it protects (registered
    devices for user-level DP, interactions trained on for per-interaction DP). A void one
    (δ=1 when every round was discarded, ε=inf) stated as held is a violation."""
    privacy = summary.get("privacy", {})
    target = run.strictest("delta") if run is not None else privacy.get("delta")
    user = figures.get("user_level") or {}
    registered = user.get("registered")
    if registered is None:
        q = summary.get("dp", {}).get("client_sample_rate")
        expected = summary.get("config", {}).get("clients-per-round")
        if q and expected and q < 1:
            registered = round(float(expected) / float(q))
    count = interactions(ledgers)
    out = []
    for g in privacy.get("guarantees", []):
        if g.get("earned") is False or g.get("epsilon") is None:
            continue  # stated as not held
        name, eps, delta = g.get("name"), g.get("epsilon"), g.get("delta")
        n = registered if guarantee_kind(g) == USER else count
        row = {"name": name, "delta": delta, "target_delta": target, "units": n}
        out.append(row)
        real = all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in (eps, delta)
        )
        if not real or not 0 < delta < 1:
            findings.append(
                Finding("guarantee", f"{name}: stated as held with a void ε={eps}, δ={delta}")
            )
            continue
        if target is not None and delta > float(target) * (1 + 1e-12):
            findings.append(
                Finding(
                    "guarantee",
                    f"{name}: stated as held with δ={delta:.6g} above the run's target "
                    f"δ={float(target):g}",
                )
            )
        if n and delta >= 1.0 / n:
            findings.append(
                Finding(
                    "guarantee",
                    f"{name}: δ={delta:.6g} is not below 1/N = 1/{n} (N: "
                    f"{'registered devices' if guarantee_kind(g) == USER else 'interactions'}):"
                    " such a δ allows releasing one unit's data outright",
                )
            )
    return out

"""`fedrec audit`: tamper evidence, recomputation on honest records, crafted violations, exit
codes and report files. Honest records are written by fedrec's own code (ledger, accountant,
checkpoint); the audit must agree with them without calling that code."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.client.ledger import PrivacyLedger
from fedrec.common.audit import AuditOptions, RecordsError, audit
from fedrec.common.audit.records import canonical, entry_hash
from fedrec.common.audit.report import PLOTS, write_report
from fedrec.common.privacy.accounting import Guarantee, Mechanism

DELTA, BUDGET, ROUNDS = 1e-5, 8.0, 4
MECH = Mechanism(
    noise_multiplier=0.5,
    sample_rate=0.5,
    steps=4,
    clip_norm=1.0,
    delta=DELTA,
    aggregate_noise_multiplier=1.5,
    min_survivors=9,
)


def write_ledger(folder: Path, client: int, late_round: int = 1) -> str:
    """A lifelong device: a new cohort each round, old ones trained until their ε would pass
    the budget (planned and retired as the device does); client 0 gets a round of 4 < K_min
    survivors (in `late_round`). Returns the head hash."""
    clock = iter(range(10_000))
    with PrivacyLedger.open(folder / "ledger.jsonl", fsync=False, clock=lambda: next(clock)) as lg:
        cohorts: list[str] = []
        for r in range(1, ROUNDS + 1):
            cohorts.append(f"w{r:04d}")
            live = [c for c in cohorts if c not in lg.retired_cohorts()]
            trainable, retire = lg.plan(MECH, live, BUDGET, Guarantee.DISTRIBUTED, DELTA)
            if retire:
                lg.append_retire(r, retire, "budget", retire, guarantee=Guarantee.DISTRIBUTED,
                                 delta=DELTA)  # fmt: skip
            if trainable:
                lg.append_train(r, MECH, {c: 2 + client for c in trainable})
                if client == 0 and r == late_round:
                    lg.append_survivors(r, 4)
        return lg.head_hash


def honest_run(root: Path, clients: int = 5) -> Path:
    """Ledgers as a run's devices write them, with a summary.json of their claims and head
    hashes (no server records: those are checked on real runs in test_audit_run.py)."""
    heads, eps_d, eps_l = [], [], []
    for c in range(clients):
        folder = root / "clients" / str(c)
        heads.append(f"{c}:{write_ledger(folder, c)}")
        with PrivacyLedger.open(folder / "ledger.jsonl", fsync=False) as lg:
            eps_d += lg.epsilons(Guarantee.DISTRIBUTED, DELTA).values()
            eps_l += lg.epsilons(Guarantee.LOCAL, DELTA).values()
    summary = {
        "rounds": ROUNDS,
        "dp": {"mode": "distributed"},
        "privacy": {
            "budget_epsilon": BUDGET,
            "delta": DELTA,
            "max_interaction_epsilon": max(eps_d),
            "max_interaction_epsilon_local": max(eps_l),
            "guarantees": [
                {
                    "name": "per-interaction DP against the server, with secure aggregation",
                    "epsilon": max(eps_d),
                    "delta": DELTA,
                    "earned": False,
                    "why_not": "stated",
                },
                {
                    "name": "per-interaction local DP (the device's own noise only)",
                    "epsilon": max(eps_l),
                    "delta": DELTA,
                },
            ],
        },
        "ledger_heads": heads,
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return honest_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def lines(root: Path, client: str = "1") -> list[dict]:
    folder = root / "clients" / client if (root / "clients").is_dir() else root / client
    return [json.loads(x) for x in (folder / "ledger.jsonl").read_text().splitlines()]


def write_lines(root: Path, entries: list[dict], client: str = "1", rehash_from: int | None = None):
    if rehash_from is not None:  # a forger who rewrites every later hash
        for i in range(rehash_from, len(entries)):
            entries[i]["prev_hash"] = entries[i - 1]["hash"] if i else "0" * 64
            entries[i]["hash"] = entry_hash(entries[i])
    text = "".join(canonical(e) + "\n" for e in entries)
    (root / "clients" / client / "ledger.jsonl").write_text(text)


def where(result) -> set[tuple]:
    return {(f.check, f.client, f.seq) for f in result.findings}


def test_honest_run_passes_and_recomputation_agrees(run_dir):
    result = audit(run_dir)
    assert result.findings == [] and result.exit_code == 0
    for row in result.figures["reported"]:
        assert row["agrees"] and row["above_pld"], row
        assert math.isclose(row["reported"], row["recomputed_rdp"], rel_tol=1e-9)
        assert row["recomputed_pld"] < row["recomputed_rdp"]
    kinds = {g["kind"]: g for g in result.figures["guarantees"]}
    assert set(kinds) == {"local", "distributed"}
    assert kinds["distributed"]["earned"] is False and kinds["distributed"]["budget"] == BUDGET
    for g in kinds.values():
        assert g["unit"] and g["adjacency"] and g["threat_model"] and g["accountant"]
    # the round with 4 < K_min survivors is charged at σ·√4, above the other clients
    client0 = next(c for c in result.figures["clients"] if c["client"] == "0")
    client1 = next(c for c in result.figures["clients"] if c["client"] == "1")
    assert client0["cohorts"]["w0001"]["distributed"] > client1["cohorts"]["w0001"]["distributed"]


def test_few_survivors_acknowledged_late_push_past_the_budget(tmp_path):
    """4 < K_min survivors reported after cohorts were planned at K_min: the survivors entry
    that pushed them past the budget is named."""
    write_ledger(tmp_path, 0, late_round=2)
    result = audit(tmp_path, AuditOptions(epsilon=BUDGET))
    survivors = next(e for e in lines(tmp_path.parent, tmp_path.name) if e["kind"] == "survivors")
    found = [f for f in result.findings if f.check == "budget"]
    assert found and {f.seq for f in found} == {survivors["seq"]}


def _edit(entries):
    entries[1]["mechanism"]["steps"] = 1  # hash left as it was
    return entries, 1, None


def _edit_rehash_one(entries):
    entries[1]["mechanism"]["steps"] = 1
    entries[1]["hash"] = entry_hash(entries[1])
    return entries, 2, None  # the next entry no longer links


def _edit_rehash_all(entries):
    entries[1]["mechanism"]["steps"] = 1
    return entries, len(entries) - 1, 1  # only the recorded head shows it


def _delete(entries):
    del entries[1]
    return entries, 2, None


def _reorder(entries):
    entries[1], entries[2] = entries[2], entries[1]
    return entries, 2, None


def _truncate(entries):
    return entries[:-1], len(entries) - 2, None


def _insert(entries):
    fake = dict(entries[1], round=99)
    fake["hash"] = entry_hash(fake)
    return [*entries[:2], fake, *entries[2:]], 1, None


def _append(entries):
    extra = dict(entries[-1], seq=len(entries), prev_hash=entries[-1]["hash"], round=99)
    extra["hash"] = entry_hash(extra)
    return [*entries, extra], len(entries), None


@pytest.mark.parametrize(
    "tamper",
    [_edit, _edit_rehash_one, _edit_rehash_all, _delete, _reorder, _truncate, _insert, _append],
)
def test_each_kind_of_tampering_is_detected_and_named(copy, tamper):
    entries, seq, rehash_from = tamper(lines(copy))
    write_lines(copy, entries, rehash_from=rehash_from)
    result = audit(copy)
    assert result.exit_code == 1
    assert ("chain", "1", seq) in where(result), [f.line() for f in result.findings]
    assert all(f.client == "1" for f in result.findings if f.check == "chain")


def test_a_deleted_ledger_is_missing_records(copy):
    shutil.rmtree(copy / "clients" / "3")
    with pytest.raises(RecordsError, match=r"clients/3/ledger\.jsonl"):
        audit(copy)


def _forge(entries: list[dict]) -> list[dict]:
    out = []
    for i, e in enumerate(entries):
        e = {
            "v": 1,
            "seq": i,
            "time": float(i),
            "prev_hash": out[-1]["hash"] if out else "0" * 64,
            **e,
        }
        e["hash"] = entry_hash(e)
        out.append(e)
    return out


def test_overspending_ledger_is_caught(tmp_path):
    """A crafted ledger that trains one cohort well past the budget, with a valid chain."""
    mech = MECH.to_dict()
    entries = _forge([{"kind": "train", "round": r, "mechanism": mech, "cohorts": {"w0001": 3}}
                      for r in range(1, 8)])  # fmt: skip
    (tmp_path / "ledger.jsonl").write_text("".join(canonical(e) + "\n" for e in entries))
    result = audit(tmp_path, AuditOptions(epsilon=BUDGET))
    budget = [f for f in result.findings if f.check == "budget"]
    assert len(budget) == 1 and budget[0].client == tmp_path.name
    # named by the entry that crossed the budget: recompute which one it is
    assert 0 < budget[0].seq < 7 and "w0001" in budget[0].what
    assert audit(tmp_path, AuditOptions(epsilon=1e6)).findings == []


def test_retired_interaction_reused_is_caught(tmp_path):
    mech = MECH.to_dict()
    entries = _forge([
        {"kind": "train", "round": 1, "mechanism": mech, "cohorts": {"w0001": 3}},
        {"kind": "retire", "round": 2, "cohorts": ["w0001"], "reason": "budget",
         "guarantee": "distributed", "delta": DELTA, "epsilons": {"w0001": 9.0}},
        {"kind": "train", "round": 2, "mechanism": mech, "cohorts": {"w0001": 3, "w0002": 1}},
    ])  # fmt: skip
    (tmp_path / "ledger.jsonl").write_text("".join(canonical(e) + "\n" for e in entries))
    result = audit(tmp_path)
    assert [(f.check, f.seq) for f in result.findings] == [("retired", 2)]


def test_retirement_recording_less_than_spent_is_caught(tmp_path):
    mech = MECH.to_dict()
    entries = _forge([
        {"kind": "train", "round": 1, "mechanism": mech, "cohorts": {"w0001": 3}},
        {"kind": "retire", "round": 2, "cohorts": ["w0001"], "reason": "budget",
         "guarantee": "distributed", "delta": DELTA, "epsilons": {"w0001": 0.5}},
    ])  # fmt: skip
    (tmp_path / "ledger.jsonl").write_text("".join(canonical(e) + "\n" for e in entries))
    assert [(f.check, f.seq) for f in audit(tmp_path).findings] == [("recompute", 1)]


def test_misreported_summary_is_caught(copy):
    summary = json.loads((copy / "summary.json").read_text())
    summary["privacy"]["max_interaction_epsilon"] *= 0.9
    (copy / "summary.json").write_text(json.dumps(summary))
    whats = " ".join(f.what for f in audit(copy).findings)
    assert "max_interaction_epsilon" in whats


def test_cli_exit_codes_and_report_files(run_dir, copy, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", str(run_dir), "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    for name in ("audit.md", "audit.json", *PLOTS):
        assert (tmp_path / "ok" / name).stat().st_size > 0
    data = json.loads((tmp_path / "ok" / "audit.json").read_text())
    assert data["exit_code"] == 0 and data["violations"] == []
    text = (tmp_path / "ok" / "audit.md").read_text()
    for word in ("unit", "adjacency", "accountant", "delta", "sampling", "clip norm", "budget"):
        assert word in text

    entries, _, _ = _delete(lines(copy))
    write_lines(copy, entries)
    bad = runner.invoke(app, ["audit", str(copy), "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "client 1" in bad.output

    (copy / "summary.json").write_text("{not json")
    assert runner.invoke(app, ["audit", str(copy)]).exit_code == 2
    assert runner.invoke(app, ["audit", str(tmp_path / "nowhere")]).exit_code == 2


def test_device_store_folder_and_torn_tail(run_dir, tmp_path):
    folder = Path(shutil.copytree(run_dir / "clients" / "2", tmp_path / "device"))
    with open(folder / "ledger.jsonl", "a") as f:
        f.write('{"cohorts":{"w0009"')  # a crash mid-append: never acknowledged
    result = audit(folder, AuditOptions(epsilon=BUDGET))
    assert result.exit_code == 0 and any("torn" in n for n in result.notes)
    assert write_report(result, tmp_path / "report")[0].exists()


def test_report_states_the_empirical_bound_beside_the_analytic(run_dir, tmp_path):
    row = {"epsilon_lower_bound": 0.0, "confidence": 0.95, "guesses": 40, "correct": 21}
    empirical = {
        "dp": row | {"dp": "local", "canaries": 200, "analytic_epsilon": 7.41},
        "control": row | {"dp": "off", "canaries": 200, "analytic_epsilon": math.inf},
    }
    write_report(audit(run_dir), tmp_path, empirical)
    text = (tmp_path / "audit.md").read_text()
    assert "Empirical audit" in text and "| control | off |" in text
    assert json.loads((tmp_path / "audit.json").read_text())["empirical"]["control"]["dp"] == "off"


def test_heads_kept_elsewhere_catch_truncation_of_a_folder_of_ledgers(run_dir, tmp_path):
    folder = Path(shutil.copytree(run_dir / "clients", tmp_path / "ledgers"))
    entries = lines(tmp_path, "ledgers/1")
    (folder / "1" / "ledger.jsonl").write_text("".join(canonical(e) + "\n" for e in entries[:-1]))
    assert audit(folder).exit_code == 0  # a clean cut leaves a valid chain
    found = audit(folder, AuditOptions(heads=run_dir / "summary.json")).findings
    assert [(f.check, f.client) for f in found] == [("chain", "1")]

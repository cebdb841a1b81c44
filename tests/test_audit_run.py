"""`fedrec audit` on real run folders: every check has a negative control (a tampered copy of
an honest run exits 1 and names what was tampered with) and every calibration's honest run
passes. The runs are small in-process simulations (`run_in_process` + `finalize`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.common.audit import audit
from fedrec.common.audit.records import canonical, entry_hash
from fedrec.common.run_config import SimulationConfig
from fedrec.server.federated_run import FederatedRun
from fedrec.server.run_record import record_attempt
from fedrec.server.secure_aggregation import secure_sum
from fedrec.simulations.devices import device_reply, run_in_process
from fedrec.simulations.report import finalize

# q = 1 (every device every round): no round can fall below K_min, so no discard δ
TINY = {
    "dataset": "synthetic",
    "synthetic": "num_users=20,num_items=40,seed=1",
    "clients-per-round": 20,
    "num-negatives": 10,
    "min-survivors": 2,
}


def tiny(out: Path, dp: str, rounds: int = 2, **more) -> SimulationConfig:
    return SimulationConfig.from_flat({**TINY, "rounds": rounds, "dp": dp, "out": str(out), **more})


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """The default calibration (user+distributed), three rounds."""
    out = tmp_path_factory.mktemp("honest") / "run"
    finalize(run_in_process(tiny(out, "user+distributed", rounds=3)))
    return out


@pytest.fixture
def copy(honest, tmp_path) -> Path:
    return Path(shutil.copytree(honest, tmp_path / "run"))


def findings(root: Path, **kw) -> list[str]:
    result = audit(root, **kw)
    assert result.exit_code == (1 if result.findings else 0)
    return [f.line() for f in result.findings]


def ledger(root: Path, client: str) -> list[dict]:
    text = (root / "clients" / client / "ledger.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def rewrite_ledger(root: Path, client: str, entries: list[dict]) -> None:
    """A forger's ledger: renumbered, every hash recomputed, and the head ledger_heads.json
    records updated to match (so the chain and the recorded head agree)."""
    for i, e in enumerate(entries):
        e["seq"] = i
        e["prev_hash"] = entries[i - 1]["hash"] if i else "0" * 64
        e["hash"] = entry_hash(e)
    path = root / "clients" / client / "ledger.jsonl"
    path.write_text("".join(canonical(e) + "\n" for e in entries))
    heads = json.loads((root / "ledger_heads.json").read_text())
    heads[client] = entries[-1]["hash"] if entries else "0" * 64
    (root / "ledger_heads.json").write_text(json.dumps(heads))


def test_the_honest_run_passes_every_check(honest):
    result = audit(honest)
    assert result.findings == [], [f.line() for f in result.findings]
    record = result.figures["run_record"]
    assert record["committed_round"] == 3 and record["participation_rounds"] == 3
    assert record["commitments_checked"] == 60 and record["mechanism_entries_checked"] > 0
    assert all(row["target_delta"] == 1e-5 and row["units"] > 0 for row in result.figures["deltas"])
    for g in result.figures["guarantees"]:
        want = "zero-out" if g["kind"] == "user" else "add/remove"
        assert g["adjacency"].startswith(want), g


def test_the_participation_record_commits_to_every_sampled_devices_ledger(honest):
    from fedrec.common.audit.crosscheck import commitment

    rows = [json.loads(x) for x in (honest / "participation.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    key = (honest / "clients" / "commit.key").read_bytes()
    for r in rows:
        assert r["registered"] == 20 and len(r["devices"]) == 20 and r["discarded"] is False
        assert all(len(c) == 16 for c in r["devices"].values())
    # every device commits every round, so a commitment does not say whether it trained
    last = rows[-1]
    for name, commit in last["devices"].items():
        entries = (
            ledger(honest, name) if (honest / "clients" / name / "ledger.jsonl").exists() else []
        )
        head = entries[-1]["hash"] if entries else "0" * 64
        assert commitment(key, name, 3, head) == commit
    assert len({c for r in rows for c in r["devices"].values()}) == 60  # all distinct


def test_consistently_doubled_device_sigma_is_caught(copy):
    """Every train entry of every ledger edited to twice the σ, each chain re-hashed and
    summary.json's heads updated: the mechanism no longer is the configuration's."""
    for folder in sorted(p for p in (copy / "clients").iterdir() if p.is_dir()):
        entries = ledger(copy, folder.name)
        for e in entries:
            if e["kind"] == "train":
                e["mechanism"]["noise_multiplier"] *= 2
        if entries:
            rewrite_ledger(copy, folder.name, entries)
    found = findings(copy)
    assert any("[mechanism]" in f and "σ on the device" in f for f in found), found


def test_consistently_deleted_train_and_retire_pair_is_caught(copy):
    """A train entry and the retirement after it deleted, the chain re-hashed and the head
    in summary.json updated: the head the device reported to the server is gone."""
    for folder in sorted(p for p in (copy / "clients").iterdir() if p.is_dir()):
        entries = ledger(copy, folder.name)
        pair = next(
            (i for i in range(len(entries) - 1) if entries[i]["kind"] == "train"
             and entries[i + 1]["kind"] == "retire"),
            None,
        )  # fmt: skip
        if pair is not None:
            break
    else:
        pytest.fail("no device trained and then retired in the honest run")
    client = folder.name
    del entries[pair : pair + 2]
    rewrite_ledger(copy, client, entries)
    found = findings(copy)
    assert any("[participation]" in f and f"client {client}" in f for f in found), found
    assert not any("[chain]" in f for f in found)  # the forgery is a valid chain


def test_a_deleted_middle_checkpoint_is_caught(copy):
    (copy / "checkpoints" / "round-0002.npz").unlink()
    assert any("round-0002.npz is missing" in f for f in findings(copy))


def test_a_replaced_middle_checkpoint_is_caught(copy):
    shutil.copy(copy / "checkpoints" / "round-0001.npz", copy / "checkpoints" / "round-0002.npz")
    found = findings(copy)
    assert any("round-0002.npz" in f and "[record]" in f for f in found), found


def test_a_deleted_metrics_row_is_caught(copy):
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(lines[:1] + lines[2:]))
    assert any("metrics.jsonl" in f and "[record]" in f for f in findings(copy))


def test_a_deleted_last_participation_row_is_caught(copy):
    lines = (copy / "participation.jsonl").read_text().splitlines(keepends=True)
    (copy / "participation.jsonl").write_text("".join(lines[:-1]))
    assert any("participation.jsonl has 2 rows" in f for f in findings(copy))


def test_an_edited_config_budget_is_caught(copy):
    config = json.loads((copy / "config.json").read_text())
    config["epsilon"] = 1000.0
    (copy / "config.json").write_text(json.dumps(config))
    found = findings(copy)
    assert any("[config]" in f and "epsilon 8.0 -> 1000.0" in f for f in found), found


def test_a_flipped_byte_in_the_latest_model_is_caught(copy):
    path = copy / "checkpoints" / "round-0003.npz"
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.startswith("params/"))
    data = bytearray(path.read_bytes())
    # local header (30 bytes + name + extra), then the .npy header (128 bytes), then data
    name_len, extra_len = (int.from_bytes(data[info.header_offset + k : info.header_offset + k + 2],
                                          "little") for k in (26, 28))  # fmt: skip
    at = info.header_offset + 30 + name_len + extra_len + 128 + 5
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    found = findings(copy)
    assert any("round-0003.npz" in f and "model" in f for f in found), found


def test_a_rewritten_model_with_valid_zip_is_caught(copy):
    """A forger who rewrites the latest checkpoint's model (valid CRCs, metadata kept)."""
    path = copy / "checkpoints" / "round-0003.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    name = next(k for k in arrays if k.startswith("params/"))
    arrays[name] = arrays[name] + np.float32(0.01)
    np.savez(path, **arrays)
    assert any("not the one the round recorded" in f for f in findings(copy))


def test_a_budget_raised_on_resume_is_caught(tmp_path):
    """Stopped after round 1, resumed with --epsilon 1000 (fedrec refuses that, so the operator
    edited config.json to get past the refusal): every setting that changed within the run
    is named, and budgets are held to the strictest the run had."""
    config = tiny(tmp_path / "run", "distributed", rounds=2)
    run = FederatedRun(config)
    replies = [device_reply(config, int(u), 1, run.params) for u in run.sample(1)]
    run.finish_round(1, secure_sum(replies, run.params), 0.0)
    resumed = dataclasses.replace(config, resume=True, epsilon=1000.0)
    with pytest.raises(ValueError, match="epsilon"):
        FederatedRun(resumed)
    (tmp_path / "run" / "config.json").write_text(json.dumps(resumed.to_flat()))
    finalize(run_in_process(resumed))
    result = audit(tmp_path / "run")
    found = [f.line() for f in result.findings]
    assert any("changed within the run, from round 2: epsilon 8.0 -> 1000.0" in f for f in found)
    assert result.figures["budget"]["epsilon"] == 8.0


def test_a_round_cut_short_by_a_crash_and_run_again_passes(tmp_path):
    """Killed during round 2: every device the lost attempt asked trained and charged its
    ledger for round 2; the resumed run sampled round 2 afresh (q = 0.5) and left some of them
    out. Their entries belong to an attempt the server recorded before asking (attempts.jsonl),
    so the audit passes; without that record it named each as "a round in which the server did
    not sample this device" (faults benchmark: every resumed run failed its audit)."""
    config = tiny(tmp_path / "run", "local", rounds=2, **{"clients-per-round": 10})
    run = FederatedRun(config)
    replies = [device_reply(config, int(u), 1, run.params) for u in run.begin_round(1)]
    run.finish_round(1, replies, 0.0)
    record_attempt(run.out, 2, [run.device_name(int(u)) for u in run.registered])
    for user in run.registered:  # the devices train; the server dies before it aggregates
        device_reply(config, int(user), 2, run.params)
    finalize(run_in_process(dataclasses.replace(config, resume=True)))
    result = audit(tmp_path / "run")
    assert result.findings == [], [f.line() for f in result.findings]
    assert result.figures["run_record"]["entries_of_interrupted_attempts"] > 0
    (tmp_path / "run" / "attempts.jsonl").unlink()
    assert any("the server did not sample this device" in f for f in findings(tmp_path / "run"))


@pytest.mark.parametrize("budget", ["nan", "-1", "inf", "0"])
def test_a_budget_that_bounds_nothing_is_refused(honest, budget):
    out = CliRunner().invoke(app, ["audit", str(honest), "--epsilon", budget])
    assert out.exit_code == 2 and "--epsilon" in out.output, out.output


def test_an_unfinished_run_is_reported_as_such(copy):
    """No summary.json: its ledgers are checked (not its logs, as if they were ledgers), and
    the verdict is "unfinished", exit 2, never "all claims hold"."""
    (copy / "summary.json").unlink()
    result = audit(copy)
    assert result.unfinished and result.findings == [] and result.exit_code == 2
    assert result.figures["ledgers"]["count"] == 20  # clients/*/ledger.jsonl, nothing else
    out = CliRunner().invoke(app, ["audit", str(copy), "--out", str(copy / "audit")])
    assert out.exit_code == 2 and "unfinished run" in out.output, out.output
    assert "edited by hand" not in out.output
    assert "UNFINISHED RUN" in (copy / "audit" / "audit.md").read_text()


def test_a_void_user_level_guarantee_stated_as_held_is_caught(copy):
    """δ = 1 + δ (every round discarded) stated as a guarantee: a violation."""
    summary = json.loads((copy / "summary.json").read_text())
    user = next(g for g in summary["privacy"]["guarantees"] if g["name"].startswith("user"))
    user["delta"] = 1.0 + 1e-5
    (copy / "summary.json").write_text(json.dumps(summary))
    assert any("void" in f and "user-level" in f for f in findings(copy))


def test_a_delta_above_the_target_or_not_below_one_over_n_is_caught(copy):
    summary = json.loads((copy / "summary.json").read_text())
    local = next(g for g in summary["privacy"]["guarantees"] if "local DP" in g["name"])
    local["delta"] = 0.01  # above 1e-5, and not below 1/N for this run's interactions
    (copy / "summary.json").write_text(json.dumps(summary))
    found = findings(copy)
    assert any("above the run's target" in f for f in found), found
    assert any("not below 1/N" in f for f in found), found


def test_a_misreported_user_epsilon_is_caught(copy):
    summary = json.loads((copy / "summary.json").read_text())
    summary["privacy"]["user_epsilon"] *= 0.9
    (copy / "summary.json").write_text(json.dumps(summary))
    assert any("user-level" in f and "reported" in f for f in findings(copy))


@pytest.mark.parametrize("dp", ["off", "user", "local", "user+local", "distributed"])
def test_honest_runs_of_every_calibration_pass(tmp_path, dp):
    """(user+distributed is the `honest` fixture.) Half the devices per round: a `user` run
    used to fail on the discard δ of secure aggregation, which only `distributed` has."""
    finalize(run_in_process(tiny(tmp_path / "run", dp, **{"clients-per-round": 10})))
    result = audit(tmp_path / "run")
    assert result.findings == [], [f.line() for f in result.findings]
    kinds = {g["kind"] for g in result.figures["guarantees"]}
    assert ("user" in kinds) == ("user" in dp)


def test_a_doubled_user_level_noise_in_the_server_record_is_caught(copy):
    """The latest checkpoint's user-level record claims twice the noise in every round (its
    zip rewritten whole): z is no longer the calibration of the configured budget."""
    path = copy / "checkpoints" / "round-0003.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    for item in meta["extra"]["user_privacy"]["rounds"]:
        item["mechanism"]["noise_multiplier"] *= 2
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    found = findings(copy)
    assert any("[mechanism] user-level round 1: noise multiplier z" in f for f in found), found
    assert any("is not a prefix of the final record" in f for f in found), found


def test_a_run_that_sets_delta_aside_for_discarded_rounds_passes(tmp_path):
    """user+distributed with q < 1: the server calibrates its accountant for δ less the
    discard rule's planned share and states δ within the target; the audit re-derives both
    and every claim holds (a non-zero discard δ, unlike the q = 1 runs above)."""
    config = SimulationConfig.from_flat(
        {
            "dataset": "synthetic",
            "synthetic": "num_users=120,num_items=60,mean_interactions_per_user=12,seed=2",
            "rounds": 2, "clients-per-round": 40, "min-survivors": 3, "num-negatives": 10,
            "model-dim": 8, "model-text-dim": 8, "out": str(tmp_path / "run"),
        }
    )  # fmt: skip
    summary = finalize(run_in_process(config))
    user = next(g for g in summary["privacy"]["guarantees"] if "user-level" in g["name"])
    assert 0 < user["delta_from_discarded_rounds"] and user["delta"] <= config.delta
    assert findings(tmp_path / "run") == []

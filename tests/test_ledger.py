"""The on-disk privacy ledger: format, resume, retirement, torn appends and tamper evidence."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.client import ledger as ledger_module
from fedrec.client.ledger import (
    GENESIS,
    LedgerBusyError,
    LedgerCorruptError,
    PrivacyLedger,
    RetiredCohortError,
)
from fedrec.common.privacy.accounting import Guarantee, Mechanism

DELTA = 1e-5
LOCAL, DIST = Guarantee.LOCAL, Guarantee.DISTRIBUTED
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")


def mech(sigma=1.0, q=0.1, steps=10, k=None):
    return Mechanism(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        clip_norm=1.0,
        delta=DELTA,
        aggregate_noise_multiplier=None if k is None else sigma * math.sqrt(k),
        min_survivors=k,
    )


def ticks():
    t = iter(range(1_700_000_000, 1_800_000_000))
    return lambda: float(next(t))


def open_ledger(path, **kw):
    return PrivacyLedger.open(path, clock=ticks(), **kw)


def filled(path: Path) -> bytes:
    """Five entries of every kind; returns the file's bytes."""
    with open_ledger(path) as led:
        led.append_train(1, mech(k=4), {"2024-01": 12})
        led.append_survivors(1, 5)
        led.append_train(2, mech(k=4), {"2024-01": 12, "2024-02": 3})
        eps = led.epsilons(LOCAL, DELTA)
        led.append_retire(3, ["2024-01"], "budget", eps, guarantee=LOCAL, delta=DELTA)
        led.append_train(3, mech(k=4), {"2024-02": 3})
    return path.read_bytes()


def test_line_format_and_hash_chain_are_plain(tmp_path):
    lines = filled(tmp_path / "ledger.jsonl").decode().splitlines()
    prev = GENESIS
    for seq, line in enumerate(lines):
        entry = json.loads(line)
        assert line == json.dumps(entry, sort_keys=True, separators=(",", ":"))
        assert (entry["seq"], entry["prev_hash"], entry["v"]) == (seq, prev, 1)
        body = json.dumps(
            {k: v for k, v in entry.items() if k != "hash"}, sort_keys=True, separators=(",", ":")
        )
        assert entry["hash"] == hashlib.sha256(body.encode()).hexdigest()
        prev = entry["hash"]
    first = json.loads(lines[0])
    assert first["kind"] == "train" and first["cohorts"] == {"2024-01": 12}
    assert Mechanism.from_dict(first["mechanism"]) == mech(k=4)
    assert json.loads(lines[1]) | {"hash": 0, "prev_hash": 0} == {
        "v": 1,
        "seq": 1,
        "kind": "survivors",
        "round": 1,
        "time": 1_700_000_001.0,
        "train_seq": 0,
        "n": 5,
        "hash": 0,
        "prev_hash": 0,
    }
    retire = json.loads(lines[3])
    assert (retire["cohorts"], retire["reason"], retire["guarantee"]) == (
        ["2024-01"],
        "budget",
        "local",
    )


def test_client_directory_and_creation(tmp_path):
    client_dir = tmp_path / "clients" / "7"
    with PrivacyLedger.open(ledger_module.path_for(client_dir)) as led:
        assert led.path == client_dir / "ledger.jsonl" and led.entries == ()
        assert led.head_hash == GENESIS and led.epsilons(LOCAL, DELTA) == {}
    assert (client_dir / "ledger.jsonl").read_bytes() == b""


def test_reopened_ledger_resumes_with_identical_epsilon_and_head(tmp_path):
    path = tmp_path / "ledger.jsonl"
    filled(path)
    with open_ledger(path) as led:
        entries, head = led.entries, led.head_hash
        eps = {g: led.epsilons(g, DELTA) for g in Guarantee}
        assert head == entries[-1]["hash"]
    with open_ledger(path) as led:
        assert (led.entries, led.head_hash) == (entries, head)
        assert {g: led.epsilons(g, DELTA) for g in Guarantee} == eps
        new = led.append_train(4, mech(k=4), {"2024-02": 3})
        assert (new["seq"], new["prev_hash"]) == (5, head)  # continues, never from zero
        assert led.epsilons(LOCAL, DELTA)["2024-02"] > eps[LOCAL]["2024-02"]
        assert led.contains(head) and led.contains(GENESIS) and not led.contains("f" * 64)


def test_second_open_is_refused_while_one_is_open(tmp_path):
    with open_ledger(tmp_path / "ledger.jsonl"), pytest.raises(LedgerBusyError):
        open_ledger(tmp_path / "ledger.jsonl")


def test_retired_cohort_is_never_trained_again(tmp_path):
    path = tmp_path / "ledger.jsonl"
    before = filled(path)
    with open_ledger(path) as led:
        assert led.retired_cohorts() == {"2024-01"}
        with pytest.raises(RetiredCohortError, match="2024-01"):
            led.append_train(4, mech(), {"2024-01": 12, "2024-02": 3})
        with pytest.raises(ValueError, match="already retired"):
            led.append_retire(
                4, ["2024-01"], "again", {"2024-01": 99.0}, guarantee=LOCAL, delta=DELTA
            )
        assert led.plan(mech(), ["2024-01", "2024-02"], 1e6, LOCAL, DELTA) == (["2024-02"], {})
    assert path.read_bytes() == before


def test_retire_refuses_an_epsilon_below_the_spent_one(tmp_path):
    with open_ledger(tmp_path / "ledger.jsonl") as led:
        led.append_train(1, mech(), {"a": 1})
        spent = led.epsilons(LOCAL, DELTA)["a"]
        with pytest.raises(ValueError, match="below its spent"):
            led.append_retire(2, ["a"], "x", {"a": spent / 2}, guarantee=LOCAL, delta=DELTA)
        led.append_retire(2, ["a"], "x", {"a": math.inf}, guarantee=LOCAL, delta=DELTA)
        assert json.loads(led.path.read_text().splitlines()[-1])["epsilons"] == {"a": "inf"}
    with open_ledger(tmp_path / "ledger.jsonl") as led:
        assert led.retired_cohorts() == {"a"}


def test_survivors_below_kmin_raise_distributed_epsilon(tmp_path):
    with open_ledger(tmp_path / "ledger.jsonl") as led:
        led.append_train(1, mech(0.5, k=9), {"a": 4})
        with pytest.raises(ValueError, match="no train entry"):
            led.append_survivors(2, 3)
        at_kmin = led.epsilons(DIST, DELTA)["a"]
        assert at_kmin < led.epsilons(LOCAL, DELTA)["a"]
        led.append_survivors(1, 20)
        assert led.epsilons(DIST, DELTA)["a"] == at_kmin
        led.append_survivors(1, 2)
        assert led.epsilons(DIST, DELTA)["a"] > at_kmin


def test_zero_noise_is_infinite_and_planned_away(tmp_path):
    with open_ledger(tmp_path / "ledger.jsonl") as led:
        led.append_train(1, mech(0.0), {"a": 4})
        assert led.epsilons(LOCAL, DELTA) == {"a": math.inf}
        assert led.plan(mech(), ["a", "b"], 10.0, LOCAL, DELTA)[1] == {"a": math.inf}


def test_torn_last_line_is_truncated_with_a_warning(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    good = filled(path)
    with open_ledger(path) as led:
        head = led.head_hash
    path.write_bytes(good + good.splitlines(keepends=True)[2][:57])  # half of an append
    with caplog.at_level(logging.WARNING), open_ledger(path) as led:
        assert "torn" in caplog.text and led.head_hash == head
        assert path.read_bytes() == good
        led.append_survivors(3, 4)
    with open_ledger(path) as led:
        assert len(led.entries) == 6


def test_complete_last_line_missing_its_newline_is_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    good = filled(path)
    path.write_bytes(good[:-1])
    with open_ledger(path) as led:
        assert len(led.entries) == 5
    assert path.read_bytes() == good


def _edit_value(lines):
    lines[2] = lines[2].replace(b'"steps":10', b'"steps":1')


def _edit_and_rehash(lines):
    entry = json.loads(lines[2])
    entry["mechanism"]["steps"] = 1
    entry["hash"] = ledger_module.entry_hash(entry)
    lines[2] = ledger_module.canonical(entry).encode()


def _delete(lines):
    del lines[2]


def _swap(lines):
    lines[1], lines[2] = lines[2], lines[1]


def _bad_json(lines):
    lines[2] = lines[2][:40]


def _whitespace(lines):
    lines[2] = lines[2].replace(b",", b", ", 1)


def _duplicate_key(lines):
    lines[1] = lines[1].replace(b'{"hash"', b'{"n":99,"hash"')


def _rechain(lines, start):
    prev = json.loads(lines[start - 1])["hash"]
    for i in range(start, len(lines)):
        entry = json.loads(lines[i]) | {"seq": i, "prev_hash": prev}
        entry["hash"] = prev = ledger_module.entry_hash(entry)
        lines[i] = ledger_module.canonical(entry).encode()


def _train_retired(lines):  # a consistent chain that trains a retired cohort
    entry = json.loads(lines[4])
    entry["cohorts"]["2024-01"] = 12
    lines[4] = ledger_module.canonical(entry).encode()
    _rechain(lines, 4)


@pytest.mark.parametrize(
    ("tamper", "where", "what"),
    [
        (_edit_value, "line 3, entry seq 2", "hash"),
        (_edit_and_rehash, "line 4, entry seq 3", "prev_hash"),
        (_delete, "line 3, entry seq 3", "seq 3 where 2"),
        (_swap, "line 2, entry seq 2", "seq 2 where 1"),
        (_bad_json, "line 3", "not valid JSON"),
        (_whitespace, "line 3, entry seq 2", "canonical"),
        (_duplicate_key, "line 2, entry seq 1", "canonical"),
        (_train_retired, "line 5, entry seq 4", "retired"),
    ],
)
def test_tampering_in_the_middle_is_named_and_nothing_is_modified(tmp_path, tamper, where, what):
    path = tmp_path / "ledger.jsonl"
    lines = filled(path).splitlines()
    tamper(lines)
    corrupt = b"\n".join(lines) + b"\n"
    path.write_bytes(corrupt)
    with pytest.raises(LedgerCorruptError) as err:
        open_ledger(path)
    assert str(path) in str(err.value) and where in str(err.value) and what in str(err.value)
    assert path.read_bytes() == corrupt


def test_a_rewritten_chain_is_caught_against_a_recorded_head(tmp_path):
    path = tmp_path / "ledger.jsonl"
    lines = filled(path).splitlines()
    with open_ledger(path) as led:
        recorded = led.head_hash  # as a run summary keeps it
    del lines[3]  # drop the retirement and re-hash everything after it
    _rechain(lines, 3)
    path.write_bytes(b"\n".join(lines) + b"\n")
    with open_ledger(path) as led:
        assert not led.contains(recorded)
    path.write_bytes(b"\n".join(lines[:2]) + b"\n")  # trailing entries cut off
    with open_ledger(path) as led:
        assert not led.contains(recorded)


def test_failed_write_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    before = filled(path)
    real_write = os.write

    def half_then_fail(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError("disk full")

    with open_ledger(path) as led:
        monkeypatch.setattr(ledger_module.os, "write", half_then_fail)
        with pytest.raises(OSError, match="disk full"):
            led.append_train(4, mech(), {"2024-02": 3})
        monkeypatch.setattr(ledger_module.os, "write", real_write)
        assert path.read_bytes() == before and len(led.entries) == 5
        led.append_train(4, mech(), {"2024-02": 3})
    with open_ledger(path) as led:
        assert len(led.entries) == 6


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("train"),
            st.sampled_from([mech(0.8, 0.05, 5, k=4), mech(1.5, 0.3, 20), mech(0.0, 1.0, 1)]),
            st.lists(st.sampled_from("abc"), max_size=3, unique=True),
        ),
        st.tuples(st.just("survivors"), st.integers(1, 6)),
        st.tuples(
            st.just("plan"), st.sampled_from([1.0, 5.0, 30.0]), st.sampled_from(list(Guarantee))
        ),
    ),
    max_size=10,
)


@settings(max_examples=40, deadline=None)
@given(ops=ops)
def test_ledger_invariants_hold_through_any_history(ops):
    """ε never decreases; retired cohorts are never trained; reopening changes nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.jsonl"
        before = {g: {} for g in Guarantee}
        rnd = 0
        for op in ops:
            with open_ledger(path, fsync=False) as led:
                rnd += 1
                if op[0] == "train":
                    live = {c: 1 for c in op[2] if c not in led.retired_cohorts()}
                    led.append_train(rnd, op[1], live)
                    if set(op[2]) - set(live):
                        with pytest.raises(RetiredCohortError):
                            led.append_train(rnd, op[1], dict.fromkeys(op[2], 1))
                elif op[0] == "survivors" and any(e["kind"] == "train" for e in led.entries):
                    last = [e["round"] for e in led.entries if e["kind"] == "train"][-1]
                    led.append_survivors(last, op[1])
                elif op[0] == "plan":
                    planned = mech(0.8, 0.05, 5, k=4)
                    _, to_retire = led.plan(planned, "abc", op[1], op[2], DELTA)
                    if to_retire:
                        led.append_retire(
                            rnd, to_retire, "budget", to_retire, guarantee=op[2], delta=DELTA
                        )
                snapshot = (led.entries, led.head_hash)
                for g in Guarantee:
                    now = led.epsilons(g, DELTA)
                    assert all(now[c] >= eps for c, eps in before[g].items())
                    before[g] = now
            with open_ledger(path, fsync=False) as led:
                assert (led.entries, led.head_hash) == snapshot
                assert {g: led.epsilons(g, DELTA) for g in Guarantee} == before


def test_appends_are_durable_when_they_return_or_when_a_synced_block_exits(tmp_path, monkeypatch):
    """Every append's bytes reach the disk (fsync) before the caller can release anything built
    on it: at once, or inside `synced_once` when the block exits, once for all of them and
    also when the block raises. A new file's folder entry is synced with its first append."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    monkeypatch.setattr(ledger_module.os, "fsync", recording_fsync)
    path = tmp_path / "device" / "ledger.jsonl"
    with open_ledger(path) as led:
        assert synced == []  # nothing to make durable in an empty file
        with led.synced_once():
            led.append_train(1, mech(k=4), {"2024-01": 12})
            led.append_survivors(1, 5)
            assert synced == [] and len(path.read_bytes().splitlines()) == 2
        assert synced == ["file", "dir"]
        led.append_train(2, mech(k=4), {"2024-01": 12})
        assert synced == ["file", "dir", "file"]
        with pytest.raises(RuntimeError, match="training failed"):
            with led.synced_once():
                led.append_train(3, mech(k=4), {"2024-01": 12})
                raise RuntimeError("training failed")
        assert synced == ["file", "dir", "file", "file"]
    with open_ledger(path) as led:
        assert [e["round"] for e in led.entries] == [1, 1, 2, 3]


def test_the_ledger_pass_in_its_own_process_equals_the_one_in_this_process(tmp_path):
    """The report verifies a large run's ledgers in a child process: the same ε, retired count
    and heads as in this one, and a corrupt ledger still fails the report, named."""
    from fedrec.client import ledger_pass

    for name, cohorts in [("a", {"2024-01": 2}), ("b", {"2024-01": 1, "2024-02": 4})]:
        with open_ledger(tmp_path / name / "ledger.jsonl") as led:
            led.append_train(1, mech(k=4), cohorts)
            led.append_survivors(1, 3)
    filled(tmp_path / "c" / "ledger.jsonl")
    (tmp_path / "empty").mkdir()
    here = ledger_module.ledgers_epsilons(ledger_pass.ledger_paths(tmp_path), DELTA)
    there = ledger_pass.start(tmp_path, DELTA)()
    assert len(here.distributed) == len(here.local) == 5 and here.retired == 1
    assert set(here.heads) == {"a", "b", "c"}
    assert there.heads == here.heads and there.retired == here.retired
    assert there.distributed.tolist() == here.distributed.tolist()
    assert there.local.tolist() == here.local.tolist()
    with open_ledger(tmp_path / "a" / "ledger.jsonl") as led:
        assert max(here.local[:1]) == pytest.approx(led.epsilons(LOCAL, DELTA)["2024-01"])

    corrupt = tmp_path / "b" / "ledger.jsonl"
    corrupt.write_bytes(corrupt.read_bytes().replace(b'"2024-02":4', b'"2024-02":1'))
    with pytest.raises(LedgerCorruptError, match=str(corrupt)):
        ledger_pass.start(tmp_path, DELTA)()

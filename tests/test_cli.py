"""The `fedrec` command line, run as a real subprocess the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def fedrec(*args: str, tmp_path, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"FEDREC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fedrec {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_the_commands(tmp_path):
    out = fedrec("--help", tmp_path=tmp_path).stdout
    assert "data" in out and "train" in out
    train_help = fedrec("train", "--help", tmp_path=tmp_path).stdout
    assert "--epsilon" in train_help and "summary.json" in train_help


def test_data_describes_the_builtin_dataset(tmp_path):
    summary = json.loads(fedrec("data", "--json", tmp_path=tmp_path).stdout)
    assert summary["interactions"] == 40_000
    assert summary["users"] == 9_063
    assert summary["items_in_catalogue"] == 6_798
    assert summary["interactions_per_user"]["median"] == 2
    assert summary["interactions_per_user"]["users_with_at_least_5"] == 2_216
    assert summary["time_span"]["first"].startswith("2013-02-28")
    table = fedrec("data", tmp_path=tmp_path).stdout
    assert "valid" in table and "40,000" in table


def test_data_reports_a_malformed_file_with_its_line(tmp_path):
    bad = tmp_path / "ml"
    bad.mkdir()
    (bad / "movies.dat").write_text("1::Heat (1995)::Crime\n2::Alien (1979)::Sci-Fi\n")
    (bad / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::yesterday\n")
    proc = fedrec(
        "data", "--dataset", "movielens", "--data-dir", str(bad), tmp_path=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert "ratings.dat, line 2" in proc.stderr and "timestamp" in proc.stderr


def test_unknown_dataset_is_a_usage_error(tmp_path):
    proc = fedrec("data", "--dataset", "imdb", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown dataset" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data", "--dataset", "csv", "--data-dir", "e.csv"), "needs --columns naming the user"),
        (("train", "--epsilon", "nan"), "epsilon must be a finite number"),
        (("train", "--epsilon", "inf"), "epsilon must be a finite number"),
        (("train", "--seed", "-1"), "seed must be in"),
        (("simulate", "--epsilon", "nan"), "epsilon must be a finite number"),
        (("simulate", "--user-epsilon", "nan"), "user-epsilon must be a finite number"),
        (("simulate", "--seed", "-1"), "seed must be in"),
        (("simulate", "--no-dp", "--dp", "user"), "--no-dp contradicts --dp user"),
    ],
)
def test_bad_values_are_usage_errors_not_tracebacks(tmp_path, args, message):
    proc = fedrec(*args, "--out", str(tmp_path / "out"), tmp_path=tmp_path, check=False)
    if args[0] == "data":  # `data` writes nothing
        proc = fedrec(*args, tmp_path=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in " ".join(proc.stderr.replace("│", " ").split())
    assert not (tmp_path / "out").exists()


def test_simulate_in_process_reports_malformed_data_before_starting(tmp_path):
    events = tmp_path / "e.csv"
    events.write_text("user,item,ts\n1,a,5\n2,b,99999999999999999999999\n")
    proc = fedrec(
        "simulate", "--in-process", "--dataset", "csv", "--data-dir", str(events),
        "--columns", "user=user,item=item,time=ts", "--out", str(tmp_path / "run"),
        tmp_path=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{events}, line 3: timestamp '99999999999999999999999' is out of range" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dp", [False, True])
def test_train_writes_summary_model_and_plot(tmp_path, dp):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--dataset", "synthetic"]
    args += ["--synthetic", "num_users=200,num_items=80,seed=1", "--epochs", "2", "--dim", "8"]
    args += ["--negatives", "10", "--batch-size", "64", "--protocol", "loo"]
    if dp:
        args += ["--epsilon", "5"]
    proc = fedrec(*args, tmp_path=tmp_path)
    assert "NDCG@10" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test"]["ndcg@10"] <= summary["test"]["hr@10"] <= 1
    assert summary["test"]["users"] > 0
    assert (out / "model-loo.pt").exists() and (out / "validation.png").stat().st_size > 1000
    lines = (out / "epochs.jsonl").read_text().splitlines()
    assert len(lines) == 2
    if dp:
        assert 0 < summary["epsilon"] <= 5 + 1e-6
        assert summary["privacy"]["unit"].startswith("one interaction")
        assert summary["privacy"]["delta"] == 1e-5
    else:
        assert "epsilon" not in summary

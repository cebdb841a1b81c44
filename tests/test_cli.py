"""The `fedrec` command line, run as a real subprocess the way a user runs it."""

from __future__ import annotations

import json
import os
import re
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
        (("simulate", "--dp", "distributed+user+local"), "choose distributed OR local"),
        (("simulate", "--dp", "none"), "'none' is not a DP mode; use one of off | user"),
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


def test_the_exported_split_is_what_a_run_evaluates_on(tmp_path):
    """`fedrec data --export-split`: test.csv holds exactly the rows a simulation's final
    evaluation ranks, history.csv what is excluded from their ranking, known.csv what the
    devices hold, in external ids; an unknown protocol is refused."""
    import csv

    from fedrec.common.data.stream import load_stream
    from fedrec.common.run_config import SimulationConfig

    spec = "num_users=120,num_items=60,mean_interactions_per_user=12,seed=2"
    out = tmp_path / "split"
    proc = fedrec(
        "data", "--dataset", "synthetic", "--synthetic", spec, "--export-split", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert f"wrote {out}" in proc.stdout
    config = SimulationConfig.from_flat({"dataset": "synthetic", "synthetic": spec})
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    users, items = stream.dataset.user_ids, stream.dataset.catalogue.item_ids

    def rows(name):
        with open(out / f"{name}.csv", newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == ["user_id", "item_id", "timestamp"]
            return sorted(tuple(r) for r in reader)

    def expected(x):
        triples = zip(x.user.tolist(), x.item.tolist(), x.timestamp.tolist(), strict=True)
        return sorted((str(users[u]), str(items[i]), str(t)) for u, i, t in triples)

    assert rows("test") == expected(stream.split.test) and rows("test")
    assert rows("history") == expected(stream.split.before_test())
    assert rows("known") == expected(stream.rows)
    assert not set(rows("test")) & set(rows("known"))
    with open(out / "items.csv") as f:
        assert f.read().split()[1:] == [str(i) for i in items]
    bad = fedrec("data", "--export-split", str(tmp_path / "x"), "--protocol", "random",
                 tmp_path=tmp_path, check=False)  # fmt: skip
    assert bad.returncode == 2 and "--protocol must be one of" in bad.stderr


@pytest.mark.parametrize("dp", [False, True])
def test_train_writes_summary_model_and_plot(tmp_path, dp):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--dataset", "synthetic"]
    args += ["--synthetic", "num_users=200,num_items=80,seed=1", "--epochs", "2"]
    args += ["--model-dim", "8", "--num-negatives", "10", "--batch-size", "64", "--protocol", "loo"]
    if dp:
        args += ["--epsilon", "5"]
    proc = fedrec(*args, tmp_path=tmp_path)
    assert "NDCG@10" in proc.stdout
    # stdout is a pipe: one line per epoch instead of a progress bar
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if " epoch " in line] == [
        "loo epoch 1/2",
        "loo epoch 2/2",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test"]["ndcg@10"] <= summary["test"]["hr@10"] <= 1
    assert summary["test"]["users"] > 0
    assert (out / "model-loo.pt").exists() and (out / "validation.png").stat().st_size > 1000
    # the files `train --help` names are the ones it writes (a --protocol loo run: no
    # temporal model)
    help_text = re.sub(r"\s+", "", fedrec("train", "--help", tmp_path=tmp_path).stdout)
    named = set(re.findall(r"OUT/([\w-]+\.(?:jsonl|json|pt|png))", help_text))
    assert {"summary.json", "epochs.jsonl", "model-loo.pt", "validation.png"} <= named
    assert all((out / name).exists() for name in named - {"model-temporal.pt"})
    lines = (out / "epochs.jsonl").read_text().splitlines()
    assert len(lines) == 2
    if dp:
        assert 0 < summary["epsilon"] <= 5 + 1e-6
        assert summary["privacy"]["unit"].startswith("one interaction")
        assert summary["privacy"]["delta"] == 1e-5
    else:
        assert "epsilon" not in summary


def test_version_prints_the_installed_version(tmp_path):
    from importlib.metadata import version

    proc = fedrec("--version", tmp_path=tmp_path)
    assert proc.stdout == f"fedrec {version('fedrec')}\n"


EMIT = """
import logging, os, sys
from fedrec.common import console
from fedrec.cli import app

@app.command("emit")
def emit() -> None:
    for level in ("debug", "info", "warning", "error"):
        getattr(logging.getLogger("fedrec.emitter"), level)(f"{level} message")
    print(f"progress={console.progress()} inherited={os.environ.get('FEDREC_LOG_LEVEL')}")

app(sys.argv[1:], prog_name="fedrec")
"""


@pytest.mark.parametrize(
    ("options", "level", "shown", "progress"),
    [
        ((), "info", ("info", "warning", "error"), "lines"),  # stdout is a pipe: line by line
        (("--log-level", "debug"), "debug", ("debug", "info", "warning", "error"), "lines"),
        (("--log-level", "error"), "error", ("error",), "lines"),
        (("--quiet",), "warning", ("warning", "error"), "none"),
        (("-q", "--log-level", "error"), "error", ("error",), "none"),
    ],
)
def test_log_level_and_quiet_apply_to_fedrec_loggers_progress_and_the_runs_processes(
    options, level, shown, progress
):
    """What the global options set: the fedrec loggers' level, here and (FEDREC_LOG_LEVEL)
    in the processes a run starts, and how progress is shown."""
    proc = subprocess.run(
        [sys.executable, "-c", EMIT, *options, "emit"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    logged = [line.split()[0].lower() for line in proc.stderr.splitlines() if "message" in line]
    assert logged == list(shown)
    assert all(f"fedrec.emitter: {name} message" in proc.stderr for name in shown)
    assert proc.stdout.strip() == f"progress={progress} inherited={level}"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--log-level", "chatty"), "'chatty' is not one of"),
        (("--quiet", "--log-level", "debug"), "contradicts --log-level debug"),
    ],
)
def test_bad_global_options_are_usage_errors(tmp_path, options, message):
    proc = fedrec(*options, "data", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in " ".join(proc.stderr.replace("│", " ").split())


def commands(command, path=()):
    """(path, click command) of every command and group under `command`."""
    import click

    yield list(path), command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from commands(sub, (*path, name))


def test_every_help_shows_the_bracketed_words_of_its_help_strings(monkeypatch):
    """Help strings name TOML tables in brackets ("[device] store"): every bracketed word
    written in a command's help or its parameters' help is in what `--help` prints."""
    import logging

    import typer
    from click.testing import CliRunner

    from fedrec.cli import app, command
    from fedrec.common import console

    # the global options run before a subcommand's --help: keep this process's settings
    monkeypatch.delenv(console.LOG_LEVEL_ENV, raising=False)
    monkeypatch.setattr(console, "_quiet", console._quiet)
    logger = logging.getLogger(console.LOGGER)
    level = logger.level
    runner = CliRunner()
    checked = []
    try:
        for path, cmd in commands(typer.main.get_command(app)):
            texts = [cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)]
            words = {w for text in texts for w in re.findall(r"\[[^\[\]]+\]", text)}
            result = runner.invoke(command(), [*path, "--help"], prog_name="fedrec")
            assert result.exit_code == 0, result.output
            assert "\\[" not in result.output  # an escape printed as it is
            # help is re-wrapped (in boxes), even at hyphens
            printed = re.sub(r"[\s│╭╮╰╯─]+", "", result.output)
            missing = sorted(w for w in words if re.sub(r"\s+", "", w) not in printed)
            assert not missing, f"fedrec {' '.join(path)} --help lacks {missing}"
            checked += words
    finally:
        logger.setLevel(level)
    assert {"[device]", "[policy]", "[server]", "[run]"} <= set(checked)

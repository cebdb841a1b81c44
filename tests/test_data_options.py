"""Every command takes the same data options, an items file included: `fedrec data`, `fedrec
train` and `fedrec simulate` read one CSV dataset and its catalogue the same way."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedrec.cli import app, simulate_cmd

DATA_OPTIONS = ("dataset", "data_dir", "columns", "items_file", "synthetic")
COMMANDS = ("data", "train", "simulate")


def options(command: str) -> dict[str, click.Option]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return {p.name: p for p in group.commands[command].params if isinstance(p, click.Option)}


def test_data_train_and_simulate_declare_the_same_data_options():
    declared = {command: options(command) for command in COMMANDS}
    for name in DATA_OPTIONS:
        spelled = {command: tuple(declared[command][name].opts) for command in COMMANDS}
        helps = {declared[command][name].help for command in COMMANDS}
        assert set(spelled.values()) == {(f"--{name.replace('_', '-')}",)}, spelled
        assert len(helps) == 1, (name, helps)


@pytest.fixture
def csv_dataset(tmp_path: Path) -> list[str]:
    """8 users x 5 time-ordered events over items a..f; the items file adds g, never seen."""
    events = ["uid,movie,ts"]
    for user in range(8):
        for step in range(5):
            events.append(f"u{user},{'abcdef'[(user + step) % 6]},{1000 * user + 10 * step}")
    (tmp_path / "events.csv").write_text("\n".join(events) + "\n")
    items = ["movie,title,genres"] + [f"{i},Film {i.upper()} (2001),Drama" for i in "abcdefg"]
    (tmp_path / "items.csv").write_text("\n".join(items) + "\n")
    return [
        "--dataset", "csv",
        "--data-dir", str(tmp_path / "events.csv"),
        "--columns", "user=uid,item=movie,time=ts",
        "--items-file", str(tmp_path / "items.csv"),
    ]  # fmt: skip


def test_data_reads_the_items_file(csv_dataset):
    result = CliRunner().invoke(app, ["data", *csv_dataset, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["items_in_catalogue"] == 7 and summary["items_with_interactions"] == 6


def test_train_reads_the_items_file(csv_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["train", *csv_dataset, "--text-encoder", "hashing", "--protocol", "loo"]
    args += ["--epochs", "1", "--model-dim", "8", "--num-negatives", "4", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["items"] == 7  # the unseen item g is in the ranked catalogue
    assert summary["config"]["data"]["items_path"] == csv_dataset[-1]


def test_simulate_reads_the_items_file(csv_dataset, tmp_path):
    settings = dict(
        zip(("dataset", "data_dir", "columns", "items_file"), csv_dataset[1::2], strict=True)
    )
    config = simulate_cmd.simulation_config(None, settings | {"out": str(tmp_path / "sim")})
    assert config.to_flat()["items-file"] == settings["items_file"]  # recorded in config.json
    catalogue = config.data.load().catalogue
    assert len(catalogue) == 7 and "Film G" in catalogue.texts()[-1]
    # the same settings without the items file: the catalogue is what the events name
    bare = simulate_cmd.simulation_config(
        None, {k: v for k, v in settings.items() if k != "items_file"}
    )
    assert len(bare.data.load().catalogue) == 6


def test_simulate_names_a_missing_items_file(csv_dataset, tmp_path):
    args = [*csv_dataset[:-1], str(tmp_path / "missing.csv"), "--out", str(tmp_path / "sim")]
    result = CliRunner().invoke(app, ["simulate", "--in-process", *args])
    assert result.exit_code == 2
    assert "missing.csv" in result.output and "not supported" not in result.output
    assert not (tmp_path / "sim").exists()

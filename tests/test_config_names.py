"""One name per setting: a `fedrec simulate` option `--foo-bar` is the key `foo-bar` of an
experiment TOML, of `[tool.flwr.app.config]` and of the run's config.json, and the field
`foo_bar` of SimulationConfig (`model-*` keys: ModelConfig's fields; `data-dir` and the other
data keys: DataConfig's)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedrec.cli import app, simulate_cmd
from fedrec.common.run_config import DP_MODES, TRANSPORT_KEYS, SimulationConfig

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# options of `simulate` that are not settings of the run
NOT_SETTINGS = {"config_file", "in_process", "scenario"}
# a value other than the default for each setting option, as typed on the command line
VALUES = {
    "dataset": "synthetic",
    "data_dir": "some/events.csv",
    "columns": "user=u,item=i,time=t",
    "items_file": "some/items.csv",
    "synthetic": "num_users=50,num_items=20",
    "text_encoder": "hashing",
    "rounds": "3",
    "protocol": "temporal",
    "evaluate_on": "validation",
    "clients_per_round": "7",
    "dp": "user+local",
    "epsilon": "3.5",
    "user_epsilon": "2.5",
    "delta": "1e-06",
    "min_survivors": "5",
    "seed": "11",
    "out": "runs/elsewhere",
    "resume": None,  # a switch
    "reproducible_noise": None,
    "secure_aggregation_protocol": "secagg",
    "bias_change_cap": "0.5",
    "bias_anomaly": "3.0",
    "robust_aggregation": "median",
    "robust_trim": "0.2",
    "row_clip_norm": "0.3",
}


def options(command: str) -> list[click.Option]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return [p for p in group.commands[command].params if isinstance(p, click.Option)]


def setting_options() -> list[click.Option]:
    return [o for o in options("simulate") if o.name not in NOT_SETTINGS]


def test_every_simulate_option_is_named_after_its_setting():
    flat = SimulationConfig().to_flat()
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(flat) | TRANSPORT_KEYS  # the Flower defaults name every setting
    assert SimulationConfig.from_flat(table) == SimulationConfig()  # ... with its default
    assert {o.name for o in setting_options()} == set(VALUES)
    for option in setting_options():
        key = option.name.replace("_", "-")
        assert option.opts == [f"--{key}"], option.opts  # one spelling, no alias
        assert key in flat and key in table


@pytest.mark.parametrize("name", sorted(VALUES))
def test_each_simulate_option_sets_the_config_key_of_its_name(name, monkeypatch, tmp_path):
    """The option reaches SimulationConfig as the key of its name, and config.json (the
    config's flat mapping) records it under that same key."""
    seen = {}

    def capture(config_file, settings, scenario=None):
        seen.update(settings)
        raise typer.Exit(0)

    monkeypatch.setattr(simulate_cmd, "simulation_config", capture)
    key = name.replace("_", "-")
    args = [f"--{key}"] + ([] if VALUES[name] is None else [VALUES[name]])
    result = CliRunner().invoke(app, ["simulate", *args])
    assert result.exit_code == 0, result.output
    given = {n: v for n, v in seen.items() if v is not None and v is not False}
    assert list(given) == [name]
    monkeypatch.undo()
    if name == "resume":  # a resumed run needs its folder: only the parsed value here
        assert SimulationConfig.from_flat({key: True}).resume is True
        return
    config = simulate_cmd.simulation_config(None, {name: given[name]})
    recorded = config.to_flat()[key]
    expected = True if VALUES[name] is None else VALUES[name]
    assert str(recorded) == str(expected) or float(recorded) == float(expected)
    field = name if name in {f.name for f in dataclasses.fields(SimulationConfig)} else None
    if field is not None and field != "dp":
        assert str(getattr(config, field)) == str(recorded)


def test_the_dp_option_lists_every_mode_in_its_one_spelling():
    (dp,) = [o for o in options("simulate") if o.name == "dp"]
    assert dp.help is not None and dp.help.split(" | ") == list(DP_MODES)


def test_train_and_audit_name_shared_settings_as_simulate_does():
    """`fedrec train` names the model's size and the negatives as the simulation does, and
    `fedrec audit` the per-interaction budget as config.json does (`epsilon`)."""
    train = {o.name for o in options("train")}
    assert {"model_dim", "num_negatives", "epsilon", "delta", "clip_norm", "seed"} <= train
    assert not {"dim", "negatives"} & train
    audit = {o.name: o.opts for o in options("audit")}
    assert audit["epsilon"] == ["--epsilon"] and "budget" not in audit
    assert {"model-dim", "num-negatives", "epsilon", "delta", "clip-norm", "seed"} <= set(
        SimulationConfig().to_flat()
    )

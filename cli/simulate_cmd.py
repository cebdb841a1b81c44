"""`fedrec simulate`: the main job, a federated lifelong simulation with per-interaction DP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedrec.cli.options import (
    ColumnsOpt,
    DataDirOpt,
    ItemsFileOpt,
    SyntheticOpt,
    TextEncoderOpt,
    fail,
)
from fedrec.cli.run_folder import hold_run_folder, human_bytes, record_folder_size

if TYPE_CHECKING:
    from fedrec.common.run_config import SimulationConfig
    from fedrec.common.run_lock import RunLock


def simulate(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="experiment TOML (see simulations/*.toml)")
    ] = None,
    scenario: Annotated[
        str | None,
        typer.Option(
            "--scenario",
            help="attack scenario: a name of simulations/scenarios (promote-5, random, nan, "
            "...) or a TOML file; its settings go over --config's, under the options given",
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="builtin | movielens | csv | synthetic")
    ] = None,
    data_dir: DataDirOpt = None,
    columns: ColumnsOpt = None,
    items_file: ItemsFileOpt = None,
    synthetic: SyntheticOpt = None,
    text_encoder: TextEncoderOpt = None,
    rounds: Annotated[int | None, typer.Option(help="federated rounds (= stream windows)")] = None,
    protocol: Annotated[
        str | None,
        typer.Option(help="test held back from the stream: loo (a) | temporal (b, global cutoff)"),
    ] = None,
    evaluate_on: Annotated[
        str | None,
        typer.Option(
            help="test | validation: choose settings on validation (its rows are held back "
            "instead, and the test is never read)"
        ),
    ] = None,
    clients_per_round: Annotated[
        int | None, typer.Option(help="expected devices per round (Poisson-sampled)")
    ] = None,
    dp: Annotated[
        str | None,
        typer.Option(help="off | user | distributed | local | user+distributed | user+local"),
    ] = None,
    epsilon: Annotated[float | None, typer.Option(help="per-interaction ε budget")] = None,
    user_epsilon: Annotated[float | None, typer.Option(help="user-level ε budget")] = None,
    delta: Annotated[
        float | None, typer.Option(help="δ of every guarantee (must be below 1/N of its unit)")
    ] = None,
    min_survivors: Annotated[
        int | None,
        typer.Option(help="K_min: under secure aggregation a round with fewer is discarded"),
    ] = None,
    secure_aggregation_protocol: Annotated[
        str | None,
        typer.Option(
            help="clear (simulated sum, default) | secagg (SecAgg+ over discrete Gaussian "
            "encodings, each execution slot one party; needs distributed in --dp)"
        ),
    ] = None,
    bias_change_cap: Annotated[
        float | None,
        typer.Option(help="largest per-round change of an item's served bias (0: off)"),
    ] = None,
    bias_anomaly: Annotated[
        float | None,
        typer.Option(
            help="damp an item's bias rise beyond what its bias sustains by more than this "
            "many robust standard deviations (0: off)"
        ),
    ] = None,
    robust_aggregation: Annotated[
        str | None,
        typer.Option(help="off | trimmed-mean | median per item row (dp off or local only)"),
    ] = None,
    robust_trim: Annotated[
        float | None, typer.Option(help="share cut from each end by trimmed-mean")
    ] = None,
    row_clip_norm: Annotated[
        float | None, typer.Option(help="bound on a device's change of one item row (0: off)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (simulation only)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/simulate)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out")] = False,
    reproducible_noise: Annotated[
        bool,
        typer.Option(
            "--reproducible-noise",
            help="derive DP noise and sampling from --seed (tests, benchmarks): NO privacy "
            "guarantee holds",
        ),
    ] = False,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="call devices in this process instead of Flower")
    ] = False,
) -> None:
    """Federated lifelong training on a stream of real (or synthetic) interactions.

    Round r delivers window r of the timeline to the devices' stores; Poisson-sampled devices
    rank what just arrived (prequential metrics), retire interactions whose ε would pass the
    budget, train with Opacus DP-SGD, write their ledgers, and send their update. Writes OUT/
    summary.json (test, privacy, dp, the run folder's size), metrics.jsonl, checkpoints/,
    clients/*/ledger.jsonl, rounds.png and epsilon.png, and flower.log. Shows a progress bar on
    a terminal, one line per round otherwise. Interrupted runs continue with --resume."""
    settings = {
        "dataset": dataset, "data_dir": data_dir, "columns": columns, "items_file": items_file,
        "synthetic": synthetic,
        "text_encoder": text_encoder, "rounds": rounds, "protocol": protocol,
        "evaluate_on": evaluate_on, "clients_per_round": clients_per_round, "dp": dp,
        "epsilon": epsilon, "user_epsilon": user_epsilon, "delta": delta,
        "min_survivors": min_survivors, "seed": seed, "out": out, "resume": resume,
        "reproducible_noise": reproducible_noise,
        "secure_aggregation_protocol": secure_aggregation_protocol,
        "bias_change_cap": bias_change_cap, "bias_anomaly": bias_anomaly,
        "robust_aggregation": robust_aggregation, "robust_trim": robust_trim,
        "row_clip_norm": row_clip_norm,
    }  # fmt: skip
    config = simulation_config(config_file, settings, scenario)
    if config.reproducible_noise:
        from fedrec.common.privacy.randomness import VOID_REASON

        typer.secho(f"warning: {VOID_REASON}", err=True, fg="yellow")
    if config.resume and not Path(config.out).is_dir():
        raise fail(f"--resume: {config.out} holds no run to continue (no such folder)")
    if not Path(config.out).exists():  # bad settings or data never create the run folder
        check_before_start(config)
    with hold_run_folder(
        Path(config.out).resolve(), command="fedrec simulate", rounds=config.rounds,
        resume_hint="resume with --resume and the same settings",
    ) as lock:  # fmt: skip
        run_locked(config, in_process, lock)


def simulation_config(
    config_file: Path | None, settings: dict, scenario: str | None = None
) -> SimulationConfig:
    """The run's settings: the experiment TOML (or the defaults) under the options given.

    Each option is the setting of the same name: `--clients-per-round` is the key
    `clients-per-round` of a TOML file, of `[tool.flwr.app.config]` and of config.json. An
    option left out (None, or a switch not given) keeps the file's value."""
    from fedrec.common.run_config import SimulationConfig

    overrides = {
        name.replace("_", "-"): str(value) if isinstance(value, Path) else value
        for name, value in settings.items()
        if value is not None and value is not False
    }
    try:
        given = set(overrides)
        if scenario is not None:
            from fedrec.simulations.scenario import scenario_settings

            attack = scenario_settings(scenario)
            given |= set(attack)
            overrides = {**attack, **overrides}
        if config_file is not None:
            given |= set(SimulationConfig.toml_settings(config_file))
            config = SimulationConfig.from_toml(config_file, overrides)
        else:
            config = SimulationConfig.from_flat(overrides)
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err)) from err
    recorded = Path(config.out) / "config.json"
    if config.resume and recorded.exists():
        # a resumed run keeps what it recorded; only what is given now is compared with it
        try:
            settings = json.loads(recorded.read_text())
            return SimulationConfig.from_flat({**settings, **overrides})
        except (ValueError, OSError) as err:
            raise fail(f"{recorded}: unreadable recorded configuration: {err}") from err
    return derived_settings(config, frozenset(given))


def derived_settings(config: SimulationConfig, given: frozenset[str]) -> SimulationConfig:
    """The settings left out, derived from the data and the DP mode (printed, and recorded in
    config.json with the rest); bad data is reported by the checks that follow."""
    from fedrec.common.console import progress
    from fedrec.server.run_settings import derive_settings

    try:
        derived = derive_settings(config, given)
    except (ValueError, OSError):  # DataError is a ValueError: named by check_before_start
        return config
    if progress() != "none":
        for name, why in derived.reasons.items():
            value = getattr(derived.config, name)
            shown = value if name != "model" else "content model"
            typer.echo(f"{name.replace('_', '-')} = {shown}: {why}", err=True)
    return derived.config


def check_before_start(config: SimulationConfig) -> None:
    """What the run folder holds against the settings, and the settings against the data:
    refused with exit 2 before anything is delivered, trained or started."""
    checkpoints = Path(config.out) / "checkpoints"
    if checkpoints.exists() and not config.resume:
        raise fail(f"{config.out} already holds a run: pass --resume, or choose another --out")
    recorded = Path(config.out) / "config.json"
    if config.resume and not recorded.exists():
        raise fail(f"--resume: {config.out} holds no run to continue (no {recorded.name})")
    from fedrec.server.federated_run import SettingsError, preflight, refuse_changed_settings

    try:  # before anything is delivered, trained or started
        if config.resume:
            try:
                settings = json.loads(recorded.read_text())
            except (OSError, ValueError) as err:
                raise SettingsError(
                    f"{recorded}: unreadable recorded configuration: {err}"
                ) from err
            refuse_changed_settings(settings, config, recorded)
        preflight(config)
    except (SettingsError, ValueError, OSError) as err:  # DataError is a ValueError
        raise fail(str(err)) from err


def run_locked(config: SimulationConfig, in_process: bool, lock: RunLock) -> None:
    """The run, with its folder locked: checks against what it holds, then the federation."""
    check_before_start(config)  # under the lock: what the folder holds cannot change now
    status = run_federation(config, in_process, lock)
    summary_path = Path(config.out) / "summary.json"
    if status != 0 or not summary_path.exists():
        raise fail(
            f"the simulation did not complete (status {status}); see {Path(config.out) / 'flower.log'}"
        )
    report(config)


def run_federation(config: SimulationConfig, in_process: bool, lock: RunLock) -> int:
    """Every round through Flower (or called in this process), then the summary: the status."""
    if not in_process:
        from fedrec.simulations.launcher import simulate as launch

        return launch(config, lock=lock)
    from fedrec.common import console
    from fedrec.simulations.devices import run_in_process
    from fedrec.simulations.launcher import round_line
    from fedrec.simulations.report import finalize

    def on_round(row: dict) -> None:
        if console.progress() != "none":
            typer.echo(round_line(row, config.rounds))

    finalize(run_in_process(config, on_round=on_round))
    return 0


def report(config: SimulationConfig) -> None:
    """The finished run's results, guarantees and folder on the terminal (the folder's size
    recorded in its summary.json first); exit 2 when no round was published."""
    out = Path(config.out)
    size, files = record_folder_size(out)
    summary = json.loads((out / "summary.json").read_text())
    failed = summary["privacy"]["failed_clients"]
    if failed:
        typer.secho(
            f"warning: {failed} device rounds failed (see metrics.jsonl and flower.log)",
            err=True,
            fg="yellow",
        )
    target, protocol = summary["evaluated_on"], summary["protocol"]
    scores = summary[target]
    typer.echo(
        f"{target} ({protocol}, full ranking): HR@10 {scores['hr@10']:.4f}  "
        f"NDCG@10 {scores['ndcg@10']:.4f}"
    )
    for name, metrics in summary.get(f"{target}_baselines", {}).items():
        typer.echo(f"  {name.replace('_', ' ')}: NDCG@10 {metrics['ndcg@10']:.4f}")
    robust = summary["robustness"]
    attack = robust["attack"]
    typer.echo(
        f"attack {attack}"
        + (f" ({robust['malicious_devices']} malicious devices)" if attack != "none" else "")
        + f": target ER@10 {robust['target_er@10']:.4f} ({', '.join(robust['targets'])}), "
        f"benign NDCG@10 {robust['benign_ndcg@10']:.4f}"
    )
    if robust["dropped_by_kind"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(robust["dropped_by_kind"].items()))
        typer.echo(f"  refused updates: {kinds}")
    yardstick = summary.get("yardstick")
    if yardstick and not yardstick["beaten"]:
        typer.secho(
            f"warning: the model ranks no better than {yardstick['name']} (NDCG@10 "
            f"{scores['ndcg@10']:.4f} against {yardstick['ndcg@10']:.4f}): at these budgets the "
            "noise outweighs what the devices teach it; more devices per round "
            "(--clients-per-round) or a larger --user-epsilon / --epsilon lower the noise share",
            err=True,
            fg="red",
            bold=True,
        )
    if "void_reason" in summary["privacy"]:
        typer.secho(f"  no privacy guarantee: {summary['privacy']['void_reason']}", fg="yellow")
    for g in summary["privacy"]["guarantees"]:
        if not g.get("earned", True):
            typer.secho(f"  {g['name']}: NOT claimed: {g['why_not']}", err=True, fg="yellow")
            continue
        typer.echo(f"  {g['name']}: ε={g['epsilon']:.2f}, δ={g['delta']:.3g} per {g['unit']}")
    typer.echo(f"wrote {out / 'summary.json'}")
    typer.echo(f"run folder {out}: {human_bytes(size)} in {files:,} files")
    if summary["published_rounds"] == 0:
        raise fail(
            f"no round was published: all {summary['rounds']} were discarded below K_min "
            f"(--min-survivors {config.min_survivors}); the model is the initial one"
        )

"""`fedrec data`: load, validate and describe a dataset."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedrec.cli.options import (
    ColumnsOpt,
    DataDirOpt,
    DatasetOpt,
    ItemsFileOpt,
    SyntheticOpt,
    data_config,
    fail,
)


def data(
    dataset: DatasetOpt = "builtin",
    data_dir: DataDirOpt = None,
    columns: ColumnsOpt = None,
    items_file: ItemsFileOpt = None,
    synthetic: SyntheticOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Load and validate a dataset, then print counts, time span, sparsity and the
    distribution of interactions per user. Malformed files are reported with file and line."""
    from rich.console import Console
    from rich.table import Table

    from fedrec.common.data.schema import DataError
    from fedrec.common.data.stats import describe

    config = data_config(dataset, data_dir, columns, items_file, synthetic, None)
    try:
        summary = describe(config.load())
    except (DataError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from err
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    table = Table(title=f"dataset {summary['name']}: valid", show_header=False)
    for key in ("interactions", "users", "items_in_catalogue", "items_with_interactions"):
        table.add_row(key.replace("_", " "), f"{summary[key]:,}")
    table.add_row("repeat interactions", f"{summary['repeat_interactions']:,}")
    table.add_row("sparsity", f"{summary['sparsity']:.5f}")
    if "time_span" in summary:
        span = summary["time_span"]
        table.add_row("time span", f"{span['first']} .. {span['last']} ({span['days']:.1f} days)")
        per_user = summary["interactions_per_user"]
        table.add_row(
            "interactions per user",
            f"min {per_user['min']}, median {per_user['median']:g}, mean {per_user['mean']:.2f}, "
            f"p90 {per_user['p90']:g}, max {per_user['max']}",
        )
        hist = ", ".join(f"{k}: {v:,}" for k, v in per_user["histogram"].items())
        table.add_row("users by history length", hist)
        table.add_row("users with >= 5", f"{per_user['users_with_at_least_5']:,}")
    if "ratings" in summary:
        table.add_row("ratings", ", ".join(f"{k}: {v}" for k, v in summary["ratings"].items()))
    console.print(table)

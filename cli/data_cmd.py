"""`fedrec data`: load, validate and describe a dataset."""

from __future__ import annotations

import json
from pathlib import Path
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
    export_split: Annotated[
        Path | None,
        typer.Option(
            "--export-split",
            help="also write the evaluation split into this folder (known.csv, history.csv, "
            "test.csv, items.csv with external ids), for other libraries to be ranked on "
            "exactly what a run uses",
        ),
    ] = None,
    protocol: Annotated[str, typer.Option(help="the split's protocol: loo | temporal")] = "loo",
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
    if export_split is not None:
        from fedrec.common.data.split_export import export_split as write_split
        from fedrec.common.data.stream import build_stream
        from fedrec.common.protocols import PROTOCOLS

        if protocol not in PROTOCOLS:
            raise fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        written = write_split(build_stream(config.load(), 1, protocol), export_split)
        rows = ", ".join(f"{name}.csv {count:,}" for name, count in written.items())
        typer.echo(f"wrote {export_split}: {rows}", err=as_json)
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

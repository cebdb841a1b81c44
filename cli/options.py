"""Options several commands share, and their one-place conversion into frozen configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedrec.common.config import DataConfig, parse_key_values

DatasetOpt = Annotated[str, typer.Option("--dataset", help="builtin | movielens | csv | synthetic")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="MovieLens directory (u.data or ratings.dat), or a CSV/Parquet file"
    ),
]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="csv: column mapping, e.g. 'user=uid,item=movie,time=ts,rating=stars,time_format=iso'",
    ),
]
ItemsFileOpt = Annotated[
    Path | None,
    typer.Option("--items-file", help="csv: item catalogue file (item id, title, genres)"),
]
SyntheticOpt = Annotated[
    str | None,
    typer.Option(
        "--synthetic",
        help="synthetic: overrides, e.g. 'num_users=10000,num_items=2000,drift=abrupt'",
    ),
]
TextEncoderOpt = Annotated[
    str | None,
    typer.Option(
        "--text-encoder", help="minilm (pretrained, default) | hashing (default for synthetic)"
    ),
]


def data_config(
    dataset: str,
    data_dir: Path | None,
    columns: str | None,
    items_file: Path | None,
    synthetic: str | None,
    text_encoder: str | None,
) -> DataConfig:
    try:
        return DataConfig(
            dataset=dataset,
            path=None if data_dir is None else str(data_dir),
            columns=parse_key_values(columns, "--columns"),
            items_path=None if items_file is None else str(items_file),
            synthetic=parse_key_values(synthetic, "--synthetic"),
            text_encoder=text_encoder or ("hashing" if dataset == "synthetic" else "minilm"),
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def fail(message: str) -> typer.Exit:
    """Print a clear error on stderr and return the exit to raise (status 2 = bad input)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(2)

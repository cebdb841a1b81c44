"""Frozen configuration objects shared by every command, parsed in exactly one place each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from fedrec.common.data.schema import DataError, Dataset

DATASETS = ("builtin", "movielens", "csv", "synthetic")
# --columns keys of a CSV dataset -> `load_csv` arguments
CSV_COLUMNS = {
    "user": "user_col",
    "item": "item_col",
    "time": "time_col",
    "rating": "rating_col",
    "time_format": "time_format",
}


def parse_key_values(text: str | None, what: str) -> dict[str, str]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'}, with an error that names `what` on bad input."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load. `builtin` needs nothing; the others read the user's files."""

    dataset: str = "builtin"
    path: str | None = None  # a MovieLens directory, or a CSV/Parquet file
    columns: dict[str, str] = field(default_factory=dict)  # csv: user=, item=, time=, rating=
    items_path: str | None = None  # csv: optional item catalogue file
    synthetic: dict[str, str] = field(default_factory=dict)  # SyntheticConfig overrides
    text_encoder: str = "minilm"  # "hashing" is the default for synthetic catalogues

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if self.dataset in ("movielens", "csv") and not self.path:
            raise ValueError(f"--dataset {self.dataset} needs --data-dir PATH")
        if self.dataset == "csv":
            unknown = set(self.columns) - set(CSV_COLUMNS)
            if unknown:
                raise ValueError(
                    f"--columns: unknown keys {sorted(unknown)}; use {sorted(CSV_COLUMNS)}"
                )

    def load(self) -> Dataset:
        from fedrec.common.data.loaders import load_dataset
        from fedrec.common.data.synthetic import SyntheticConfig

        if self.dataset == "csv":
            # checked here, not at construction: a device names its data without columns and
            # never loads it (it builds the model from the public catalogue file)
            missing = [k for k in ("user", "item", "time") if not self.columns.get(k)]
            if missing:
                raise DataError(
                    f"--dataset csv needs --columns naming the {', '.join(missing)} column(s), "
                    "e.g. --columns user=userId,item=movieId,time=timestamp"
                )
            options = {CSV_COLUMNS[k]: v for k, v in self.columns.items()}
            return load_dataset("csv", self.path, items_path=self.items_path, **options)
        if self.dataset == "synthetic":
            typed = _typed(SyntheticConfig, self.synthetic)
            return load_dataset("synthetic", None, **dataclasses.asdict(typed))
        return load_dataset(self.dataset, self.path)


def _typed(cls, values: dict[str, str]):
    """Build a frozen dataclass from string values, converting each to its field's default type."""
    by_name = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(by_name)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(by_name)}")
    defaults = cls()
    kwargs = {}
    for key, raw in values.items():
        kind = type(getattr(defaults, key))
        try:
            kwargs[key] = kind(raw) if kind is not bool else raw.lower() in ("1", "true", "yes")
        except ValueError as err:
            raise ValueError(
                f"{cls.__name__}.{key}: cannot read {raw!r} as {kind.__name__}"
            ) from err
    return cls(**kwargs)

"""Loaders: the built-in MovieTweetings 40K, MovieLens (100k, 1M/10M, 20M/25M/latest), CSV/Parquet.

Every loader returns a fully validated `Dataset` or raises `DataError` naming the file, the
1-based line and the problem; nothing half-loaded escapes. Parsing is vectorized (split lines,
numpy casts, in blocks so a 10M-row file never exists as one Python list); when a fast cast fails a
line-by-line pass over that block finds the exact line for the message.

Index conventions, chosen so that indices never depend on the row order of the ratings file:
- items: catalogue order (the row order of movies.dat / u.item / the items file). Without an
  items file the catalogue is the set of items seen, ordered like users.
- users: sorted by id, numerically when every id is a decimal integer ("2" before "10"),
  otherwise lexicographically.
- duplicate (user, item) pairs are kept: in MovieTweetings and in streams they are repeat
  interactions (a re-rating, a re-watch); dropping them is a modelling choice made later.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import numpy as np

from fedrec.common.data.schema import Catalogue, DataError, Dataset, Interactions, quoted
from fedrec.common.data.synthetic import SyntheticConfig, generate_synthetic

BUILTIN_NAME = "movietweetings-40k"
MOVIELENS_100K_GENRES = tuple(
    "unknown|Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|"
    "Film-Noir|Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western".split("|")
)  # the flag order of u.item, used when u.genre is absent
_CHUNK_CHARS = 1 << 23  # text per block: bounds peak memory on 10M-line files
_YEAR = re.compile(r"\((\d{4})\)")
# a control character in an id is corruption, never part of a real id; numpy's str arrays would
# even drop a trailing NUL and match "12\x00" to item "12"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ID_COLUMNS = frozenset({"user", "item", "id"})
# what an integer column may hold: timestamps a date can show (0001-01-01 .. 9999-12-31 UTC,
# so every later date conversion works), anything else the int64 range
_INT64 = (-(2**63), 2**63 - 1)
_RANGES = {"timestamp": (-62_135_596_800, 253_402_300_799)}
# a column is kept as text ("str"), dropped ("skip"), or parsed as a number: "rating" to float32,
# "timestamp" (Unix seconds) and "index" to int64; the kind also names the value in messages
_Kind = Literal["str", "skip", "rating", "timestamp", "index"]
_RATINGS: list[tuple[str, _Kind]] = [
    ("user", "str"),
    ("item", "str"),
    ("rating", "rating"),
    ("time", "timestamp"),
]  # u.data, ratings.dat


class _Source(Protocol):
    """A `Path` or an importlib.resources `Traversable`: all a reader needs."""

    name: str

    def open(self, mode: str) -> Any: ...


@dataclass(frozen=True)
class _Where:
    """Where parsed rows came from, so any later check can still name the line."""

    path: str
    lines: np.ndarray  # (N,) 1-based line (or Parquet row) of each parsed row
    unit: str = "line"

    def fail(self, row: int, problem: str) -> NoReturn:
        n = int(self.lines[row])
        if self.unit == "line":
            raise DataError(problem, path=self.path, line=n)
        raise DataError(f"{self.unit} {n}: {problem}", path=self.path)


@dataclass(frozen=True)
class _Table:
    columns: dict[str, np.ndarray]
    where: _Where


# ---- public loaders -------------------------------------------------------------------------


def load_builtin() -> Dataset:
    """The shipped MovieTweetings 40K snapshot (40,000 ratings 0-10, 9,063 users, 6,798 movies)."""
    folder = resources.files("fedrec.common.data") / "builtin"
    return _load_dat(folder / "ratings.dat.gz", folder / "movies.dat.gz", name=BUILTIN_NAME)


def load_movielens(directory: str | Path) -> Dataset:
    """A MovieLens release directory; the format is detected from the files present.

    100k (`u.data` + `u.item`, genres from `u.genre` if present), 1M/10M (`ratings.dat` +
    `movies.dat`, UTF-8 or latin-1) and 20M/25M/latest (`ratings.csv` + `movies.csv`).
    The dataset is named after the directory (e.g. "ml-1m").
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataError("not a directory (expected a MovieLens release folder)", path=d)
    name = d.resolve().name
    if (d / "u.data").exists():
        return _load_movielens_100k(d, name)
    if (d / "ratings.dat").exists():
        _require(d / "movies.dat", "the 1M/10M format needs movies.dat beside ratings.dat")
        return _load_dat(d / "ratings.dat", d / "movies.dat", name=name)
    if (d / "ratings.csv").exists():
        _require(d / "movies.csv", "the 20M/latest format needs movies.csv beside ratings.csv")
        ds = load_csv(
            d / "ratings.csv",
            user_col="userId",
            item_col="movieId",
            time_col="timestamp",
            rating_col="rating",
            items_path=d / "movies.csv",
            name=name,
        )
        genres = tuple("" if g == "(no genres listed)" else g for g in ds.catalogue.genres)
        cat = Catalogue(ds.catalogue.item_ids, ds.catalogue.titles, genres, ds.catalogue.years)
        return Dataset(name, ds.interactions, cat, ds.user_ids)
    raise DataError(
        "no MovieLens files found; looked for u.data + u.item (100k), ratings.dat + movies.dat "
        "(1M/10M) and ratings.csv + movies.csv (20M/25M/latest)",
        path=d,
    )


def load_csv(
    path: str | Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    rating_col: str | None = None,
    items_path: str | Path | None = None,
    item_id_col: str | None = None,
    title_col: str = "title",
    genres_col: str | None = "genres",
    time_format: Literal["unix", "iso"] = "unix",
    name: str | None = None,
) -> Dataset:
    """Interactions from a CSV/TSV (optionally .gz) or Parquet file, chosen by suffix.

    `items_path` (same formats) gives the catalogue: `item_id_col` (default: `item_col`),
    `title_col` and `genres_col` (None: no genres). Without it the catalogue is the items seen,
    titled by their ids. `time_format="iso"` reads ISO 8601 dates; naive ones are taken as UTC.
    Parquet timestamp columns are read as Unix seconds whatever `time_format` says.
    """
    if time_format not in ("unix", "iso"):
        raise ValueError(f"time_format must be 'unix' or 'iso', got {time_format!r}")
    path = Path(path)
    cols = {"user": user_col, "item": item_col, "time": time_col}
    if rating_col is not None:
        cols["rating"] = rating_col
    table = _read_tabular(path, cols)
    where = table.where
    timestamps = (
        _parse_iso(table.columns["time"], where)
        if time_format == "iso"
        else _parse_numbers(table.columns["time"], where, what="timestamp", integer=True)
    )
    ratings = None
    if rating_col is not None:
        ratings = _parse_numbers(table.columns["rating"], where, what="rating", integer=False)
    for role in ("user", "item"):
        table.columns[role] = _as_ids(table.columns[role], where, role)
    if items_path is None:
        item_ids, item_index = _dense_ids(table.columns["item"])
        catalogue = Catalogue(item_ids, tuple(item_ids.tolist()), ("",) * len(item_ids))
    else:
        item_cols = {"id": item_id_col or item_col, "title": title_col}
        if genres_col is not None:
            item_cols["genres"] = genres_col
        items = _read_tabular(Path(items_path), item_cols)
        catalogue = _catalogue(items, ids=_as_ids(items.columns["id"], items.where, "item"))
        item_index = _lookup(catalogue.item_ids, table.columns["item"], where)
    user_ids, user_index = _dense_ids(table.columns["user"])
    inter = Interactions(user_index, item_index, timestamps, ratings)
    return Dataset(name or path.name.split(".")[0], inter, catalogue, user_ids)


def load_dataset(kind: str, path: str | Path | None = None, **options: Any) -> Dataset:
    """One entry point for configs: kind is "builtin", "movielens", "csv" or "synthetic".

    `options` go to `load_csv` (csv) or `SyntheticConfig` (synthetic).
    """
    if kind == "builtin":
        _no_options(kind, path, options)
        return load_builtin()
    if kind == "movielens":
        if path is None:
            raise ValueError("dataset kind 'movielens' needs a path to the release directory")
        _no_options(kind, None, options)
        return load_movielens(path)
    if kind == "csv":
        if path is None:
            raise ValueError("dataset kind 'csv' needs a path to the interactions file")
        return load_csv(path, **options)
    if kind == "synthetic":
        _no_options(kind, path, {})
        try:
            cfg = SyntheticConfig(**options)
        except TypeError as e:
            raise ValueError(f"bad synthetic dataset options {sorted(options)}: {e}") from e
        return generate_synthetic(cfg)
    raise ValueError(f"unknown dataset kind {kind!r}; expected builtin, movielens, csv, synthetic")


# ---- format-specific assembly ---------------------------------------------------------------


def _load_dat(ratings: _Source, movies: _Source, *, name: str) -> Dataset:
    """`user::item::rating::ts` + `item::Title (Year)::Genre|Genre` (MovieTweetings, ML-1M/10M)."""
    items = _read_delimited(
        movies, sep="::", columns=[("id", "str"), ("title", "str"), ("genres", "str")]
    )
    catalogue = _catalogue(items, ids=items.columns["id"])
    return _assemble(_read_delimited(ratings, sep="::", columns=_RATINGS), catalogue, name)


def _load_movielens_100k(d: Path, name: str) -> Dataset:
    _require(d / "u.item", "the 100k format needs u.item beside u.data")
    genre_names = MOVIELENS_100K_GENRES
    if (d / "u.genre").exists():
        g = _read_delimited(d / "u.genre", sep="|", columns=[("name", "str"), ("index", "index")])
        genre_names = tuple(
            g.columns["name"][np.argsort(g.columns["index"], kind="stable")].tolist()
        )
    spec: list[tuple[str, _Kind]] = [
        ("id", "str"),
        ("title", "str"),
        ("release", "str"),
        ("video", "skip"),
        ("url", "skip"),
    ]
    spec += [(f"genre{j}", "str") for j in range(len(genre_names))]
    items = _read_delimited(d / "u.item", sep="|", columns=spec)
    flags = np.stack([items.columns[f"genre{j}"] == "1" for j in range(len(genre_names))], axis=1)
    genres = ["|".join(n for n, f in zip(genre_names, row, strict=True) if f) for row in flags]
    release_years = [int(r[-4:]) if r[-4:].isdigit() else 0 for r in items.columns["release"]]
    catalogue = _catalogue(items, ids=items.columns["id"], genres=genres, years=release_years)
    return _assemble(_read_delimited(d / "u.data", sep="\t", columns=_RATINGS), catalogue, name)


def _assemble(table: _Table, catalogue: Catalogue, name: str) -> Dataset:
    item_index = _lookup(catalogue.item_ids, table.columns["item"], table.where)
    user_ids, user_index = _dense_ids(_as_ids(table.columns["user"], table.where, "user"))
    cols = table.columns
    inter = Interactions(user_index, item_index, cols["time"], cols.get("rating"))
    return Dataset(name, inter, catalogue, user_ids)


def _catalogue(
    items: _Table,
    *,
    ids: np.ndarray,
    genres: Sequence[str] | None = None,
    years: Sequence[int] | None = None,
) -> Catalogue:
    """Checks ids are unique, then parses years from "Title (1995)" (else `years`, else 0)."""
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(dup):
        row = int(order[1:][dup].min())
        first = int(np.flatnonzero(ids == ids[row])[0])
        items.where.fail(
            row,
            f"duplicate item id {quoted(ids[row])} in the catalogue "
            f"(first on {items.where.unit} {int(items.where.lines[first])})",
        )
    titles = tuple(str(t) for t in items.columns["title"].tolist())
    if genres is None:
        g = items.columns.get("genres")
        genres = ("",) * len(titles) if g is None else tuple(str(x) for x in g.tolist())
    parsed = [_year(t) for t in titles]
    fallback = years if years is not None else [0] * len(titles)
    year_arr = np.array([p or f for p, f in zip(parsed, fallback, strict=True)], dtype=np.int32)
    return Catalogue(ids, titles, tuple(genres), year_arr)


def _year(title: str) -> int:
    found = _YEAR.findall(title)
    return int(found[-1]) if found else 0


def _lookup(catalogue_ids: np.ndarray, values: np.ndarray, where: _Where) -> np.ndarray:
    """Dense catalogue index of each id; an id not in the catalogue is an error on its line."""
    sorter = np.argsort(catalogue_ids, kind="stable")
    pos = np.searchsorted(catalogue_ids, values, sorter=sorter)
    index = sorter[np.minimum(pos, len(sorter) - 1)]
    found = catalogue_ids[index] == values
    if not found.all():
        row = int(np.argmin(found))
        where.fail(row, f"unknown item {quoted(values[row])}: not in the catalogue")
    return index.astype(np.int64)


def _dense_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, dense index per value); numeric order when all ids are integers."""
    uniq, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    if len(uniq) and np.char.str_len(uniq).max() <= 18 and np.char.isdigit(uniq).all():
        with contextlib.suppress(ValueError):  # exotic Unicode digits: keep lexicographic order
            order = np.lexsort((uniq, uniq.astype(np.int64)))
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            return uniq[order], rank[inverse]
    return uniq, inverse


# ---- parsing --------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_text(source: _Source, encoding: str, newline: str | None) -> Iterator[io.TextIOBase]:
    with source.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if source.name.endswith(".gz") else raw
        with io.TextIOWrapper(stream, encoding=encoding, newline=newline) as text:
            yield text


def _require(path: Path, why: str) -> None:
    if not path.exists():
        raise DataError(f"file not found ({why})", path=path)


def _read_delimited(source: _Source, *, sep: str, columns: Sequence[tuple[str, _Kind]]) -> _Table:
    """A headerless `sep`-separated file; tries UTF-8, then latin-1 (MovieLens 1M, 100k)."""
    try:
        return _read_delimited_as(source, sep, columns, "utf-8")
    except UnicodeDecodeError:
        return _read_delimited_as(source, sep, columns, "latin-1")


def _read_delimited_as(
    source: _Source, sep: str, columns: Sequence[tuple[str, _Kind]], encoding: str
) -> _Table:
    path, n = str(source), len(columns)
    parts: dict[str, list[np.ndarray]] = {c: [] for c, kind in columns if kind != "skip"}
    line_parts: list[np.ndarray] = []
    seen = 0
    with _open_text(source, encoding, newline=None) as text:
        while block := text.read(_CHUNK_CHARS):
            if not block.endswith("\n"):
                block += text.readline()  # blocks end on a line boundary
            lines = block.split("\n")
            if lines[-1] == "":
                lines.pop()  # after the final newline
            numbers = np.arange(seen + 1, seen + 1 + len(lines))
            seen += len(lines)
            # one C-level split of the whole block, once every line is known to have n fields
            seps = np.fromiter(map(str.count, lines, repeat(sep)), np.int64, len(lines))
            bad = np.flatnonzero(seps != n - 1)
            for i in bad:  # blank lines are skipped, anything else is an error
                if lines[i] != "":
                    raise DataError(
                        f"expected {n} fields separated by {sep!r}, found {seps[i] + 1}",
                        path=path,
                        line=int(numbers[i]),
                    )
            if len(bad):
                keep = np.ones(len(lines), dtype=bool)
                keep[bad] = False
                lines, numbers = [lines[i] for i in np.flatnonzero(keep)], numbers[keep]
            if not lines:
                continue
            flat = sep.join(lines).split(sep) if len(bad) else _fields(block, sep)
            where = _Where(path, numbers)
            for j, (col, kind) in enumerate(columns):
                if kind == "str":
                    if col in _ID_COLUMNS:
                        _check_ids(flat[j::n], where, col)
                    parts[col].append(np.array(flat[j::n], dtype=str))
                elif kind != "skip":
                    values = flat[j::n]
                    integer = kind != "rating"
                    parts[col].append(_parse_numbers(values, where, what=kind, integer=integer))
            line_parts.append(numbers)
    if not line_parts:
        raise DataError("empty file", path=path)
    cols = {c: np.concatenate(p) for c, p in parts.items()}
    return _Table(cols, _Where(path, np.concatenate(line_parts)))


def _fields(block: str, sep: str) -> list[str]:
    """All fields of a block of well-formed lines, in row-major order."""
    return block.removesuffix("\n").replace("\n", sep).split(sep)


def _read_tabular(path: Path, columns: dict[str, str]) -> _Table:
    """The named columns (role -> header name) of a CSV/TSV(.gz) or Parquet file, as read."""
    suffix = path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
    if not path.exists():
        raise DataError("file not found", path=path)
    if suffix in ("parquet", "pq"):
        return _read_parquet(path, columns)
    if suffix not in ("csv", "tsv"):
        raise DataError(
            "unsupported file type; expected .csv, .tsv (optionally .gz) or .parquet", path=path
        )
    try:
        return _read_csv_as(path, columns, "\t" if suffix == "tsv" else ",", "utf-8-sig")
    except UnicodeDecodeError:
        return _read_csv_as(path, columns, "\t" if suffix == "tsv" else ",", "latin-1")


def _read_csv_as(path: Path, columns: dict[str, str], delimiter: str, encoding: str) -> _Table:
    with _open_text(path, encoding, newline="") as text:
        reader = csv.reader(text, delimiter=delimiter)
        try:
            return _read_csv_rows(reader, path, columns)
        except csv.Error as err:  # e.g. a field over csv.field_size_limit() (131,072 characters)
            raise DataError(f"unreadable CSV: {err}", path=path, line=reader.line_num) from err


def _read_csv_rows(reader: Any, path: Path, columns: dict[str, str]) -> _Table:
    header = next(reader, None)
    if header is None:
        raise DataError("empty file", path=path)
    index = _column_index(header, columns, path, line=1)
    rows, lines = [], []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"expected {len(header)} fields (as in the header), found {len(row)}",
                path=path,
                line=reader.line_num,
            )
        rows.append(row)
        lines.append(reader.line_num)
    if not rows:
        raise DataError("no data rows after the header", path=path)
    where = _Where(str(path), np.array(lines, dtype=np.int64))
    cols = {}
    for role, i in index.items():
        values = [r[i] for r in rows]
        if role in _ID_COLUMNS:
            _check_ids(values, where, role)
        cols[role] = np.array(values, dtype=str)
    return _Table(cols, where)


def _read_parquet(path: Path, columns: dict[str, str]) -> _Table:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(
            "reading Parquet needs pyarrow: pip install 'fedrec[parquet]'", path=path
        ) from e
    try:
        file = pq.ParquetFile(path)
        _column_index(file.schema_arrow.names, columns, path, line=None)
        table = file.read(columns=list(dict.fromkeys(columns.values())))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"not a readable Parquet file ({e})", path=path) from e
    if table.num_rows == 0:
        raise DataError("no rows", path=path)
    where = _Where(str(path), np.arange(1, table.num_rows + 1), unit="row")
    cols = {}
    for role, name in columns.items():
        col = table.column(name)
        if col.null_count:
            where.fail(
                int(np.argmax(pc.is_null(col).to_numpy(zero_copy_only=False))),
                f"missing value in column {name!r}",
            )
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
        cols[role] = col.to_numpy(zero_copy_only=False)
    return _Table(cols, where)


def _column_index(
    header: Sequence[str], columns: dict[str, str], path: Path, line: int | None
) -> dict[str, int]:
    names = list(header)
    for name in columns.values():
        if name not in names:
            shown = ", ".join(quoted(n, 40) for n in names[:20]) + (
                ", ..." if len(names) > 20 else ""
            )
            raise DataError(
                f"missing column {quoted(name)}; the header has [{shown}]", path=path, line=line
            )
    return {role: names.index(name) for role, name in columns.items()}


def _as_ids(values: np.ndarray, where: _Where, role: str) -> np.ndarray:
    """Ids as strings (Parquet may store them as integers); an empty id is an error."""
    if values.dtype.kind == "O":  # Parquet strings, before numpy's str cast could drop a NUL
        _check_ids(values.tolist(), where, role)
    ids = values if values.dtype.kind == "U" else values.astype(str)
    if len(ids) and (empty := np.char.str_len(ids) == 0).any():
        where.fail(int(np.argmax(empty)), f"empty {role} id")
    return ids


def _parse_numbers(values: Sequence[Any], where: _Where, *, what: str, integer: bool) -> np.ndarray:
    """int64 (integer=True, decimals floored) or float32; the first bad value names its line.

    An integer out of its kind's range (`_RANGES`) is an error, never a wrapped int64."""
    low, high = _RANGES.get(what, _INT64)
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "biu" or (values.dtype.kind == "f" and not integer):
            out = values.astype(np.float32 if not integer else np.int64)
            if integer and values.size and (values.min() < low or values.max() > high):
                values = values.tolist()  # the line-by-line pass names the value
            elif integer or np.isfinite(out).all():
                return out
        if isinstance(values, np.ndarray):
            values = values.tolist()  # map(int, list) beats numpy's own string casts
    if integer:
        with contextlib.suppress(ValueError, OverflowError, TypeError):
            out = np.fromiter(map(int, values), np.int64, len(values))
            if not len(out) or (out.min() >= low and out.max() <= high):
                return out
    with contextlib.suppress(ValueError, OverflowError, TypeError):
        floats = np.fromiter(map(float, values), np.float64, len(values))
        if not integer and np.isfinite(floats).all():
            return floats.astype(np.float32)
        if integer and len(floats) and floats.min() >= low and floats.max() <= high:
            return np.floor(floats).astype(np.int64)
    for row, value in enumerate(values):
        try:
            number = float(value)
        except (ValueError, OverflowError, TypeError):
            number = math.nan
        if not math.isfinite(number):
            where.fail(row, f"{what} {quoted(value)} is not a number")
        if integer:
            with contextlib.suppress(ValueError, TypeError):
                number = int(value)  # exact, where a float would round the range's edge
            if not low <= number <= high:
                where.fail(row, f"{what} {quoted(value)} is out of range [{low}, {high}]")
    raise AssertionError("unreachable: a cast failed but every value parsed")


def _parse_iso(values: np.ndarray, where: _Where) -> np.ndarray:
    """ISO 8601 dates to Unix seconds; naive dates are UTC; integers pass through."""
    if values.dtype.kind in "iu":
        return _parse_numbers(values, where, what="timestamp", integer=True)
    out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values.tolist()):
        text = str(value).strip()
        try:
            dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            where.fail(row, f"timestamp {quoted(text)} is not an ISO 8601 date")
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        out[row] = math.floor(dt.timestamp())
    return out


def _check_ids(values: Sequence[str], where: _Where, role: str) -> None:
    """An id with a control character (a NUL, a stray escape) is an error on its line."""
    if _CONTROL.search("".join(values)) is None:
        return
    row = next(i for i, v in enumerate(values) if _CONTROL.search(v))
    what = "item" if role == "id" else role  # a catalogue's id column
    where.fail(row, f"{what} id {quoted(values[row])} contains a control character")


def _no_options(kind: str, path: str | Path | None, options: dict[str, Any]) -> None:
    if path is not None or options:
        raise ValueError(f"dataset kind {kind!r} takes no path or options, got {path!r}, {options}")

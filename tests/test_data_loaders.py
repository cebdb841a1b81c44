"""Loaders on tiny files written here, on the built-in data, and on each kind of bad input."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedrec.common.data import loaders
from fedrec.common.data.loaders import load_builtin, load_csv, load_dataset, load_movielens
from fedrec.common.data.schema import DataError, Dataset


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def external(ds: Dataset) -> list[tuple[str, str, int, float | None]]:
    """Rows as (user id, item id, timestamp, rating): what the file said, index-free."""
    x = ds.interactions
    ratings = [None] * len(x) if x.rating is None else x.rating.tolist()
    return list(
        zip(
            ds.user_ids[x.user].tolist(),
            ds.catalogue.item_ids[x.item].tolist(),
            x.timestamp.tolist(),
            ratings,
            strict=True,
        )
    )


# ---- the built-in data ----------------------------------------------------------------------


def test_builtin_counts_and_types(builtin_dataset: Dataset) -> None:
    ds = builtin_dataset
    x = ds.interactions
    assert ds.name == "movietweetings-40k"
    assert (len(x), ds.num_users, ds.num_items) == (40_000, 9_063, 6_798)
    assert x.user.dtype == x.item.dtype == x.timestamp.dtype == np.int64
    assert x.rating is not None and x.rating.dtype == np.float32
    assert 0 <= x.rating.min() and x.rating.max() <= 10
    assert x.user.max() == ds.num_users - 1 and x.item.max() < ds.num_items
    # first line of ratings.dat: 1::1074638::7::1365029107
    assert external(ds)[0] == ("1", "1074638", 1365029107, 7.0)
    # users in numeric id order, items in movies.dat order
    assert np.all(np.diff(ds.user_ids.astype(np.int64)) > 0)
    assert ds.catalogue.item_ids[0] == "0002844"
    assert ds.catalogue.titles[0] == "Fantômas - À l'ombre de la guillotine (1913)"
    assert ds.catalogue.genres[0] == "Crime|Drama"
    assert ds.catalogue.years[0] == 1913 and np.all(ds.catalogue.years > 1800)
    assert sum(g == "" for g in ds.catalogue.genres) > 0  # empty genre fields are kept as ""


def test_builtin_is_fast() -> None:
    start = time.perf_counter()
    load_builtin()
    assert time.perf_counter() - start < 1.0


# ---- MovieLens ------------------------------------------------------------------------------

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Café Society|01-Jan-1996||http://x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "3|unknown|||http://x|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)
U_DATA = "10\t1\t5\t881250949\n2\t2\t3\t891717742\n2\t1\t4\t878887116\n"


def ml100k(tmp_path: Path, genre_file: bool = True) -> Path:
    write(tmp_path / "u.data", U_DATA)
    write(tmp_path / "u.item", U_ITEM, encoding="latin-1")
    if genre_file:
        names = list(loaders.MOVIELENS_100K_GENRES)
        names[4] = "Kids"
        write(tmp_path / "u.genre", "".join(f"{n}|{j}\n" for j, n in enumerate(names)) + "\n")
    return tmp_path


@pytest.mark.parametrize("genre_file", [True, False])
def test_movielens_100k(tmp_path: Path, genre_file: bool) -> None:
    ds = load_movielens(ml100k(tmp_path, genre_file))
    kids = "Kids" if genre_file else "Children's"
    assert ds.name == tmp_path.name
    assert ds.catalogue.item_ids.tolist() == ["1", "2", "3"]
    assert ds.catalogue.titles == ("Toy Story (1995)", "Café Society", "unknown")
    assert ds.catalogue.genres == (f"Animation|{kids}|Comedy", "Action", "unknown")
    assert ds.catalogue.years.tolist() == [1995, 1996, 0]  # title, else release date, else 0
    assert ds.user_ids.tolist() == ["2", "10"]  # numeric order, not "10" < "2"
    assert external(ds) == [
        ("10", "1", 881250949, 5.0),
        ("2", "2", 891717742, 3.0),
        ("2", "1", 878887116, 4.0),
    ]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_movielens_1m(tmp_path: Path, encoding: str) -> None:
    write(
        tmp_path / "movies.dat",
        "1::Toy Story (1995)::Animation|Comedy\n2::Amélie (2001)::\n",
        encoding,
    )
    write(tmp_path / "ratings.dat", "1::2::5::978300760\r\n1::1::3.5::978302109\r\n")
    ds = load_movielens(tmp_path)
    assert ds.catalogue.titles == ("Toy Story (1995)", "Amélie (2001)")
    assert ds.catalogue.genres == ("Animation|Comedy", "")
    assert ds.catalogue.years.tolist() == [1995, 2001]
    assert external(ds) == [("1", "2", 978300760, 5.0), ("1", "1", 978302109, 3.5)]


def test_movielens_latest_csv(tmp_path: Path) -> None:
    write(
        tmp_path / "movies.csv",
        'movieId,title,genres\n1,"Heat, The (1995)",Action\n5,X,(no genres listed)\n',
    )
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n3,5,4.0,100\n1,1,2.5,50\n")
    ds = load_movielens(tmp_path)
    assert ds.catalogue.titles == ("Heat, The (1995)", "X")
    assert ds.catalogue.genres == ("Action", "")
    assert external(ds) == [("3", "5", 100, 4.0), ("1", "1", 50, 2.5)]


def test_movielens_chunked_reading_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = load_movielens(ml100k(tmp_path))
    monkeypatch.setattr(loaders, "_CHUNK_CHARS", 8)
    chunked = load_movielens(tmp_path)
    assert external(chunked) == external(whole)
    assert chunked.catalogue.titles == whole.catalogue.titles


def test_movielens_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=rf"{tmp_path.name}: no MovieLens files.*u\.data.*ratings\.dat"
    ):
        load_movielens(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_movielens(tmp_path / "missing")


def test_movielens_missing_companion(tmp_path: Path) -> None:
    write(tmp_path / "ratings.dat", "1::1::5::1\n")
    with pytest.raises(DataError, match=r"movies\.dat: file not found"):
        load_movielens(tmp_path)


# ---- CSV and Parquet ------------------------------------------------------------------------

COLS = {"user_col": "user", "item_col": "item", "time_col": "ts"}


def test_csv_with_items_file(tmp_path: Path) -> None:
    items = write(tmp_path / "items.csv", "item_id,title,genres\nb,Beta (2001),Drama\na,Alpha,\n")
    data = write(
        tmp_path / "events.csv", "user,item,ts,stars\nu2,a,20,1\nu1,b,10.0,2\n\nu1,a,30,3\n"
    )
    ds = load_csv(data, **COLS, rating_col="stars", items_path=items, item_id_col="item_id")
    assert ds.name == "events"
    assert ds.catalogue.item_ids.tolist() == ["b", "a"]  # items-file order
    assert ds.catalogue.years.tolist() == [2001, 0]
    assert ds.user_ids.tolist() == ["u1", "u2"]
    assert external(ds) == [("u2", "a", 20, 1.0), ("u1", "b", 10, 2.0), ("u1", "a", 30, 3.0)]


def test_csv_without_items_file_and_iso_time(tmp_path: Path) -> None:
    data = write(
        tmp_path / "e.tsv",
        "user\titem\tts\n1\t10\t1970-01-01T00:01:40Z\n1\t9\t1970-01-01 00:00:50\n",
    )
    ds = load_csv(data, **COLS, time_format="iso")
    assert ds.catalogue.item_ids.tolist() == ["9", "10"]  # items seen, numeric id order
    assert ds.catalogue.titles == ("9", "10")
    assert ds.interactions.rating is None
    assert external(ds) == [("1", "10", 100, None), ("1", "9", 50, None)]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    events = pa.table(
        {
            "user": [7, 3],
            "item": ["x", "y"],
            "ts": pa.array([100_000, 50_000], type=pa.timestamp("ms")),
        }
    )
    pq.write_table(events, tmp_path / "e.parquet")
    pq.write_table(pa.table({"item_id": ["y", "x"], "title": ["Y", "X"]}), tmp_path / "i.parquet")
    ds = load_csv(
        tmp_path / "e.parquet",
        **COLS,
        items_path=tmp_path / "i.parquet",
        item_id_col="item_id",
        genres_col=None,
    )
    assert ds.catalogue.item_ids.tolist() == ["y", "x"]
    assert external(ds) == [("7", "x", 100, None), ("3", "y", 50, None)]

    pq.write_table(
        pa.table({"user": ["a", None], "item": ["x", "y"], "ts": [1, 2]}), tmp_path / "n.parquet"
    )
    with pytest.raises(DataError, match=r"n\.parquet: row 2: missing value in column 'user'"):
        load_csv(tmp_path / "n.parquet", **COLS)
    with pytest.raises(DataError, match=r"e\.parquet: missing column 'rating'"):
        load_csv(tmp_path / "e.parquet", **COLS, rating_col="rating")


# ---- malformed input: the message names the file, the line and the problem ------------------

MOVIES = "1::A (2000)::Drama\n2::B (2001)::Comedy\n"


@pytest.mark.parametrize(
    ("ratings", "pattern"),
    [
        (
            "1::1::5::10\n1::2::5\n",
            r"ratings\.dat, line 2: expected 4 fields separated by '::', found 3",
        ),
        (
            "1::1::5::10\n1::2::5::11\n1::1::4::abc\n",
            r"ratings\.dat, line 3: timestamp 'abc' is not a number",
        ),
        ("1::1::five::10\n", r"ratings\.dat, line 1: rating 'five' is not a number"),
        ("1::1::nan::10\n", r"ratings\.dat, line 1: rating 'nan' is not a number"),
        (
            "1::1::5::10\n\n1::2::5::11\n1::9::5::12\n",
            r"ratings\.dat, line 4: unknown item '9': not in the catalogue",
        ),
        ("1::1::5::10\n::1::5::10\n", r"ratings\.dat, line 2: empty user id"),
        ("", r"ratings\.dat: empty file"),
        ("\n\n", r"ratings\.dat: empty file"),
    ],
)
def test_malformed_ratings(tmp_path: Path, ratings: str, pattern: str) -> None:
    write(tmp_path / "movies.dat", MOVIES)
    write(tmp_path / "ratings.dat", ratings)
    with pytest.raises(DataError, match=pattern) as err:
        load_movielens(tmp_path)
    assert err.value.path == str(tmp_path / "ratings.dat")


@pytest.mark.parametrize(
    ("movies", "pattern"),
    [
        (
            "1::A::x\n2::B::y\n1::C::z\n",
            r"movies\.dat, line 3: duplicate item id '1' in the catalogue \(first on line 1\)",
        ),
        ("1::A::x\n2::B\n", r"movies\.dat, line 2: expected 3 fields"),
        ("", r"movies\.dat: empty file"),
    ],
)
def test_malformed_movies(tmp_path: Path, movies: str, pattern: str) -> None:
    write(tmp_path / "movies.dat", movies)
    write(tmp_path / "ratings.dat", "1::1::5::10\n")
    with pytest.raises(DataError, match=pattern):
        load_movielens(tmp_path)


def test_error_line_in_a_later_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders, "_CHUNK_CHARS", 8)
    write(tmp_path / "movies.dat", MOVIES)
    write(tmp_path / "ratings.dat", "1::1::5::10\n\n1::1::5::10\n1::1::5::10\n1::1::5::1e\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 5: timestamp '1e'"):
        load_movielens(tmp_path)


def test_malformed_100k(tmp_path: Path) -> None:
    ml100k(tmp_path)
    write(tmp_path / "u.data", "1\t1\t5\t10\n1\t2\t5\n")
    with pytest.raises(DataError, match=r"u\.data, line 2: expected 4 fields separated by '\\t'"):
        load_movielens(tmp_path)


@pytest.mark.parametrize(
    ("events", "options", "pattern"),
    [
        ("user,item\n1,a\n", {}, r"e\.csv, line 1: missing column 'ts'"),
        ("user,item,ts\n1,a,5\n1,a\n", {}, r"e\.csv, line 3: expected 3 fields"),
        ("user,item,ts\n1,a,5\n1,a,x\n", {}, r"e\.csv, line 3: timestamp 'x' is not a number"),
        (
            "user,item,ts\n1,a,2020-13-01\n",
            {"time_format": "iso"},
            r"e\.csv, line 2: timestamp '2020-13-01' is not an ISO",
        ),
        ("user,item,ts\n1,a,5\n,a,6\n", {}, r"e\.csv, line 3: empty user id"),
        (
            "user,item,ts,r\n1,a,5,\n",
            {"rating_col": "r"},
            r"e\.csv, line 2: rating '' is not a number",
        ),
        ("user,item,ts\n", {}, r"e\.csv: no data rows"),
        ("", {}, r"e\.csv: empty file"),
    ],
)
def test_malformed_csv(tmp_path: Path, events: str, options: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_csv(write(tmp_path / "e.csv", events), **COLS, **options)


def test_malformed_csv_items(tmp_path: Path) -> None:
    data = write(tmp_path / "e.csv", "user,item,ts\n1,a,5\n1,c,6\n")
    items = write(tmp_path / "i.csv", "item_id,title,genres\na,A,\nb,B,\n")
    with pytest.raises(DataError, match=r"e\.csv, line 3: unknown item 'c'"):
        load_csv(data, **COLS, items_path=items, item_id_col="item_id")
    write(items, "item_id,title,genres\na,A,\na,B,\n")
    with pytest.raises(DataError, match=r"i\.csv, line 3: duplicate item id 'a'.*first on line 2"):
        load_csv(data, **COLS, items_path=items, item_id_col="item_id")
    write(items, "item_id,name\na,A\n")
    with pytest.raises(DataError, match=r"i\.csv, line 1: missing column 'title'"):
        load_csv(data, **COLS, items_path=items, item_id_col="item_id")
    with pytest.raises(DataError, match=r"e\.json: unsupported file type"):
        load_csv(write(tmp_path / "e.json", "{}"), **COLS)


# ---- out-of-range values, huge fields, control characters -----------------------------------


@pytest.mark.parametrize(
    "stamp", ["99999999999999999999999", "1e300", "-1e20", "253402300800", "9223372036854775808"]
)
def test_out_of_range_timestamps_are_errors_in_every_format(tmp_path: Path, stamp: str) -> None:
    # each used to become the int64 minimum (or wrap) and the run went on with a garbage timeline
    write(tmp_path / "movies.dat", MOVIES)
    write(tmp_path / "ratings.dat", f"1::1::5::10\n1::2::5::{stamp}\n")
    with pytest.raises(DataError, match=rf"ratings\.dat, line 2: timestamp '{stamp}' is out of"):
        load_movielens(tmp_path)
    (tmp_path / "k").mkdir()
    ml100k(tmp_path / "k")
    write(tmp_path / "k" / "u.data", f"1\t1\t5\t{stamp}\n")
    with pytest.raises(DataError, match=r"u\.data, line 1: timestamp .* is out of range"):
        load_movielens(tmp_path / "k")
    events = write(tmp_path / "e.csv", f"user,item,ts\n1,a,5\n1,a,{stamp}\n")
    with pytest.raises(DataError, match=r"e\.csv, line 3: timestamp .* is out of range"):
        load_csv(events, **COLS)


def test_timestamps_at_the_edges_of_the_range_load(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user,item,ts\n1,a,-62135596800\n1,b,253402300799\n")
    assert load_csv(events, **COLS).interactions.timestamp.tolist() == [
        -62_135_596_800,
        253_402_300_799,
    ]


def test_out_of_range_parquet_timestamps_are_errors(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = {"user": ["u", "v"], "item": ["x", "y"], "ts": pa.array([5, 2**62], pa.int64())}
    pq.write_table(pa.table(table), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet: row 2: timestamp '4611686018427387904' is"):
        load_csv(tmp_path / "e.parquet", **COLS)
    with pytest.raises(DataError, match=r"e\.parquet: row 2: timestamp"):
        load_csv(tmp_path / "e.parquet", **COLS, time_format="iso")


def test_a_field_over_the_csv_limit_is_an_error_on_its_line(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", f"user,item,ts\n1,a,5\n2,{'x' * 200_000},6\n")
    with pytest.raises(DataError, match=r"e\.csv, line 3: unreadable CSV: field larger"):
        load_csv(events, **COLS)


def test_messages_cut_a_huge_value(tmp_path: Path) -> None:
    huge = "7" * 100_000 + "z"
    events = write(tmp_path / "e.csv", f"user,item,ts\n1,a,{huge}\n")
    with pytest.raises(DataError) as err:
        load_csv(events, **COLS)
    message = str(err.value)
    assert len(message) < 300 and "(100,001 characters)" in message
    assert message.startswith(f"{events}, line 2: timestamp '7777")


@pytest.mark.parametrize("bad_id", ["a\x00", "a\x00b", "\x1b[2Ja", "a\x7f"])
def test_ids_with_control_characters_are_errors(tmp_path: Path, bad_id: str) -> None:
    # numpy drops a trailing NUL: "a\x00" used to load as item "a"
    events = write(tmp_path / "e.csv", f"user,item,ts\n1,a,5\n1,{bad_id},6\n")
    with pytest.raises(DataError, match=r"e\.csv, line 3: item id .* contains a control char"):
        load_csv(events, **COLS)
    items = write(tmp_path / "i.csv", f"item,title\na,A\n{bad_id},B\n")
    with pytest.raises(DataError, match=r"i\.csv, line 3: item id .* contains a control char"):
        load_csv(write(events, "user,item,ts\n1,a,5\n"), **COLS, items_path=items, genres_col=None)
    write(tmp_path / "movies.dat", MOVIES)
    write(tmp_path / "ratings.dat", f"1::1::5::10\n{bad_id}::2::5::11\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2: user id .* contains a control"):
        load_movielens(tmp_path)


# ---- dispatcher -----------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("builtin", None).num_users == 9_063
    assert load_dataset("movielens", ml100k(tmp_path)).num_items == 3
    csv_path = write(tmp_path / "x.csv", "user,item,ts\n1,a,5\n")
    assert len(load_dataset("csv", csv_path, **COLS).interactions) == 1
    synthetic = load_dataset("synthetic", None, num_users=30, num_items=40, seed=1)
    assert synthetic.num_users == 30 and synthetic.num_items == 40
    with pytest.raises(ValueError, match="unknown dataset kind 'nope'"):
        load_dataset("nope", None)
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("csv", None, **COLS)
    with pytest.raises(ValueError, match="bad synthetic dataset options"):
        load_dataset("synthetic", None, users=3)

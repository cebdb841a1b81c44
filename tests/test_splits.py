"""Filters and splits: exact rows on tiny inputs, invariants on the built-in data."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.common.data.schema import Dataset, Interactions
from fedrec.common.data.splits import (
    filter_min_interactions,
    global_temporal_split,
    leave_last_out,
    recent_window,
    time_windows,
)


def events(rows: list[tuple[int, int, int]]) -> Interactions:
    """(user, item, timestamp) rows; the rating column holds the row number, to trace rows."""
    u, i, t = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    return Interactions(u, i, t, np.arange(len(rows), dtype=np.float32))


def row_ids(x: Interactions) -> list[int]:
    assert x.rating is not None
    return sorted(x.rating.astype(int).tolist())


def test_filter_min_interactions_one_pass_and_k_core() -> None:
    # user 0: items 0,1,2; user 1: items 0,1; user 2: item 3 (item 3 is seen once)
    x = events([(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 4), (1, 1, 5), (2, 3, 6)])
    one = filter_min_interactions(x, min_user=2, min_item=2)
    assert row_ids(one) == [0, 1, 3, 4]  # user 2 and item 2 go; counts from the input
    assert row_ids(filter_min_interactions(x, min_user=3, min_item=2)) == [0, 1]
    # iterative: dropping user 1 leaves items 0 and 1 with one user each -> nothing survives
    assert row_ids(filter_min_interactions(x, min_user=3, min_item=2, iterative=True)) == []
    assert row_ids(filter_min_interactions(x)) == list(range(6))


def test_k_core_on_builtin(builtin_dataset: Dataset) -> None:
    x = filter_min_interactions(
        builtin_dataset.interactions, min_user=5, min_item=5, iterative=True
    )
    assert 0 < len(x) < len(builtin_dataset.interactions)
    assert np.bincount(x.user)[np.unique(x.user)].min() >= 5
    assert np.bincount(x.item)[np.unique(x.item)].min() >= 5


def test_leave_last_out_exact() -> None:
    x = events(
        [
            (0, 5, 10),  # user 0: one event -> train only
            (1, 1, 20), (1, 2, 10),  # user 1: two -> train (t=10) + test (t=20), no valid
            (2, 9, 30), (2, 3, 30), (2, 4, 5), (2, 8, 1),  # tie at t=30 broken by item: 9 is last
        ]
    )  # fmt: skip
    s = leave_last_out(x)
    assert (s.protocol, s.cutoff) == ("leave_last_out", None)
    assert row_ids(s.test) == [1, 3]
    assert row_ids(s.valid) == [4]
    assert row_ids(s.train) == [0, 2, 5, 6]


def test_global_temporal_exact() -> None:
    x = events(
        [
            (0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 9), (0, 4, 8),  # three before T=5, two after
            (1, 0, 4), (1, 1, 6),  # one before: train only (no valid), test = t=6
            (2, 0, 7),  # nothing before T: no test either
            (3, 0, 2), (3, 1, 2),  # two before, none after: train + valid
        ]
    )  # fmt: skip
    s = global_temporal_split(x, quantile=0.6)  # sorted t: 1 2 2 2 3 4 6 7 8 9 -> 4.8 -> T = 5
    assert (s.protocol, s.cutoff) == ("global_temporal", 5)
    assert row_ids(s.train) == [0, 1, 5, 8]
    assert row_ids(s.valid) == [2, 9]  # user 3's tie at t=2 is broken by item
    assert row_ids(s.test) == [4, 6]  # user 0's first at/after T is t=8 (row 4), not t=9
    s = global_temporal_split(x, quantile=0.5)  # 3.5 -> T = 4: user 1 has nothing before T
    assert s.cutoff == 4
    assert (row_ids(s.train), row_ids(s.valid), row_ids(s.test)) == ([0, 1, 8], [2, 9], [4])


@pytest.mark.parametrize("protocol", ["leave_last_out", "global_temporal"])
def test_no_test_row_is_older_than_its_users_history(
    builtin_dataset: Dataset, protocol: str
) -> None:
    x = builtin_dataset.interactions
    s = leave_last_out(x) if protocol == "leave_last_out" else global_temporal_split(x)
    assert len(s.train) and len(s.valid) and len(s.test)
    n = builtin_dataset.num_users
    latest = np.full(n, np.iinfo(np.int64).min)
    for part in (s.train, s.valid):
        np.maximum.at(latest, part.user, part.timestamp)
    assert np.all(s.test.timestamp >= latest[s.test.user])
    latest_train = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(latest_train, s.train.user, s.train.timestamp)
    assert np.all(s.valid.timestamp >= latest_train[s.valid.user])
    # at most one valid and one test row per user; every evaluated user has a train row
    assert np.bincount(s.test.user).max() == 1 and np.bincount(s.valid.user).max() == 1
    has_train = np.bincount(s.train.user, minlength=n) > 0
    assert has_train[s.test.user].all() and has_train[s.valid.user].all()


def test_leave_last_out_counts_on_builtin(builtin_dataset: Dataset) -> None:
    x = builtin_dataset.interactions
    s = leave_last_out(x)
    n = builtin_dataset.num_users
    total = np.bincount(x.user, minlength=n)
    assert len(s.train) + len(s.valid) + len(s.test) == len(x)
    assert np.array_equal(np.bincount(s.test.user, minlength=n), (total >= 2).astype(int))
    assert np.array_equal(np.bincount(s.valid.user, minlength=n), (total >= 3).astype(int))


def test_global_temporal_on_builtin(builtin_dataset: Dataset) -> None:
    x = builtin_dataset.interactions
    s = global_temporal_split(x, quantile=0.9)
    assert s.cutoff is not None
    assert s.train.timestamp.max() < s.cutoff and s.valid.timestamp.max() < s.cutoff
    assert s.test.timestamp.min() >= s.cutoff
    assert 0.85 < (len(s.train) + len(s.valid)) / len(x) <= 0.9 + 1e-9
    before = np.bincount(x.user[x.timestamp < s.cutoff], minlength=builtin_dataset.num_users)
    assert np.array_equal(np.unique(s.valid.user), np.flatnonzero(before >= 2))
    after_users = np.unique(x.user[x.timestamp >= s.cutoff])
    expected = np.intersect1d(after_users, np.flatnonzero(before))
    assert np.array_equal(np.unique(s.test.user), expected)


def test_recent_window() -> None:
    x = events([(0, 0, 0), (0, 1, 50), (1, 0, 80), (1, 2, 100)])
    assert row_ids(recent_window(x, 0.2)) == [2, 3]  # t >= 100 - 0.2 * 100
    assert row_ids(recent_window(x, 0.5)) == [1, 2, 3]
    assert row_ids(recent_window(x, 1.0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        recent_window(x, 0.0)


def test_time_windows_exact() -> None:
    x = events([(0, 0, 40), (1, 0, 0), (0, 1, 10), (1, 1, 100), (2, 2, 90)])
    assert [row_ids(w) for w in time_windows(x, num_windows=2)] == [[1, 2], [0, 3, 4]]
    by_time = time_windows(x, num_windows=4, by="time")  # edges 0, 25, 50, 75, 100
    assert [row_ids(w) for w in by_time] == [[1, 2], [0], [], [3, 4]]
    assert by_time[3].timestamp.tolist() == [90, 100]  # stream order inside a window


@pytest.mark.parametrize("by", ["count", "time"])
@pytest.mark.parametrize("num_windows", [1, 7, 50])
def test_time_windows_cover_once_in_order(
    builtin_dataset: Dataset, by: str, num_windows: int
) -> None:
    x = builtin_dataset.interactions
    x = Interactions(x.user, x.item, x.timestamp, np.arange(len(x), dtype=np.float32))
    windows = time_windows(x, num_windows=num_windows, by=by)  # type: ignore[arg-type]
    assert len(windows) == num_windows
    rows = np.concatenate([w.rating for w in windows]).astype(int)  # the row numbers
    assert sorted(rows.tolist()) == list(range(len(x)))
    assert np.array_equal(x.timestamp[rows], np.concatenate([w.timestamp for w in windows]))
    stream = x.timestamp[rows]
    assert np.all(np.diff(stream) >= 0)
    if by == "count":
        sizes = [len(w) for w in windows]
        assert max(sizes) - min(sizes) <= 1

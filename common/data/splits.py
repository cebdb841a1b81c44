"""Filters and evaluation splits. Every function keeps dense indices and only selects rows.

Orders are total, so splits do not depend on file order (exact duplicate rows aside): a user's
history is ordered by (timestamp, item), the stream by (timestamp, user, item), see `Interactions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np

from fedrec.common.data.schema import Interactions


@dataclass(frozen=True)
class Split:
    """Train/valid/test rows of one protocol; `cutoff` is the split time T where there is one."""

    train: Interactions
    valid: Interactions
    test: Interactions
    protocol: str
    cutoff: int | None

    def before_test(self) -> Interactions:
        """Train and validation rows: everything a user could know before the test."""
        return Interactions.concat([self.train, self.valid])

    def for_validation(self) -> Split:
        """The same split shifted one step back, for choosing settings: the validation rows
        become the held-out target and only the training rows come before it, so no
        setting is ever chosen by looking at the test."""
        empty = self.train.select(np.zeros(0, np.int64))
        return dataclasses.replace(self, valid=empty, test=self.valid)


def filter_min_interactions(
    interactions: Interactions, *, min_user: int = 1, min_item: int = 1, iterative: bool = False
) -> Interactions:
    """Drops rows of users with < min_user rows or items with < min_item rows.

    One pass judges every row against the counts of the input (dropping a cold item can leave
    a user below `min_user`); `iterative=True` repeats until stable, the usual k-core.
    """
    keep = np.ones(len(interactions), dtype=bool)
    while True:
        users, items = interactions.user[keep], interactions.item[keep]
        user_count = np.bincount(users, minlength=1)
        item_count = np.bincount(items, minlength=1)
        ok = (user_count[users] >= min_user) & (item_count[items] >= min_item)
        if ok.all():
            break
        keep[np.flatnonzero(keep)[~ok]] = False
        if not iterative:
            break
    return interactions.select(keep)


def leave_last_out(interactions: Interactions) -> Split:
    """Per user, by (timestamp, item): the last row is test, the one before valid, rest train.

    Users with one row have train only (nothing to predict from), users with two train + test
    (no valid), so no user is evaluated without a history. Rows keep their input order.
    """
    from_end = _rank_from_end(interactions, np.ones(len(interactions), dtype=bool))
    count = np.bincount(interactions.user, minlength=1)[interactions.user]
    test = (from_end == 0) & (count >= 2)
    valid = (from_end == 1) & (count >= 3)
    train = ~(test | valid)
    return Split(
        train=interactions.select(train),
        valid=interactions.select(valid),
        test=interactions.select(test),
        protocol="leave_last_out",
        cutoff=None,
    )


def global_temporal_split(interactions: Interactions, *, quantile: float = 0.9) -> Split:
    """One cutoff T for everyone, so no model sees the future of another user.

    T = ceil(quantile of all timestamps), stored as `cutoff`. Before T: each user's last row is
    valid if they have >= 2 rows before T, the rest train. Test: each user's first row at or after
    T, only for users with a train row (cold users are a different benchmark). Later rows after T
    are in no part: predicting the next item is the task, and later ones would leak order.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if len(interactions) == 0:
        empty = interactions.select(np.zeros(0, dtype=np.int64))
        return Split(empty, empty, empty, "global_temporal", None)
    cutoff = int(np.ceil(np.quantile(interactions.timestamp, quantile)))
    before = interactions.timestamp < cutoff
    from_end = _rank_from_end(interactions, before)
    num_users = int(interactions.user.max()) + 1
    n_before = np.bincount(interactions.user[before], minlength=num_users)[interactions.user]
    valid = before & (from_end == 0) & (n_before >= 2)
    train = before & ~valid
    from_start = _rank_from_start(interactions, ~before)
    test = ~before & (from_start == 0) & (n_before >= 1)
    return Split(
        train=interactions.select(train),
        valid=interactions.select(valid),
        test=interactions.select(test),
        protocol="global_temporal",
        cutoff=cutoff,
    )


def recent_window(interactions: Interactions, fraction: float) -> Interactions:
    """Rows in the last `fraction` of the time span: what a recent-popularity baseline counts."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(interactions) == 0:
        return interactions
    t = interactions.timestamp
    start = t.max() - fraction * float(t.max() - t.min())
    return interactions.select(t >= start)


def time_windows(
    interactions: Interactions, *, num_windows: int, by: Literal["count", "time"] = "count"
) -> list[Interactions]:
    """Consecutive windows in stream order, together holding every row exactly once.

    by="count": near-equal row counts (rows with equal timestamps may straddle a boundary;
    windows are still non-decreasing in time). by="time": equal time spans, last one closed;
    a quiet span gives an empty window. Rows inside a window are in stream order.
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    order = interactions.time_order()
    if by == "count":
        bounds = np.linspace(0, len(order), num_windows + 1).round().astype(np.int64)
    elif by == "time":
        t = interactions.timestamp[order]
        if len(t) == 0:
            bounds = np.zeros(num_windows + 1, dtype=np.int64)
        else:
            edges = np.linspace(float(t[0]), float(t[-1]), num_windows + 1)
            bounds = np.searchsorted(t, edges, side="left")
            bounds[-1] = len(t)
    else:
        raise ValueError(f"by must be 'count' or 'time', got {by!r}")
    return [interactions.select(order[a:b]) for a, b in pairwise(bounds)]


def _rank_from_end(interactions: Interactions, mask: np.ndarray) -> np.ndarray:
    """For masked rows, how many masked rows of the same user come after it; -1 elsewhere."""
    rank = _rank_from_start(interactions, mask)
    users = interactions.user[mask]
    count = np.bincount(users, minlength=1)
    out = np.full(len(interactions), -1, dtype=np.int64)
    out[mask] = count[users] - 1 - rank[mask]
    return out


def _rank_from_start(interactions: Interactions, mask: np.ndarray) -> np.ndarray:
    """For masked rows, the position in the user's (timestamp, item) order; -1 elsewhere."""
    rows = np.flatnonzero(mask)
    sub = interactions.select(rows)
    order = sub.user_time_order()
    users = sub.user[order]
    first = np.ones(len(users), dtype=bool)  # first row of each user's block
    first[1:] = users[1:] != users[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(users)), 0))
    out = np.full(len(interactions), -1, dtype=np.int64)
    out[rows[order]] = np.arange(len(users)) - group_start
    return out

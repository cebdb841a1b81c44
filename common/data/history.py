"""Per-user histories in compressed-sparse-row form, time-ordered within each user."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.common.data.schema import Interactions


@dataclass(frozen=True)
class UserHistories:
    """`items[indptr[u]:indptr[u+1]]` are user u's items, oldest first."""

    indptr: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (N,) int64
    timestamps: np.ndarray  # (N,) int64

    @classmethod
    def from_interactions(cls, interactions: Interactions, num_users: int) -> UserHistories:
        order = interactions.user_time_order()
        users = interactions.user[order]
        counts = np.bincount(users, minlength=num_users)
        if len(counts) > num_users:
            raise ValueError(f"user index {int(users.max())} out of range for {num_users} users")
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(
            indptr=indptr,
            items=interactions.item[order].astype(np.int64),
            timestamps=interactions.timestamp[order].astype(np.int64),
        )

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    def items_of(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def timestamps_of(self, user: int) -> np.ndarray:
        return self.timestamps[self.indptr[user] : self.indptr[user + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

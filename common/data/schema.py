"""The in-memory schema every loader produces and every consumer reads.

Ids are arbitrary strings in files; inside fedrec users and items are dense int64 indices into
`Dataset.user_ids` / `Catalogue.item_ids`. Arrays are column-oriented so that a 100k-user
dataset costs a few numpy arrays, not millions of Python objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def quoted(value: object, limit: int = 80) -> str:
    """`repr` of a value for an error message, cut to `limit` characters with its length: a
    malformed file can hold a field of megabytes, and the message must stay readable."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


class DataError(ValueError):
    """Malformed or inconsistent input. The message names the file, the line and the problem."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.path = None if path is None else str(path)
        self.line = line


@dataclass(frozen=True)
class Catalogue:
    """Public item metadata. Index i describes dense item i."""

    item_ids: np.ndarray  # (I,) str, external ids
    titles: tuple[str, ...]
    genres: tuple[str, ...]  # free text; '|' separated genres for movie data, may be ''
    years: np.ndarray = field(default=None)  # (I,) int32 release year, 0 = unknown

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.years is None:
            object.__setattr__(self, "years", np.zeros(n, dtype=np.int32))
        if not (len(self.titles) == len(self.genres) == len(self.years) == n):
            raise DataError(
                f"catalogue columns disagree in length: {n} ids, {len(self.titles)} titles, "
                f"{len(self.genres)} genres, {len(self.years)} years"
            )

    def __len__(self) -> int:
        return len(self.item_ids)

    def texts(self) -> list[str]:
        """The text a pretrained encoder sees for each item: title plus genres."""
        out = []
        for title, genres in zip(self.titles, self.genres, strict=True):
            g = ", ".join(x for x in genres.split("|") if x)
            out.append(f"{title}. Genres: {g}." if g else title)
        return out

    def fingerprint(self) -> str:
        """Stable hash of everything that feeds item features (cache key for text embeddings)."""
        h = hashlib.sha256()
        for text in self.texts():
            h.update(text.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Interactions:
    """A column store of (user, item, timestamp[, rating]) events."""

    user: np.ndarray  # (N,) int64 dense user index
    item: np.ndarray  # (N,) int64 dense item index
    timestamp: np.ndarray  # (N,) int64 Unix seconds
    rating: np.ndarray | None = None  # (N,) float32, explicit feedback if the source has it

    def __post_init__(self) -> None:
        n = len(self.user)
        cols = [len(self.item), len(self.timestamp)]
        if self.rating is not None:
            cols.append(len(self.rating))
        if any(c != n for c in cols):
            raise DataError(f"interaction columns disagree in length: {[n, *cols]}")

    def __len__(self) -> int:
        return len(self.user)

    def select(self, index: np.ndarray) -> Interactions:
        """Rows by boolean mask or integer index, as a new Interactions."""
        return Interactions(
            user=self.user[index],
            item=self.item[index],
            timestamp=self.timestamp[index],
            rating=None if self.rating is None else self.rating[index],
        )

    @staticmethod
    def concat(parts: list[Interactions]) -> Interactions:
        """Rows of all parts, in order; ratings are kept only if every part has them."""
        ratings = [p.rating for p in parts]
        return Interactions(
            user=np.concatenate([p.user for p in parts]),
            item=np.concatenate([p.item for p in parts]),
            timestamp=np.concatenate([p.timestamp for p in parts]),
            rating=None if any(r is None for r in ratings) else np.concatenate(ratings),
        )

    def time_order(self) -> np.ndarray:
        """Stable order by (timestamp, user, item): ties never depend on file order."""
        return np.lexsort((self.item, self.user, self.timestamp))

    def user_time_order(self) -> np.ndarray:
        """Stable order by (user, timestamp, item): each user's history in time order."""
        return np.lexsort((self.item, self.timestamp, self.user))


@dataclass(frozen=True)
class Dataset:
    """Interactions plus the catalogue they refer to and the external user ids."""

    name: str
    interactions: Interactions
    catalogue: Catalogue
    user_ids: np.ndarray  # (U,) str

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    def with_interactions(self, interactions: Interactions) -> Dataset:
        """Same catalogue and user index, other interactions (a filter or a split)."""
        return Dataset(self.name, interactions, self.catalogue, self.user_ids)

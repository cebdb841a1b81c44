"""A device's persistent state: its interactions, its local model state, its privacy ledger.

One folder per client (under the run's output dir in simulation, a path the device chooses in
deployment):

    store.sqlite   interactions: item id, timestamp, cohort                  (SQLite, WAL)
    local.npz      local parameters and inference state, written atomically  (temp + rename)
    ledger.jsonl   the hash-chained privacy ledger (fedrec.client.ledger)

The store links no interaction to another: under DP-SGD each interaction is its own training
example (fedrec.common.examples, `single`), so adding or removing one changes exactly one
example, however and whenever the others arrived, and DP-SGD's add/remove-one-example guarantee
is a per-interaction guarantee. (Schema 1 paired each arrival with the oldest unpaired
interaction; one interaction's presence then re-paired every later one. Its `pair` column is
left in old files and never read.) A cohort is the set of interactions that arrived together.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.common.io import atomic_write

STORE_FILE = "store.sqlite"
SCHEMA_VERSION = 2  # 2: no pairing at ingest (a schema-1 file is read as is; `pair` is ignored)
LOCAL_STATE_FILE = "local.npz"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    cohort TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS interactions_cohort ON interactions(cohort);
CREATE UNIQUE INDEX IF NOT EXISTS interactions_event ON interactions(item, timestamp);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(RuntimeError):
    """The store is unreadable or inconsistent. Names the file and the problem."""


@dataclass(frozen=True)
class StoredInteractions:
    """Column view of a device's interactions, ordered by (timestamp, id)."""

    id: np.ndarray  # (N,) int64 row id (arrival order)
    item: np.ndarray  # (N,) str external item id
    timestamp: np.ndarray  # (N,) int64
    cohort: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return len(self.id)


class ClientStore:
    """Typed access to one device's folder. Every write is a transaction or an atomic rename."""

    def __init__(self, folder: str | Path, *, verify: bool = False, durable: bool = True):
        """Open (or create) the store. `verify` runs SQLite's quick_check over every page: a
        device does it at start-up; a simulation opening thousands of stores skips it, and a
        corrupted file still fails on the first read with a StoreError.

        `durable=False` skips fsync (SQLite `synchronous=OFF`): safe if the process crashes,
        but an OS crash or power loss can corrupt the file, so only for stores that can be
        rebuilt, like a simulation's (windows are re-delivered idempotently). Privacy state
        never lives here: the ledger is its own fsync'ed file."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / STORE_FILE
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            if not durable:
                # One process at a time opens a rebuildable store, and only for one round:
                # holding SQLite's lock for the connection's life saves its lock calls around
                # every statement and the shared-memory index (most of opening a small store).
                self._db.execute("PRAGMA synchronous=OFF")
                self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # a new file, or a schema-1 one: its rows stay (and its `pair` column, unread);
                # the schema is one transaction, not a commit per statement
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            if verify:
                check = self._db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StoreError(
                        f"{self.path}: interaction store failed its integrity check: {check}"
                    )
            self._db.execute("SELECT count(*) FROM interactions").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: unreadable interaction store: {err}") from err

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ClientStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- interactions ---------------------------------------------------------------------------
    def ingest(self, items: list[str], timestamps: list[int], cohort: str) -> int:
        """Append a cohort of interactions.

        Returns how many were new; an event already stored (same item and timestamp) is skipped,
        so re-delivering a window after a crash is harmless. All or nothing (one transaction).
        """
        if len(items) != len(timestamps):
            raise ValueError(f"{len(items)} items but {len(timestamps)} timestamps")
        order = sorted(range(len(items)), key=lambda i: (timestamps[i], items[i]))
        added = 0
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for i in order:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO interactions(item, timestamp, cohort) VALUES (?, ?, ?)",
                    (str(items[i]), int(timestamps[i]), cohort),
                )
                added += cur.rowcount
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return added

    def interactions(self) -> StoredInteractions:
        rows = self._db.execute(
            "SELECT id, item, timestamp, cohort FROM interactions ORDER BY timestamp, id"
        ).fetchall()
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return StoredInteractions(
                empty, np.zeros(0, dtype=object), empty, np.zeros(0, dtype=object)
            )
        ids, items, ts, cohorts = zip(*rows, strict=True)
        return StoredInteractions(
            id=np.array(ids, dtype=np.int64),
            item=np.array(items, dtype=object),
            timestamp=np.array(ts, dtype=np.int64),
            cohort=np.array(cohorts, dtype=object),
        )

    def cohorts(self) -> list[str]:
        return [
            r[0]
            for r in self._db.execute("SELECT DISTINCT cohort FROM interactions ORDER BY cohort")
        ]

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- local state ----------------------------------------------------------------------------
    def load_local_state(self) -> dict[str, np.ndarray]:
        path = self.folder / LOCAL_STATE_FILE
        if not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: unreadable local state: {err}") from err

    def save_local_state(self, state: dict[str, np.ndarray]) -> None:
        """Atomic: a crash leaves the previous state or the new one, never a mix. A model
        without local parameters has nothing to keep (no file, no fsync per round)."""
        if not state:
            return
        atomic_write(self.folder / LOCAL_STATE_FILE, lambda f: np.savez(f, **state))

"""The lifelong stream a simulation replays: which interactions reach which device, when.

The data's timeline is cut into one window per round (equal interaction counts); round r
delivers window r's interactions to their devices' stores, as one cohort per window. The test
interactions of the chosen evaluation protocol are held back from the stream, so the final
evaluation ranks the same test as `fedrec train` under that protocol: (a) `loo`, each user's
last interaction held back (users with fewer than 5 are streamed whole); (b) `temporal`, the
stream ends at the global cutoff T and the test is each user's first interaction after it, so
no device ever holds anything later than another's test.

Not only the simulation reads it: the server builds the run's model and its public catalogue
from the stream's catalogue and span, and a device without a catalogue file builds its
template from it too (`fedrec.client.runtime`), so it lives in `fedrec.common`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedrec.common.config import DataConfig
from fedrec.common.data.schema import Dataset, Interactions
from fedrec.common.data.splits import Split
from fedrec.common.protocols import ProtocolConfig, make_split


@dataclass(frozen=True)
class Delivery:
    cohort: str  # "w0007": the window it arrived in
    items: list[str]  # external item ids, time-ordered
    timestamps: list[int]


@dataclass(frozen=True)
class Stream:
    dataset: Dataset
    split: Split  # the protocol's test is held back from the stream; valid rows are delivered
    rows: Interactions  # every delivered interaction, time-ordered
    window: np.ndarray  # (N,) window index of each row
    window_end: np.ndarray  # (R,) last timestamp of each window
    user_ptr: np.ndarray  # (U+1,) rows of user u are user_rows[user_ptr[u]:user_ptr[u+1]]
    user_rows: np.ndarray  # row indices grouped by user, time-ordered inside

    @property
    def num_rounds(self) -> int:
        return len(self.window_end)

    def clients(self) -> np.ndarray:
        """Users with at least one delivered interaction: the registered devices."""
        return np.flatnonzero(np.diff(self.user_ptr) > 0)

    def deliveries(self, user: int, after_round: int, up_to_round: int) -> list[Delivery]:
        """The cohorts a device receives for windows in (after_round, up_to_round] (1-based)."""
        rows = self.user_rows[self.user_ptr[user] : self.user_ptr[user + 1]]
        w = self.window[rows]
        out = []
        ids = self.dataset.catalogue.item_ids
        for window in np.unique(w[(w >= after_round) & (w < up_to_round)]):
            mine = rows[w == window]
            out.append(
                Delivery(
                    cohort=f"w{int(window) + 1:04d}",
                    items=[str(ids[i]) for i in self.rows.item[mine]],
                    timestamps=[int(t) for t in self.rows.timestamp[mine]],
                )
            )
        return out


# A stream protocol "NAME:validation" holds back the protocol's VALIDATION rows as the target
# (and delivers only what precedes them): the run that settings are chosen on.
VALIDATION_SUFFIX = ":validation"


def build_stream(dataset: Dataset, rounds: int, protocol: str = "loo") -> Stream:
    name = protocol.removesuffix(VALIDATION_SUFFIX)
    split = make_split(dataset.interactions, ProtocolConfig(name))
    if protocol.endswith(VALIDATION_SUFFIX):
        split = split.for_validation()
    # Everything a user had before their test interaction is delivered, validation rows
    # included: the simulation selects no model on them, and the yardsticks it is compared
    # with (popularity, recent popularity) count them too.
    delivered = split.before_test()
    if name == "loo":
        counts = np.bincount(dataset.interactions.user, minlength=dataset.num_users)
        short = dataset.interactions.select(counts[dataset.interactions.user] < split_min_user())
        delivered = Interactions.concat([delivered, short])
    order = delivered.time_order()
    rows = delivered.select(order)
    bounds = np.linspace(0, len(rows), rounds + 1).round().astype(np.int64)
    window = np.searchsorted(bounds, np.arange(len(rows)), side="right") - 1
    window_end = np.array(
        [rows.timestamp[max(b - 1, 0)] if b > 0 else rows.timestamp.min() for b in bounds[1:]]
    )
    by_user = np.lexsort((np.arange(len(rows)), rows.user))
    user_ptr = np.zeros(dataset.num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows.user, minlength=dataset.num_users), out=user_ptr[1:])
    return Stream(dataset, split, rows, window, window_end.astype(np.int64), user_ptr, by_user)


def split_min_user() -> int:
    return ProtocolConfig("loo").min_user


_LAST_STREAM: list = []  # [(data, rounds, protocol, stream)]: skips re-serializing the key


def load_stream(data: DataConfig, rounds: int, protocol: str = "loo") -> Stream:
    """One copy per process: simulation workers serve many clients from it."""
    if _LAST_STREAM and _LAST_STREAM[0][0] is data and _LAST_STREAM[0][1:3] == [rounds, protocol]:
        return _LAST_STREAM[0][3]
    key = json.dumps(dataclasses.asdict(data), sort_keys=True)
    stream = _load_stream(key, rounds, protocol)
    _LAST_STREAM[:] = [[data, rounds, protocol, stream]]
    return stream


@lru_cache(maxsize=2)
def _load_stream(data_json: str, rounds: int, protocol: str) -> Stream:
    return build_stream(DataConfig(**json.loads(data_json)).load(), rounds, protocol)

"""Non-personalised reference scorers: every model must beat these to be worth its privacy cost.

Both return a strict total order as scores (no ties): float32 `num_items - position`, where the
position comes from a lexicographic sort. Encoding the order rather than the raw counts keeps the
tie-breaks exact in float32 (a count plus a fractional tie-breaker would not fit 24 mantissa bits
for large datasets); exact for catalogues under 2**24 items.
"""

from __future__ import annotations

import numpy as np

from fedrec.common.data.schema import Interactions
from fedrec.common.evaluation import Scorer


def popularity_scorer(train: Interactions, num_items: int) -> Scorer:
    """Most interactions in `train` first; equal counts by lower item index."""
    return ordered_scorer([_counts(train.item, num_items)], num_items)


def recent_popularity_scorer(
    train: Interactions, num_items: int, *, fraction: float = 0.1
) -> Scorer:
    """Most interactions in the last `fraction` of train's time span first.

    The window is `timestamp >= t_max - fraction * (t_max - t_min)`, inclusive, so the latest
    event always counts and `fraction=1` is plain popularity. Equal recent counts are ordered by
    overall count, then by lower item index.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    overall = _counts(train.item, num_items)
    if len(train):
        t_min, t_max = int(train.timestamp.min()), int(train.timestamp.max())
        recent_rows = train.timestamp >= t_max - fraction * (t_max - t_min)
        recent = _counts(train.item[recent_rows], num_items)
    else:
        recent = overall
    return ordered_scorer([recent, overall], num_items)


def ordered_scorer(keys: list[np.ndarray], num_items: int) -> Scorer:
    """The same strict order for every user: larger keys[0] first, then keys[1], ..., then
    lower item index (the yardsticks' tie rule, for any per-item key such as a count)."""
    return _constant_scorer(_order_scores(keys, num_items))


def _counts(items: np.ndarray, num_items: int) -> np.ndarray:
    items = np.asarray(items, dtype=np.int64)
    if len(items) and (items.min() < 0 or items.max() >= num_items):
        raise ValueError(f"train items must lie in [0, {num_items})")
    return np.bincount(items, minlength=num_items)


def _order_scores(keys: list[np.ndarray], num_items: int) -> np.ndarray:
    """(I,) float32 scores: higher for larger keys[0], then keys[1], ..., then lower index."""
    # np.lexsort sorts by its last key first.
    order = np.lexsort([np.arange(num_items)] + [-k for k in reversed(keys)])
    scores = np.empty(num_items, dtype=np.float32)
    scores[order] = np.arange(num_items, 0, -1, dtype=np.float32)
    return scores


def _constant_scorer(scores: np.ndarray) -> Scorer:
    """The same (I,) scores for every user, as a fresh (B, I) array the caller may modify."""

    def score(users: np.ndarray) -> np.ndarray:
        return np.tile(scores, (len(users), 1))

    return score

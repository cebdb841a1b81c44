"""Baseline orderings on hand-made interaction logs."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.common.baselines import popularity_scorer, recent_popularity_scorer
from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.evaluation import evaluate


def interactions(items, timestamps, users=None) -> Interactions:
    n = len(items)
    return Interactions(
        user=np.zeros(n, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64),
        item=np.asarray(items, dtype=np.int64),
        timestamp=np.asarray(timestamps, dtype=np.int64),
    )


def test_popularity_orders_by_count_then_lower_index():
    # counts [1, 2, 2, 3, 0]: item 3, then the tie 1 before 2, then 0, then 4.
    train = interactions([2, 2, 1, 1, 0, 3, 3, 3], range(8))
    scores = popularity_scorer(train, 5)(np.array([0, 4, 2]))
    assert scores.dtype == np.float32 and scores.shape == (3, 5)
    assert scores.tolist() == [[2.0, 4.0, 3.0, 5.0, 1.0]] * 3


def test_recent_popularity_window_and_tie_breaks():
    # Span 0..100, fraction 0.1: the window is t >= 90, inclusive.
    # recent counts [0, 1, 1, 1, 0], overall [3, 1, 2, 1, 0]:
    # item 2 (recent 1, overall 2), 1 and 3 (recent 1, overall 1; lower index first), 0, 4.
    train = interactions([0, 0, 0, 1, 2, 2, 3], [0, 10, 20, 95, 90, 5, 100])
    scores = recent_popularity_scorer(train, 5, fraction=0.1)(np.array([0]))
    assert scores.tolist() == [[2.0, 4.0, 5.0, 3.0, 1.0]]
    # The whole span is plain popularity: counts [3, 1, 2, 1, 0] -> 0, 2, 1, 3, 4.
    everything = recent_popularity_scorer(train, 5, fraction=1.0)(np.array([0]))
    assert np.array_equal(everything, popularity_scorer(train, 5)(np.array([0])))
    assert everything.tolist() == [[5.0, 3.0, 4.0, 2.0, 1.0]]


def test_empty_train_ranks_by_index():
    empty = interactions([], [])
    assert popularity_scorer(empty, 3)(np.array([0])).tolist() == [[3.0, 2.0, 1.0]]
    assert recent_popularity_scorer(empty, 3)(np.array([0])).tolist() == [[3.0, 2.0, 1.0]]


def test_invalid_arguments():
    train = interactions([0, 5], [0, 1])
    with pytest.raises(ValueError, match="train items"):
        popularity_scorer(train, 3)
    with pytest.raises(ValueError, match="fraction"):
        recent_popularity_scorer(interactions([0], [0]), 3, fraction=0.0)


def test_scores_are_fresh_arrays():
    scorer = popularity_scorer(interactions([1], [0]), 3)
    a = scorer(np.array([0]))
    a[0, 0] = 99.0
    assert scorer(np.array([0]))[0, 0] != 99.0


def test_popularity_end_to_end():
    # Item popularity 3 > 1 > 2 > 0 (counts 0, 2, 1, 3). User 0 already has item 3: its test
    # item 2 ranks second behind item 1. User 1 tests on item 3: first.
    train = interactions([3, 3, 3, 1, 1, 2], range(6), users=[0, 1, 1, 1, 1, 1])
    history = UserHistories.from_interactions(train, 2)
    test = interactions([2, 3], [10, 10], users=[0, 1])
    m = evaluate(popularity_scorer(train, 4), test=test, history=history, num_items=4, ks=(1,))
    assert m["hr@1"] == 0.5
    assert m["mrr"] == pytest.approx(0.75)
    assert m["coverage@1"] == pytest.approx(2 / 4)  # items 1 and 3

"""Exact numbers on tiny hand-made cases, a brute-force cross-check, and a speed check."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest

from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.evaluation import (
    _sample_negatives,
    evaluate,
    metrics_from_ranks,
    rank_test_items,
)


def interactions(users, items, timestamps=None) -> Interactions:
    users = np.asarray(users, dtype=np.int64)
    ts = np.arange(len(users)) if timestamps is None else timestamps
    return Interactions(
        user=users,
        item=np.asarray(items, dtype=np.int64),
        timestamp=np.asarray(ts, dtype=np.int64),
    )


def histories(lists: list[list[int]]) -> UserHistories:
    users = [u for u, items in enumerate(lists) for _ in items]
    items = [i for items in lists for i in items]
    return UserHistories.from_interactions(interactions(users, items), len(lists))


def table_scorer(table):
    table = np.asarray(table, dtype=np.float32)
    return lambda users: table[users]


# Two users, five items. User 0 ranks test item 2 second (only item 1 is above it); user 1 ranks
# it fourth (items 0, 4, 3 are above it) unless its history {0, 3} is excluded: then second.
SEGMENTS = ("new_items", "light_users", "heavy_users")
SCORES = [[0.1, 0.9, 0.5, 0.3, 0.2], [0.8, 0.1, 0.4, 0.6, 0.7]]
TEST = interactions([0, 1], [2, 2])


def test_hand_computed_metrics_without_history():
    m = evaluate(
        table_scorer(SCORES),
        test=TEST,
        history=histories([[], []]),
        num_items=5,
        ks=(1, 3),
        sampled_negatives=0,
    )
    assert m["users"] == 2.0
    assert m["hr@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["hr@3"] == 0.5 and m["recall@3"] == 0.5
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / 2, abs=1e-15)
    assert m["ndcg@3"] == pytest.approx(0.31546487678572877, abs=1e-15)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2, abs=1e-15)
    # top-1: items 1 and 0; top-3: {1, 2, 3} and {0, 4, 3}.
    assert m["coverage@1"] == pytest.approx(2 / 5)
    assert m["coverage@3"] == pytest.approx(5 / 5)
    assert "sampled_hr@1" not in m


def test_cold_start_and_fairness_segments_by_hand():
    """Known before the test: user 0 has 4 interactions (heavy: the top tenth of 3 test users
    is 1 user), users 1 and 2 have 1 and 2 (light). Items 2 and 4 were never interacted with
    (new); item 0 is the most popular, the head (20% of 5 items is 1). Ranks after
    exclusion: user 0's new item 2 is 1st of {2, 4}; user 1's new item 4 is 2nd of {1, 2, 3,
    4} (item 3 above it); user 2's item 0 is 2nd of {0, 2, 4} (item 2 above it)."""
    scores = [[0.1, 0.2, 0.9, 0.3, 0.5], [0.9, 0.1, 0.2, 0.5, 0.4], [0.5, 0.6, 0.7, 0.8, 0.1]]
    m = evaluate(
        table_scorer(scores),
        test=interactions([0, 1, 2], [2, 4, 0]),
        history=histories([[0, 0, 1, 3], [0], [1, 3]]),
        num_items=5,
        ks=(1, 3),
        sampled_negatives=0,
    )
    third = 1 / math.log2(3)  # the gain of rank 2
    assert m["rows/new_items"] == 2 and m["rows/light_users"] == 2 and m["rows/heavy_users"] == 1
    assert m["hr@1/new_items"] == 0.5 and m["ndcg@3/new_items"] == pytest.approx((1 + third) / 2)
    assert m["hr@1/light_users"] == 0.0 and m["hr@3/light_users"] == 1.0
    assert m["ndcg@3/light_users"] == pytest.approx(third)
    assert m["hr@1/heavy_users"] == 1.0 and m["ndcg@1/heavy_users"] == 1.0
    # top-1 lists: items 2, 3, 2 (no head item); top-3: {2, 4}, {3, 4, 2}, {2, 0, 4}: the head
    # item 0 fills 1 of the 8 slots
    assert m["exposure@1/head"] == 0.0 and m["exposure@1/tail"] == 1.0
    assert m["exposure@3/head"] == pytest.approx(1 / 8)
    assert m["exposure@3/tail"] == pytest.approx(7 / 8)


def test_history_exclusion_changes_rank_and_coverage():
    hist = histories([[], [0, 3]])
    r = rank_test_items(table_scorer(SCORES), test=TEST, history=hist, num_items=5, ks=(1, 3))
    assert r.full.tolist() == [2, 2]
    assert r.top_k_counts[1].tolist() == [0, 1, 0, 0, 1]  # user 1's best left is item 4
    assert r.top_k_counts[3].tolist() == [0, 2, 2, 1, 1]  # {1, 2, 3} and {1, 2, 4}
    m = evaluate(table_scorer(SCORES), test=TEST, history=hist, num_items=5, ks=(3,))
    assert m["hr@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(3), abs=1e-15)
    assert m["mrr"] == 0.5
    assert m["coverage@3"] == pytest.approx(4 / 5)


def test_test_item_in_history_is_not_excluded():
    # Repeat consumption: item 2 was consumed before; item 1 (history) is excluded, 2 is not.
    hist = histories([[1, 2]])
    r = rank_test_items(
        table_scorer(SCORES[:1]), test=interactions([0], [2]), history=hist, num_items=5
    )
    assert r.full.tolist() == [1]


def test_ties_rank_by_lower_item_index():
    zeros = [[0.0] * 5]
    one = interactions([0], [3])
    r = rank_test_items(table_scorer(zeros), test=one, history=histories([[]]), num_items=5)
    assert r.full.tolist() == [4]  # items 0, 1, 2 tie and have lower indices
    r = rank_test_items(
        table_scorer(zeros), test=one, history=histories([[1]]), num_items=5, ks=(2,)
    )
    assert r.full.tolist() == [3]
    assert r.top_k_counts[2].tolist() == [1, 0, 1, 0, 0]  # item 1 excluded
    mixed = [[1.0, 0.0, 1.0, 1.0, 0.0]]
    r = rank_test_items(
        table_scorer(mixed), test=one, history=histories([[]]), num_items=5, ks=(2,)
    )
    assert r.full.tolist() == [3]  # nothing greater; ties 0 and 2 come first
    assert r.top_k_counts[2].tolist() == [1, 0, 1, 0, 0]  # consistent: item 3 is not in top-2
    r = rank_test_items(
        table_scorer(mixed), test=one, history=histories([[]]), num_items=5, ks=(3,)
    )
    assert r.top_k_counts[3].tolist() == [1, 0, 1, 1, 0]


def test_minus_infinity_scores_do_not_tie_with_excluded_items():
    inf = [[-np.inf] * 5]
    r = rank_test_items(
        table_scorer(inf),
        test=interactions([0], [3]),
        history=histories([[0, 1]]),
        num_items=5,
        ks=(2, 10),
        sampled_negatives=99,
    )
    assert r.full.tolist() == [2]  # candidates {2, 3, 4}: only item 2 is ahead
    assert r.sampled.tolist() == [2]
    assert r.top_k_counts[2].tolist() == [0, 0, 1, 1, 0]
    assert r.top_k_counts[10].tolist() == [0, 0, 1, 1, 1]  # K beyond the candidates: all of them


def test_sampled_metrics_use_every_candidate_when_fewer_than_requested():
    # Candidates for user 1 are {1, 2, 4}: all of them are the "sample", so sampled = full.
    hist = histories([[], [0, 3]])
    r = rank_test_items(table_scorer(SCORES), test=TEST, history=hist, num_items=5)
    assert r.sampled.tolist() == r.full.tolist() == [2, 2]


def test_sampled_rank_is_one_when_nothing_is_left_to_sample():
    # Every other item is in the history: no negatives, rank 1, a hit at every K.
    hist = histories([[0, 1, 3, 4]])
    m = evaluate(
        table_scorer([[9.0, 9.0, 0.0, 9.0, 9.0]]),
        test=interactions([0], [2]),
        history=hist,
        num_items=5,
        ks=(1,),
    )
    assert m["sampled_hr@1"] == 1.0 and m["sampled_ndcg@1"] == 1.0
    assert m["hr@1"] == 1.0  # the full ranking has nothing else either


def test_sampled_extremes_and_seeded_reproducibility():
    rng = np.random.default_rng(1)
    num_users, num_items = 50, 400
    test = interactions(np.arange(num_users), rng.integers(0, num_items, num_users))
    hist = histories([list(rng.choice(num_items, 30, replace=False)) for _ in range(num_users)])
    table = rng.standard_normal((num_users, num_items)).astype(np.float32)
    best = table.copy()
    best[np.arange(num_users), test.item] = 100.0
    worst = table.copy()
    worst[np.arange(num_users), test.item] = -100.0
    kw = {"test": test, "history": hist, "num_items": num_items, "ks": (10,)}
    assert rank_test_items(table_scorer(best), **kw).sampled.tolist() == [1] * num_users
    assert rank_test_items(table_scorer(worst), **kw).sampled.tolist() == [100] * num_users
    a = rank_test_items(table_scorer(table), seed=3, **kw)
    b = rank_test_items(table_scorer(table), seed=3, batch_size=7, **kw)
    c = rank_test_items(table_scorer(table), seed=4, **kw)
    assert np.array_equal(a.sampled, b.sampled) and np.array_equal(a.full, b.full)
    assert not np.array_equal(a.sampled, c.sampled)
    assert np.all(a.sampled <= a.full)  # negatives are a subset of the candidates


@pytest.mark.parametrize("history_size", [3, 290])  # the first stage succeeds / falls back
def test_negatives_are_uniform_distinct_candidates(history_size):
    num_items, size, rows = 300, 5, 4000
    rng = np.random.default_rng(0)
    excluded = np.zeros((rows, num_items), dtype=bool)
    excluded[:, 1 : 1 + history_size] = True  # the same history for every row
    targets = np.zeros(rows, dtype=np.int64)
    negatives, valid = _sample_negatives(rng, excluded, targets, size, seed=0, first_row=0)
    assert valid.all()
    assert all(len(set(row)) == size for row in negatives.tolist())
    assert not excluded[np.arange(rows)[:, None], negatives].any()
    assert not (negatives == 0).any()
    freq = np.bincount(negatives.ravel(), minlength=num_items)[1 + history_size :] / rows
    expected = size / (num_items - 1 - history_size)  # each candidate's inclusion probability
    assert np.abs(freq - expected).max() < 5 * math.sqrt(expected / rows) + 0.01


def test_empty_test_set_gives_zero_users_and_no_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = evaluate(
            table_scorer(SCORES),
            test=interactions([], []),
            history=histories([[], []]),
            num_items=5,
            ks=(1, 3),
        )
    assert m["users"] == 0.0
    assert all(v == 0.0 for v in m.values())
    assert set(m) == {
        "users",
        "hr@1",
        "ndcg@1",
        "recall@1",
        "hr@3",
        "ndcg@3",
        "recall@3",
        "mrr",
        "coverage@1",
        "coverage@3",
        "sampled_hr@1",
        "sampled_ndcg@1",
        "sampled_hr@3",
        "sampled_ndcg@3",
        *(f"rows/{s}" for s in SEGMENTS),
        *(f"{m}@{k}/{s}" for m in ("hr", "ndcg") for k in (1, 3) for s in SEGMENTS),
        *(f"exposure@{k}/{part}" for k in (1, 3) for part in ("head", "tail")),
    }


def test_metrics_from_ranks_exact():
    m = metrics_from_ranks(np.array([1, 2, 4, 11]), ks=(10,), sampled=np.array([1, 1, 2, 3]))
    assert m["users"] == 4.0
    assert m["hr@10"] == m["recall@10"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4, abs=1e-15)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 11) / 4, abs=1e-15)
    assert m["sampled_hr@10"] == 1.0
    assert m["sampled_ndcg@10"] == pytest.approx(
        (2 + 1 / math.log2(3) + 1 / math.log2(4)) / 4, abs=1e-15
    )


def test_bad_scores_are_rejected():
    kw = {"test": TEST, "history": histories([[], []]), "num_items": 5}
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda u: np.zeros((len(u), 4), dtype=np.float32), **kw)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(lambda u: np.full((len(u), 5), np.nan, dtype=np.float32), **kw)


def reference(table, test, hist_lists, num_items, ks):
    """Brute force: sort each row's candidates by (-score, index)."""
    ranks, counts = [], {k: np.zeros(num_items, dtype=np.int64) for k in ks}
    for u, t in zip(test.user.tolist(), test.item.tolist(), strict=True):
        history = set(hist_lists[u]) - {t}
        candidates = [j for j in range(num_items) if j not in history]
        order = sorted(candidates, key=lambda j: (-float(table[u, j]), j))
        ranks.append(order.index(t) + 1)
        for k in ks:
            counts[k][order[:k]] += 1
    return np.array(ranks), counts


@pytest.mark.parametrize("num_items", [120, 1000])
@pytest.mark.parametrize("levels", [None, 3, 40])  # continuous scores, heavy ties, some ties
def test_matches_brute_force(levels, num_items):
    # Exercises both top-K paths: few survivors above the group-maxima bound, and the dense one
    # (heavy ties, a -inf bound, fewer candidates than K).
    rng = np.random.default_rng(levels or 0)
    num_users, ks = 60, (1, 5, 12)
    if levels is None:
        table = rng.standard_normal((num_users, num_items)).astype(np.float32)
    else:
        table = rng.integers(0, levels, (num_users, num_items)).astype(np.float32)
    table[5, :] = -np.inf  # a row with nothing but -inf
    table[6, ::2] = -np.inf
    hist_lists = [list(rng.integers(0, num_items, rng.integers(0, 40))) for _ in range(num_users)]
    hist_lists[7] = list(range(num_items - 3))  # fewer candidates than K
    rows = rng.integers(0, num_users, 200)  # repeated users, repeated test items
    rows[:8] = np.arange(8)
    test = interactions(rows, rng.integers(0, num_items, len(rows)))
    test.item[3] = hist_lists[3][0] if hist_lists[3] else 0  # repeat consumption
    expected_ranks, expected_counts = reference(table, test, hist_lists, num_items, ks)
    r = rank_test_items(
        table_scorer(table),
        test=test,
        history=histories(hist_lists),
        num_items=num_items,
        ks=ks,
        batch_size=64,
    )
    assert np.array_equal(r.full, expected_ranks)
    for k in ks:
        assert np.array_equal(r.top_k_counts[k], expected_counts[k])


def test_speed_on_builtin_sized_problem():
    rng = np.random.default_rng(0)
    num_users, num_items, dim = 9000, 7000, 16
    train = interactions(rng.integers(0, num_users, 40_000), rng.integers(0, num_items, 40_000))
    hist = UserHistories.from_interactions(train, num_users)
    test = interactions(np.arange(num_users), rng.integers(0, num_items, num_users))
    users = rng.standard_normal((num_users, dim)).astype(np.float32)
    items = rng.standard_normal((num_items, dim)).astype(np.float32)
    start = time.perf_counter()
    m = evaluate(lambda u: users[u] @ items.T, test=test, history=hist, num_items=num_items)
    elapsed = time.perf_counter() - start
    assert m["users"] == num_users
    assert elapsed < 5.0, f"evaluate took {elapsed:.2f} s"

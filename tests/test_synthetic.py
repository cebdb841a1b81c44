"""Synthetic data: determinism, the ground truth shows in the data (drift, arrivals, text)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from fedrec.common.data.schema import Dataset
from fedrec.common.data.synthetic import (
    TOPICS,
    SyntheticConfig,
    SyntheticTruth,
    generate_synthetic,
    generate_synthetic_with_truth,
)

SMALL = SyntheticConfig(num_users=400, num_items=2000, seed=3)  # sparse, like real data


def arrays(ds: Dataset) -> list[np.ndarray]:
    x = ds.interactions
    return [x.user, x.item, x.timestamp, ds.catalogue.item_ids, ds.user_ids]


def test_same_seed_same_output_and_seeds_differ() -> None:
    a, b = generate_synthetic(SMALL), generate_synthetic(SMALL)
    assert all(np.array_equal(p, q) for p, q in zip(arrays(a), arrays(b), strict=True))
    assert a.catalogue.titles == b.catalogue.titles and a.catalogue.genres == b.catalogue.genres
    c = generate_synthetic(replace(SMALL, seed=4))
    assert len(c.interactions) != len(a.interactions) or not np.array_equal(
        c.interactions.item, a.interactions.item
    )
    assert c.catalogue.titles != a.catalogue.titles


def test_shape_and_stream() -> None:
    ds, truth = generate_synthetic_with_truth(SMALL)
    x = ds.interactions
    assert (ds.num_users, ds.num_items) == (400, 2000)
    assert x.rating is None and x.user.dtype == x.item.dtype == x.timestamp.dtype == np.int64
    assert np.array_equal(x.time_order(), np.arange(len(x)))  # rows come in stream order
    assert truth.start <= x.timestamp.min() and x.timestamp.max() < truth.end
    assert truth.end - truth.start == 60 * 86_400
    pairs = x.user * ds.num_items + x.item
    assert len(np.unique(pairs)) == len(x)  # no repeated (user, item)
    assert 18 < len(x) / ds.num_users <= 21  # about the configured 20, repeats redrawn
    assert np.allclose(truth.user_topics_before.sum(1), 1)
    assert truth.item_popularity.sum() == pytest.approx(1)


def topic_shift(ds: Dataset, truth: SyntheticTruth) -> float:
    """Mean total-variation distance between each user's topic mix before and after drift."""
    x = ds.interactions
    k = len(truth.topic_names)
    late = x.timestamp >= truth.drift_timestamp
    hist = np.zeros((2, ds.num_users, k))
    np.add.at(hist, (late.astype(int), x.user, truth.item_topic[x.item]), 1)
    n = hist.sum(2)
    ok = (n[0] >= 8) & (n[1] >= 8)
    p = hist[:, ok] / n[:, ok, None]
    return float(0.5 * np.abs(p[0] - p[1]).sum(1).mean())


def test_drift_shows_in_interactions() -> None:
    shift = {}
    for drift in ("none", "abrupt", "gradual"):
        cfg = replace(SMALL, drift=drift)
        ds, truth = generate_synthetic_with_truth(cfg)
        shift[drift] = topic_shift(ds, truth)
        same = np.array_equal(truth.user_topics_before, truth.user_topics_after)
        assert same == (drift == "none")
    assert shift["abrupt"] > 0.5 and shift["abrupt"] > 2 * shift["none"]
    assert shift["none"] < shift["gradual"] < shift["abrupt"]


def test_new_items_arrive_later_and_are_never_used_before() -> None:
    ds, truth = generate_synthetic_with_truth(SMALL)
    x = ds.interactions
    new = truth.item_arrival > truth.start
    assert 0.19 * ds.num_items <= new.sum() <= 0.2 * ds.num_items
    assert np.all(x.timestamp >= truth.item_arrival[x.item])
    assert np.isin(np.flatnonzero(new), x.item).sum() > 0.5 * new.sum()  # they do get used
    none_new = generate_synthetic(replace(SMALL, new_item_fraction=0.0))
    assert none_new.num_items == SMALL.num_items


def test_popularity_is_long_tailed() -> None:
    ds, truth = generate_synthetic_with_truth(SMALL)
    counts = np.bincount(ds.interactions.item, minlength=ds.num_items)
    old = truth.item_arrival == truth.start
    rank = np.argsort(-truth.item_popularity[old])
    c = counts[old][rank]
    assert c[: len(c) // 10].sum() > 3 * c[len(c) // 2 :].sum()  # top 10% beat bottom 50%


def test_text_carries_the_topic() -> None:
    ds, truth = generate_synthetic_with_truth(SMALL)
    vocab = {name: set(words.split()) for name, words in TOPICS}
    for i in range(ds.num_items):
        name = truth.topic_names[truth.item_topic[i]]
        assert ds.catalogue.genres[i] == name
        prefix, words = ds.catalogue.titles[i].split(": ")
        assert prefix == f"item {i}"
        assert len(set(words.split())) == 3 and set(words.split()) <= vocab[name]


def test_many_topics_get_distinct_made_up_words() -> None:
    ds, truth = generate_synthetic_with_truth(SyntheticConfig(num_items=400, num_topics=30))
    words = {}
    for title, topic in zip(ds.catalogue.titles, truth.item_topic, strict=True):
        for w in title.split(": ")[1].split():
            assert words.setdefault(w, topic) == topic  # a word belongs to one topic only
    assert truth.topic_names[29] == "Topic 29"


@pytest.mark.parametrize(
    "bad",
    [
        {"drift": "sudden"},
        {"new_item_fraction": 1.0},
        {"num_items": 9, "num_topics": 8},  # 2 new items leave 7 initial items for 8 topics
        {"mean_interactions_per_user": 0.5},
        {"words_per_title": 11},
    ],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)


def test_scale() -> None:
    cfg = SyntheticConfig(num_users=20_000, num_items=5_000, drift="abrupt")
    start = time.perf_counter()
    ds = generate_synthetic(cfg)
    assert time.perf_counter() - start < 3.0
    assert len(ds.interactions) > 18 * 20_000

"""Training examples: their forms, the adjacency they give, and the sampled-softmax loss."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.examples import PairSoftmaxLoss, build_examples, sample_negatives


def histories() -> UserHistories:
    # user 0: items 10, 11, 12 (times 1..3); user 1: 20, 21, 22, 23; user 2: a single item
    users = [0, 0, 0, 1, 1, 1, 1, 2]
    items = [12, 10, 11, 20, 21, 22, 23, 30]
    times = [3, 1, 2, 5, 6, 7, 8, 9]
    inter = Interactions(np.array(users), np.array(items), np.array(times))
    return UserHistories.from_interactions(inter, num_users=3)


def test_single_examples_are_one_per_interaction():
    examples = build_examples(histories(), "single")
    assert examples.first is None
    assert examples.second.tolist() == [10, 11, 12, 20, 21, 22, 23, 30]
    assert examples.user.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert examples.time.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]


def test_consecutive_pairs():
    pairs = build_examples(histories(), "consecutive")
    assert list(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True)) == [
        (10, 11),
        (11, 12),
        (20, 21),
        (21, 22),
        (22, 23),
    ]
    assert pairs.user.tolist() == [0, 0, 1, 1, 1]
    assert pairs.time.tolist() == [2, 3, 6, 7, 8]


def test_unknown_form_is_rejected():
    with pytest.raises(ValueError, match="unknown example form"):
        build_examples(histories(), "disjoint")


def _example_multiset(users, items, times, num_users, form) -> Counter:
    column = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
    inter = Interactions(column(users), column(items), column(times))
    ex = build_examples(UserHistories.from_interactions(inter, num_users), form)
    first = [None] * len(ex) if ex.first is None else ex.first.tolist()
    rows = zip(first, ex.second.tolist(), ex.user.tolist(), ex.time.tolist(), strict=True)
    return Counter(rows)


def removal_changes_only_its_own_example(users, items, times, num_users, form) -> bool:
    """For every interaction x: the examples built with x are those built without it plus
    exactly one, x's own (the only example the accountant charges to x)."""
    full = _example_multiset(users, items, times, num_users, form)
    for x in range(len(items)):
        keep = [k for k in range(len(items)) if k != x]
        without = _example_multiset(
            [users[k] for k in keep],
            [items[k] for k in keep],
            [times[k] for k in keep],
            num_users,
            form,
        )
        if full - without != Counter({(None, items[x], users[x], times[x]): 1}):
            return False
        if without - full:  # an example that exists only without x
            return False
    return True


histories_strategy = st.integers(1, 4).flatmap(
    lambda num_users: st.tuples(
        st.just(num_users),
        st.lists(
            st.tuples(st.integers(0, num_users - 1), st.integers(0, 9)),
            min_size=1,
            max_size=14,
        ),
    )
)


@settings(max_examples=150, deadline=None)
@given(histories_strategy)
def test_dp_examples_differ_only_in_the_removed_interactions_own_example(case):
    """The adjacency of `fedrec train`'s DP examples: add/remove of ONE interaction adds or
    removes exactly its own example, whatever the user's other interactions are."""
    num_users, rows = case
    users = [u for u, _ in rows]
    items = [i for _, i in rows]
    times = list(range(len(rows)))  # distinct timestamps: a user's order is well defined
    assert removal_changes_only_its_own_example(users, items, times, num_users, "single")


def test_pairs_fail_the_adjacency_the_dp_examples_pass():
    """Negative control: consecutive pairs (like any pairing of a user's interactions)
    change other examples when one interaction is removed."""
    users, items, times = [0, 0, 0, 0], [1, 2, 3, 4], [0, 1, 2, 3]
    assert not removal_changes_only_its_own_example(users, items, times, 1, "consecutive")
    assert removal_changes_only_its_own_example(users, items, times, 1, "single")


def test_negatives_are_shared_by_both_directions_and_hits_are_masked():
    g = torch.Generator().manual_seed(0)
    first, second = torch.tensor([1, 2]), torch.tensor([3, 4])
    negatives, hits = sample_negatives(first, second, 5, 50, g)
    assert negatives.shape == (2, 50) and hits.shape == (2, 2, 50)
    assert torch.equal(hits[:, 0], negatives == second[:, None])
    assert torch.equal(hits[:, 1], negatives == first[:, None])
    assert hits.any()  # 50 draws from 5 items must hit the target
    g = torch.Generator().manual_seed(0)
    alone, single_hits = sample_negatives(None, second, 5, 50, g)
    assert torch.equal(alone, negatives)  # the same public draws for either form
    assert single_hits.shape == (2, 1, 50) and torch.equal(single_hits[:, 0], hits[:, 0])


def test_pair_softmax_loss_exact():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])  # (B=1, S=2, C=3)
    hits = torch.tensor([[[False, True], [False, False]]])  # slot 0's last negative is a hit
    loss = PairSoftmaxLoss(reduction="none")(logits, hits)
    expected = -(2.0 - math.log(math.exp(2.0) + 1.0)) + math.log(3.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert PairSoftmaxLoss(reduction="sum")(logits, hits).item() == pytest.approx(expected)

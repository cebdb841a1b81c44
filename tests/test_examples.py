"""Training examples: pairing rules and the sampled-softmax loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.examples import PairSoftmaxLoss, build_pairs, sample_negatives


def histories() -> UserHistories:
    # user 0: items 10, 11, 12 (times 1..3); user 1: 20, 21, 22, 23; user 2: a single item
    users = [0, 0, 0, 1, 1, 1, 1, 2]
    items = [12, 10, 11, 20, 21, 22, 23, 30]
    times = [3, 1, 2, 5, 6, 7, 8, 9]
    inter = Interactions(np.array(users), np.array(items), np.array(times))
    return UserHistories.from_interactions(inter, num_users=3)


def test_disjoint_pairs_use_each_interaction_at_most_once():
    pairs = build_pairs(histories(), "disjoint")
    assert list(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True)) == [
        (10, 11),
        (20, 21),
        (22, 23),
    ]
    assert pairs.user.tolist() == [0, 1, 1]
    assert pairs.time.tolist() == [2, 6, 8]
    used = np.concatenate([pairs.first, pairs.second])
    assert len(used) == len(set(used.tolist()))


def test_consecutive_pairs():
    pairs = build_pairs(histories(), "consecutive")
    assert list(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True)) == [
        (10, 11),
        (11, 12),
        (20, 21),
        (21, 22),
        (22, 23),
    ]


def test_unknown_pairing_is_rejected():
    with pytest.raises(ValueError, match="unknown pairing"):
        build_pairs(histories(), "all")


def test_negatives_are_shared_by_both_directions_and_hits_are_masked():
    g = torch.Generator().manual_seed(0)
    first, second = torch.tensor([1, 2]), torch.tensor([3, 4])
    negatives, hits = sample_negatives(first, second, 5, 50, g)
    assert negatives.shape == (2, 50) and hits.shape == (2, 2, 50)
    assert torch.equal(hits[:, 0], negatives == second[:, None])
    assert torch.equal(hits[:, 1], negatives == first[:, None])
    assert hits.any()  # 50 draws from 5 items must hit the target


def test_pair_softmax_loss_exact():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])  # (B=1, S=2, C=3)
    hits = torch.tensor([[[False, True], [False, False]]])  # slot 0's last negative is a hit
    loss = PairSoftmaxLoss(reduction="none")(logits, hits)
    expected = -(2.0 - math.log(math.exp(2.0) + 1.0)) + math.log(3.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert PairSoftmaxLoss(reduction="sum")(logits, hits).item() == pytest.approx(expected)

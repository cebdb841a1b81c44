"""Leave-out ranking evaluation shared by centralized training, the federated simulation and
benchmarks.

Protocol. Each test row (user u, item t) is ranked on its own against the whole catalogue minus
u's history items. The test item itself is never excluded, even if it is in the history: with
repeat consumption the row is still ranked over the catalogue minus the *other* history items.
Other test items of the same user are not history and stay in the candidate set.

Tie rule (one rule everywhere). Candidates are totally ordered by (score descending, item index
ascending), the order of a stable sort of `-scores`, so

    rank = 1 + #{candidates with a strictly greater score}
             + #{candidates with an equal score and a lower item index}

The top-K lists behind `coverage@K` use the same order, so a test item is in its row's top-K
list exactly when its rank is <= K, and the sampled ranks use the same rule over the test item and
its negatives. An untrained model that scores everything 0 thus ranks items by index.

Sampled metrics draw `sampled_negatives` items uniformly without replacement from the items that
are neither in u's history nor the test item. When fewer exist, all of them are used; with none
the sampled rank is 1. A row's negatives depend only on `seed`, the row's position in `test`,
`num_items` and the row's own history: not on the scorer, `batch_size` or other rows, so two
models evaluated with the same seed face the same negatives.

Cost: linear in rows x items (a full ranking of every row), most when every score ties (an
all-zero model). Rows are processed `batch_size` at a time; peak memory is a few
(batch_size, num_items) arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.types import Metrics

# (B,) int64 dense user indices -> (B, num_items) float32 scores, higher = better; NaN is an
# error. A scorer reads the users' histories itself if it needs them; evaluation uses the history
# only for exclusion, and calls the scorer with sorted, distinct users.
Scorer: TypeAlias = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Ranks:
    """Per-row ranks of one evaluation, for metrics over any subset of rows (groups, rounds)."""

    full: np.ndarray  # (N,) int64, 1-based rank over the catalogue minus the history
    sampled: np.ndarray | None  # (N,) int64, 1-based rank among test item + negatives; None if off
    top_k_counts: dict[int, np.ndarray]  # K -> (num_items,) int64: top-K lists holding each item


def rank_test_items(
    scorer: Scorer,
    *,
    test: Interactions,
    history: UserHistories,
    num_items: int,
    ks: Sequence[int] = (10,),
    sampled_negatives: int = 99,
    seed: int = 0,
    batch_size: int = 1024,
) -> Ranks:
    """Rank every test row under the module's protocol; `sampled_negatives=0` skips sampling."""
    ks = _check_ks(ks)
    if sampled_negatives < 0:
        raise ValueError(f"sampled_negatives must be >= 0, got {sampled_negatives}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    users = np.asarray(test.user, dtype=np.int64)
    targets = np.asarray(test.item, dtype=np.int64)
    n = len(users)
    if n and (users.min() < 0 or users.max() >= history.num_users):
        raise ValueError(f"test users must lie in [0, {history.num_users}) (the history's users)")
    if n and (targets.min() < 0 or targets.max() >= num_items):
        raise ValueError(f"test items must lie in [0, {num_items})")

    full = np.empty(n, dtype=np.int64)
    sampled = np.empty(n, dtype=np.int64) if sampled_negatives else None
    counts = {k: np.zeros(num_items, dtype=np.int64) for k in ks}
    rng = np.random.default_rng(seed)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        t = targets[lo:hi]
        rows = np.arange(hi - lo)
        scores = _batch_scores(scorer, users[lo:hi], num_items)  # (B, I) float32, a private copy
        excluded = _excluded_mask(history, users[lo:hi], t, num_items)  # (B, I) bool
        target_scores = scores[rows, t]  # (B,)
        scores[excluded] = -np.inf
        full[lo:hi] = _ranks(scores, target_scores, t, excluded)
        for k, batch_counts in _top_k_counts(scores, excluded, ks).items():
            counts[k] += batch_counts
        if sampled is not None:
            negatives, valid = _sample_negatives(
                rng, excluded, t, sampled_negatives, seed=seed, first_row=lo
            )
            neg_scores = scores[rows[:, None], negatives]  # (B, S)
            ahead = (neg_scores > target_scores[:, None]) | (
                (neg_scores == target_scores[:, None]) & (negatives < t[:, None])
            )
            sampled[lo:hi] = 1 + np.count_nonzero(ahead & valid, axis=1)
    return Ranks(full=full, sampled=sampled, top_k_counts=counts)


def metrics_from_ranks(
    full: np.ndarray, *, ks: Sequence[int] = (10,), sampled: np.ndarray | None = None
) -> Metrics:
    """hr@K, ndcg@K, recall@K, mrr (and sampled_hr@K, sampled_ndcg@K) from 1-based ranks.

    With one relevant item per row, hr@K = recall@K = P(rank <= K) and
    ndcg@K = mean(1/log2(rank + 1) if rank <= K else 0). Zero rows give `users=0` and 0.0 for
    every metric, so the keys are always the same and nothing divides by zero.
    """
    ks = _check_ks(ks)
    full = np.asarray(full, dtype=np.int64)
    out: Metrics = {"users": float(len(full))}
    for k in ks:
        out[f"hr@{k}"] = _hit_rate(full, k)
        out[f"ndcg@{k}"] = _ndcg(full, k)
        out[f"recall@{k}"] = _hit_rate(full, k)
    out["mrr"] = float(np.mean(1.0 / full)) if len(full) else 0.0
    if sampled is not None:
        sampled = np.asarray(sampled, dtype=np.int64)
        for k in ks:
            out[f"sampled_hr@{k}"] = _hit_rate(sampled, k)
            out[f"sampled_ndcg@{k}"] = _ndcg(sampled, k)
    return out


def coverage(top_k_counts: np.ndarray) -> float:
    """Fraction of the catalogue that appears in at least one top-K list."""
    return float(np.count_nonzero(top_k_counts) / len(top_k_counts)) if len(top_k_counts) else 0.0


def evaluate(
    scorer: Scorer,
    *,
    test: Interactions,
    history: UserHistories,
    num_items: int,
    ks: Sequence[int] = (10,),
    sampled_negatives: int = 99,
    seed: int = 0,
    batch_size: int = 1024,
) -> Metrics:
    """All metrics of the protocol: users, hr/ndcg/recall/coverage@K, mrr, sampled_hr/ndcg@K,
    and the cold-start and fairness segments (`segment_metrics`)."""
    ranks = rank_test_items(
        scorer,
        test=test,
        history=history,
        num_items=num_items,
        ks=ks,
        sampled_negatives=sampled_negatives,
        seed=seed,
        batch_size=batch_size,
    )
    return metrics_of_ranks(ranks, test=test, history=history, num_items=num_items, ks=ks)


def metrics_of_ranks(
    ranks: Ranks,
    *,
    test: Interactions,
    history: UserHistories,
    num_items: int,
    ks: Sequence[int] = (10,),
) -> Metrics:
    """`evaluate`'s metrics from ranks already computed (one ranking pass serves several
    reports: the run's metrics and the benign users' under an attack)."""
    out = metrics_from_ranks(ranks.full, ks=ks, sampled=ranks.sampled)
    for k, counts in ranks.top_k_counts.items():
        out[f"coverage@{k}"] = coverage(counts)
    return out | segment_metrics(ranks, test=test, history=history, num_items=num_items, ks=ks)


def exposure_ratio(
    scorer: Scorer,
    *,
    users: np.ndarray,
    history: UserHistories,
    num_items: int,
    targets: Sequence[int],
    k: int = 10,
    batch_size: int = 1024,
) -> float:
    """ER@K of `targets`: the share of `users` with at least one target in their full-ranking
    top K over the catalogue minus their known items, under the module's tie rule (score
    descending, then item index ascending). A target the user knows is not recommended to
    them. The measure of a promotion attack (FedRecAttack, Rong et al. 2022)."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    targets = np.asarray(targets, dtype=np.int64)
    if not len(users) or not len(targets):
        return 0.0
    if targets.min() < 0 or targets.max() >= num_items:
        raise ValueError(f"targets must lie in [0, {num_items})")
    exposed = 0
    for lo in range(0, len(users), batch_size):
        batch = users[lo : lo + batch_size]
        scores = _batch_scores(scorer, batch, num_items)  # (B, I)
        known = _excluded_mask(history, batch, None, num_items)
        scores[known] = -np.inf
        hit = np.zeros(len(batch), dtype=bool)
        index = np.arange(num_items)
        for t in targets:
            s = scores[:, t : t + 1]  # (B, 1)
            ahead = np.count_nonzero((scores > s) | ((scores == s) & (index < t)), axis=1)
            hit |= (ahead < k) & ~known[:, t]
        exposed += int(np.count_nonzero(hit))
    return exposed / len(users)


# Segments for cold start and fairness (`segment_metrics`).
LIGHT_USER_MAX_KNOWN = 3  # a light user has at most this many known interactions
HEAVY_USER_SHARE = 0.1  # heavy users: this share of the test's users, most known first
HEAD_ITEM_SHARE = 0.2  # head items: this share of the catalogue, most interacted with first


def segment_metrics(
    ranks: Ranks,
    *,
    test: Interactions,
    history: UserHistories,
    num_items: int,
    ks: Sequence[int] = (10,),
) -> Metrics:
    """Quality where recommenders usually fail, and whom their lists expose.

    Rows are segmented by what was known before the test (the `history`):
    - `new_items`: the test item had no interaction from anyone (item cold start);
    - `light_users`: the user had at most LIGHT_USER_MAX_KNOWN interactions;
    - `heavy_users`: the ceil(HEAVY_USER_SHARE·U) users of the test with the most known
      interactions (ties: the lower user index first).
    For each: `rows/<segment>`, `hr@K/<segment>`, `ndcg@K/<segment>` (0.0 over no rows).
    Exposure: head items are the ceil(HEAD_ITEM_SHARE·I) items most interacted with before the
    test (ties: the lower item index first); `exposure@K/head` is the share of all top-K slots
    they fill (`exposure@K/tail` the rest), against HEAD_ITEM_SHARE for a catalogue-blind
    list."""
    ks = _check_ks(ks)
    users = np.asarray(test.user, dtype=np.int64)
    items = np.asarray(test.item, dtype=np.int64)
    known = history.lengths()
    popularity = np.bincount(history.items, minlength=num_items)
    test_users = np.unique(users)
    by_known = test_users[np.lexsort((test_users, -known[test_users]))]
    heavy = by_known[: math.ceil(HEAVY_USER_SHARE * len(test_users))]
    segments = {
        "new_items": popularity[items] == 0,
        "light_users": known[users] <= LIGHT_USER_MAX_KNOWN,
        "heavy_users": np.isin(users, heavy),
    }
    out: Metrics = {}
    for name, rows in segments.items():
        out[f"rows/{name}"] = float(np.count_nonzero(rows))
        for k in ks:
            out[f"hr@{k}/{name}"] = _hit_rate(ranks.full[rows], k)
            out[f"ndcg@{k}/{name}"] = _ndcg(ranks.full[rows], k)
    if num_items:
        order = np.lexsort((np.arange(num_items), -popularity))
        head = order[: math.ceil(HEAD_ITEM_SHARE * num_items)]
        for k, counts in ranks.top_k_counts.items():
            slots = counts.sum()
            share = float(counts[head].sum() / slots) if slots else 0.0
            out[f"exposure@{k}/head"] = share
            out[f"exposure@{k}/tail"] = 1.0 - share if slots else 0.0
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive cutoffs, got {ks}")
    return tuple(dict.fromkeys(ks))


def _hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks <= k)) if len(ranks) else 0.0


def _ndcg(ranks: np.ndarray, k: int) -> float:
    if not len(ranks):
        return 0.0
    gains = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return float(np.mean(gains))


def _batch_scores(scorer: Scorer, users: np.ndarray, num_items: int) -> np.ndarray:
    # Users with several test rows are scored once.
    unique, inverse = np.unique(users, return_inverse=True)
    scores = np.asarray(scorer(unique))
    if scores.shape != (len(unique), num_items):
        raise ValueError(
            f"scorer returned shape {scores.shape}, expected {(len(unique), num_items)}"
        )
    scores = scores.astype(np.float32, copy=False)[inverse]  # fancy indexing copies
    if np.isnan(scores).any():
        raise ValueError("scorer returned NaN scores")
    return scores


def _excluded_mask(
    history: UserHistories, users: np.ndarray, targets: np.ndarray | None, num_items: int
) -> np.ndarray:
    """(B, I) bool: each row's history items other than its own test item (None: all)."""
    starts = history.indptr[users]
    lengths = history.indptr[users + 1] - starts
    rows = np.repeat(np.arange(len(users)), lengths)
    offsets = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    mask = np.zeros((len(users), num_items), dtype=bool)
    mask[rows, history.items[np.repeat(starts, lengths) + offsets]] = True
    if targets is not None:
        mask[np.arange(len(users)), targets] = False
    return mask


def _ranks(
    scores: np.ndarray, target_scores: np.ndarray, targets: np.ndarray, excluded: np.ndarray
) -> np.ndarray:
    """Full ranks of a batch; excluded entries of `scores` are already -inf."""
    t = target_scores[:, None]
    # An excluded item (-inf) is never strictly greater, so only ties need the exclusion mask.
    ranks = 1 + np.count_nonzero(scores > t, axis=1)
    tied = np.flatnonzero(np.count_nonzero(scores == t, axis=1) > 1)  # the target ties itself
    if len(tied):
        lower = np.arange(scores.shape[1]) < targets[tied, None]
        ahead = (scores[tied] == t[tied]) & lower & ~excluded[tied]
        ranks[tied] += np.count_nonzero(ahead, axis=1)
    return ranks


def _top_k_counts(
    scores: np.ndarray, excluded: np.ndarray, ks: tuple[int, ...]
) -> dict[int, np.ndarray]:
    """K -> (I,) int64: in how many of the batch's top-K lists each item appears.

    Fast path: split the items into K_max interleaved groups; the smallest group maximum is a
    lower bound on the K_max-th largest score, so the items at or above it ("survivors", a few
    dozen for K_max=10 and 7,000 items) hold every top-K list, boundary ties included, and
    sorting them alone is exact. Rows with many survivors (heavy ties) or a -inf bound take a
    dense path.
    """
    b, num_items = scores.shape
    k_max = min(max(ks), num_items)
    groups = _interleaved_maxima(scores, k_max)  # (B, K_max)
    bound = groups.min(axis=1)  # (B,)
    survivors = scores >= bound[:, None]
    found = np.count_nonzero(survivors, axis=1)
    fast = (bound > -np.inf) & (found <= 16 * k_max + 64)
    found[~fast] = 0
    survivors[~fast] = False
    out = {k: np.zeros(num_items, dtype=np.int64) for k in ks}
    r, j = np.divmod(np.flatnonzero(survivors), num_items)  # item indices ascend within a row
    if len(r):
        pos = np.arange(len(r)) - np.repeat(np.cumsum(found) - found, found)
        vals = np.full((b, int(found.max())), -np.inf, dtype=np.float32)
        items = np.full(vals.shape, -1, dtype=np.int64)
        vals[r, pos] = scores[r, j]
        items[r, pos] = j
        # A stable sort on -score keeps ascending item index among ties: the module's tie rule.
        order = np.argsort(-vals, axis=1, kind="stable")
        ranked = np.take_along_axis(items, order, axis=1)[fast]  # (F, max found)
        for k in ks:
            top = ranked[:, :k]
            out[k] += np.bincount(top[top >= 0], minlength=num_items)
    slow = np.flatnonzero(~fast)
    if len(slow):
        sub, candidate = scores[slow], ~excluded[slow]  # (R, I)
        for k in ks:
            size = min(k, num_items)
            kth = np.partition(sub, num_items - size, axis=1)[:, num_items - size, None]
            above = sub > kth
            at = (sub == kth) & candidate  # at -inf, excluded items tie with the boundary
            room = size - np.count_nonzero(above, axis=1, keepdims=True)
            out[k] += np.count_nonzero(above | (at & (np.cumsum(at, axis=1) <= room)), axis=0)
    return out


def _interleaved_maxima(scores: np.ndarray, groups: int) -> np.ndarray:
    """(B, G): max of the items j = g (mod G). Interleaved, so that items whose index
    correlates with their score (say, ordered by first appearance) do not crowd one group; halving
    folds, because numpy reduces a (B, n, G) middle axis slowly."""
    n = scores.shape[1] // groups
    cut = n * groups
    x = scores[:, :cut] if n > 1 else scores[:, :cut].copy()  # never write into `scores`
    while n > 1:
        h = n // 2
        folded = np.maximum(x[:, : h * groups], x[:, h * groups : 2 * h * groups])
        if n % 2:
            np.maximum(folded[:, :groups], x[:, 2 * h * groups :], out=folded[:, :groups])
        x, n = folded, h
    rest = scores[:, cut:]  # the last columns continue the residues 0, 1, ...
    np.maximum(x[:, : rest.shape[1]], rest, out=x[:, : rest.shape[1]])
    return x


def _sample_negatives(
    rng: np.random.Generator,
    excluded: np.ndarray,
    targets: np.ndarray,
    size: int,
    *,
    seed: int,
    first_row: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(B, S) negatives and a (B, S) validity mask: a uniform sample without replacement per row.

    Each row draws 2S+16 items uniformly with replacement and keeps the first S distinct
    candidates in draw order, which is sequential sampling without replacement. A row that finds
    fewer than min(S, #candidates) redraws from its own generator seeded by (seed, row), which
    keeps the result uniform (the first stage, given success, is exchangeable) and keeps the main
    stream independent of histories and of `batch_size`.
    """
    b, num_items = excluded.shape
    rows = np.arange(b)[:, None]
    draws = rng.integers(0, num_items, size=(b, 2 * size + 16))  # (B, M)
    order = np.argsort(draws, axis=1, kind="stable")
    sorted_draws = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros(draws.shape, dtype=bool)
    np.put_along_axis(repeat, order[:, 1:], sorted_draws[:, 1:] == sorted_draws[:, :-1], axis=1)
    ok = ~repeat & ~excluded[rows, draws] & (draws != targets[:, None])
    taken = np.cumsum(ok, axis=1)
    ok &= taken <= size
    negatives = np.zeros((b, size), dtype=np.int64)
    r, c = np.nonzero(ok)
    negatives[r, taken[r, c] - 1] = draws[r, c]
    found = np.minimum(taken[:, -1], size)
    available = num_items - 1 - np.count_nonzero(excluded, axis=1)
    for row in np.flatnonzero(found < np.minimum(available, size)):
        candidates = np.flatnonzero(~excluded[row])
        candidates = candidates[candidates != targets[row]]
        own = np.random.default_rng([seed, first_row + int(row)])
        found[row] = min(size, len(candidates))
        negatives[row, : found[row]] = own.choice(candidates, size=found[row], replace=False)
    return negatives, np.arange(size) < found[:, None]


__all__ = [
    "Ranks",
    "Scorer",
    "coverage",
    "evaluate",
    "metrics_from_ranks",
    "rank_test_items",
]

"""What any scorer can reach on the built-in stream, with no privacy at all.

The federated targets ask the private model to beat recent popularity on the prequential stream
and on protocol (b). This measures, from the raw data (every user's interactions, no noise, no
sampling), how far non-private scorers that use more than popularity get: decayed and
trend-extrapolated counts, and counts plus a personal part (item co-occurrence with the user's
whole history, or with the user's last item). If none of them beats recent popularity, a private
model that learns from noised, sampled updates cannot be expected to.

    python benchmarks/stream_ceiling.py            # ~10 s on 2 cores
Writes benchmarks/results/stream_ceiling.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fedrec.common.baselines import ordered_scorer, popularity_scorer, recent_popularity_scorer
from fedrec.common.config import DataConfig
from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.data.stream import Stream, build_stream
from fedrec.common.evaluation import evaluate

RESULTS = Path(__file__).parent / "results" / "stream_ceiling.json"
ROUNDS = 30  # the default job's windows
DAY = 86_400


def counts(items: np.ndarray, num_items: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(items, weights=weights, minlength=num_items).astype(np.float64)


def cooccurrence(known: Interactions, num_users: int, num_items: int):
    """User-item incidence X and item-item co-occurrence C = XᵀX (diagonal removed)."""
    x = sp.csr_matrix((np.ones(len(known)), (known.user, known.item)), shape=(num_users, num_items))
    x.data[:] = 1.0
    c = (x.T @ x).tocsr()
    c.setdiag(0)
    c.eliminate_zeros()
    return x, c, np.sqrt(np.asarray(x.sum(0)).ravel() + 1.0)


def history_scorer(base: np.ndarray, x, c, norm: np.ndarray, beta: float) -> Callable:
    """log(1 + base) + β·log(1 + mean co-occurrence of the item with the user's history)."""

    def score(users: np.ndarray) -> np.ndarray:
        h = x[users]
        co = (h @ c).toarray() / norm[None, :]
        n = np.asarray(h.sum(1)).ravel()[:, None] + 1.0
        return (np.log1p(base)[None, :] + beta * np.log1p(co / n)).astype(np.float32)

    return score


def last_item_scorer(
    base: np.ndarray, history: UserHistories, c, norm: np.ndarray, beta: float
) -> Callable:
    """log(1 + base) + β·log(1 + co-occurrence with the user's most recent item)."""

    def score(users: np.ndarray) -> np.ndarray:
        out = np.tile(np.log1p(base), (len(users), 1))
        for row, user in enumerate(users):
            items = history.items_of(int(user))
            if len(items):
                out[row] += beta * np.log1p(c[int(items[-1])].toarray().ravel() / norm)
        return out.astype(np.float32)

    return score


def prequential(stream: Stream, last: int = 10) -> dict[str, float]:
    """Each of the last `last` windows ranked from everything before it (every user, exact)."""
    rows, num_items, num_users = stream.rows, stream.dataset.num_items, stream.dataset.num_users
    per_window: dict[str, list[float]] = {}
    for r in range(stream.num_rounds - last, stream.num_rounds):
        before = rows.select(stream.window < r)
        history = UserHistories.from_interactions(before, num_users)
        test = rows.select(stream.window == r)
        overall = counts(before.item, num_items)
        window = [counts(rows.item[stream.window == r - k], num_items) for k in (1, 2)]
        decayed = sum(
            0.5**k * counts(rows.item[stream.window == r - 1 - k], num_items) for k in range(r)
        )
        x, c, norm = cooccurrence(before, num_users, num_items)
        scorers = {
            # the run's own yardstick (simulations/report.py), same scorer and tie rule
            "recent popularity (previous window)": popularity_scorer(
                rows.select(stream.window == r - 1), num_items
            ),
            "decayed counts (x0.5 per window)": ordered_scorer([decayed, overall], num_items),
            "trend: c1 + 0.3 (c1 - c2)": ordered_scorer(
                [np.maximum(window[0] + 0.3 * (window[0] - window[1]), 0), overall], num_items
            ),
        }
        for beta in (0.3, 1.0):
            scorers[f"decayed + co-occurrence with history, beta {beta}"] = history_scorer(
                decayed, x, c, norm, beta
            )
            scorers[f"decayed + co-occurrence with last item, beta {beta}"] = last_item_scorer(
                decayed, history, c, norm, beta
            )
        for name, scorer in scorers.items():
            ndcg = evaluate(
                scorer, test=test, history=history, num_items=num_items, sampled_negatives=0
            )["ndcg@10"]
            per_window.setdefault(name, []).append(ndcg)
    return {name: float(np.mean(values)) for name, values in per_window.items()}


def temporal_test(stream: Stream) -> dict[str, float]:
    """Protocol (b): each user's first interaction after T, from everything streamed before T."""
    rows, num_items, num_users = stream.rows, stream.dataset.num_items, stream.dataset.num_users
    history = UserHistories.from_interactions(rows, num_users)
    overall = counts(rows.item, num_items)
    age_days = (rows.timestamp.max() - rows.timestamp) / DAY
    x, c, norm = cooccurrence(rows, num_users, num_items)
    scorers = {"recent popularity (last 10% of time)": recent_popularity_scorer(rows, num_items)}
    for half_life in (3, 7, 14):
        weights = 0.5 ** (age_days / half_life)
        scorers[f"counts with a {half_life}-day half-life"] = ordered_scorer(
            [counts(rows.item, num_items, weights), overall], num_items
        )
    weekly = counts(rows.item, num_items, 0.5 ** (age_days / 7))
    for beta in (0.1, 0.3, 1.0):
        scorers[f"7-day half-life + co-occurrence with history, beta {beta}"] = history_scorer(
            weekly, x, c, norm, beta
        )
    return {
        name: evaluate(
            scorer,
            test=stream.split.test,
            history=history,
            num_items=num_items,
            sampled_negatives=0,
        )["ndcg@10"]
        for name, scorer in scorers.items()
    }


def main() -> None:
    start = time.perf_counter()
    dataset = DataConfig().load()
    result = {
        "what": "non-private scorers on the built-in stream (every user's exact data)",
        "rounds": ROUNDS,
        "prequential_last10_ndcg@10": prequential(build_stream(dataset, ROUNDS, "loo")),
        "temporal_test_ndcg@10": temporal_test(build_stream(dataset, ROUNDS, "temporal")),
    }
    result["wall_s"] = round(time.perf_counter() - start, 1)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

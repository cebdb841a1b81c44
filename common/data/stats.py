"""What `fedrec data` reports about a dataset: counts, time span, sparsity, history lengths."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from fedrec.common.data.schema import Dataset

LENGTH_BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 9), (10, 19), (20, 49), (50, None))


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(dataset: Dataset) -> dict:
    """A JSON-ready summary. Users/items without any interaction are counted separately."""
    inter = dataset.interactions
    n = len(inter)
    per_user = np.bincount(inter.user, minlength=dataset.num_users)
    per_item = np.bincount(inter.item, minlength=dataset.num_items)
    active = per_user[per_user > 0]
    pairs = np.unique(inter.user * dataset.num_items + inter.item).size
    out: dict = {
        "name": dataset.name,
        "interactions": n,
        "users": int((per_user > 0).sum()),
        "items_in_catalogue": dataset.num_items,
        "items_with_interactions": int((per_item > 0).sum()),
        "repeat_interactions": n - int(pairs),
        "sparsity": 1.0 - pairs / max(1, (per_user > 0).sum() * max(1, (per_item > 0).sum())),
    }
    if n:
        out["time_span"] = {
            "first": _utc(inter.timestamp.min()),
            "last": _utc(inter.timestamp.max()),
            "days": float((inter.timestamp.max() - inter.timestamp.min()) / 86400.0),
        }
        out["interactions_per_user"] = {
            "min": int(active.min()),
            "median": float(np.median(active)),
            "mean": float(active.mean()),
            "p90": float(np.percentile(active, 90)),
            "max": int(active.max()),
            "histogram": {
                (f"{lo}" if hi == lo else f"{lo}+" if hi is None else f"{lo}-{hi}"): int(
                    ((active >= lo) & (active <= (hi or active.max()))).sum()
                )
                for lo, hi in LENGTH_BUCKETS
            },
            "users_with_at_least_5": int((active >= 5).sum()),
        }
        items_active = per_item[per_item > 0]
        out["interactions_per_item"] = {
            "median": float(np.median(items_active)),
            "max": int(items_active.max()),
            "top_1pct_share": float(
                np.sort(items_active)[::-1][: max(1, len(items_active) // 100)].sum() / n
            ),
        }
    if inter.rating is not None and n:
        values, counts = np.unique(inter.rating, return_counts=True)
        out["ratings"] = {f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)}
    return out

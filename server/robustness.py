"""Defences against poisoning devices, as plain functions on the server's parameters.

Two kinds, by what the server may see (README, "Malicious devices"):

- Per-item-row robust aggregation (`robust_delta`) reads every device's own update: only
  without secure aggregation, and only without user-level noise (a trimmed mean's sensitivity
  is not the clipped sum's the noise is calibrated to; `SimulationConfig.check_robustness`).
  Each device's change of an item row is norm-bounded, then each coordinate of the row is the
  trimmed mean (or median) over the devices that changed that row, weighted by their number
  (so a row many devices agree on moves as much as under the plain mean). Coordinate-wise
  trimmed mean and median: Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates"; per item row, since a device's update touches few rows
  (FedRecAttack, Rong et al. 2022, bounds per row as well).
- Bias damping (`cap_bias_change`, `damp_bias_jumps`) reads only the published aggregate's
  change of each item's served bias (the popularity term every user's ranking shares): post-
  processing of a DP release, so it holds under every calibration, secure aggregation
  included, at no privacy cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import mstats

ROBUST_METHODS = ("mean", "trimmed-mean", "median")


def robust_delta(
    global_params: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    *,
    row_tables: Sequence[str],
    method: str,
    trim: float = 0.1,
    row_clip_norm: float = 0.0,
) -> dict[str, np.ndarray]:
    """The round's change of every parameter, robust to a minority of bad updates.

    `updates` are the devices' new parameters (validated: names, shapes, finite). For the
    tables in `row_tables` (rows = items), each device's change of a row is first scaled to
    L2 norm at most `row_clip_norm` (0: not bounded); each coordinate of row r is then the
    `method` ("trimmed-mean", cutting `trim` of the n_r devices that changed row r from each
    end, "median", or "mean": the row bound alone) over those n_r devices, times n_r / K for K updates: a row untouched by
    anyone stays, and with identical changes the result is the plain mean's. Every other
    parameter is the coordinate-wise `method` over all K updates. float64, returned as float64.
    """
    if method not in ROBUST_METHODS:
        raise ValueError(f"method must be one of {ROBUST_METHODS}, not {method!r}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), not {trim}")
    if row_clip_norm < 0:
        raise ValueError(f"row_clip_norm must be >= 0, not {row_clip_norm}")
    k = len(updates)
    out: dict[str, np.ndarray] = {}
    for name, g in global_params.items():
        g64 = g.astype(np.float64)
        if k == 0:
            out[name] = np.zeros_like(g64)
            continue
        deltas = np.stack([u[name].astype(np.float64) - g64 for u in updates])  # (K, *shape)
        if name not in row_tables:
            flat = deltas.reshape(k, -1)
            out[name] = _center(np.ma.masked_array(flat), method, trim).reshape(g.shape)
            continue
        deltas = deltas.reshape(k, g.shape[0], -1)  # (K, R, C)
        if row_clip_norm > 0:
            norms = np.sqrt(np.einsum("krc,krc->kr", deltas, deltas))
            deltas *= np.minimum(1.0, row_clip_norm / np.maximum(norms, 1e-300))[..., None]
        touched = np.any(deltas != 0, axis=2)  # (K, R): the devices that changed each row
        mask = np.broadcast_to(~touched[..., None], deltas.shape)
        center = _center(np.ma.masked_array(deltas, mask=mask).reshape(k, -1), method, trim)
        weight = touched.sum(axis=0) / k  # (R,)
        out[name] = (center.reshape(g.shape[0], -1) * weight[:, None]).reshape(g.shape)
    return out


def _center(values: np.ma.MaskedArray, method: str, trim: float) -> np.ndarray:
    """Per column of (K, M) masked values: trimmed mean or median of the unmasked; 0 where
    every value is masked."""
    if method == "median":
        center = np.ma.median(values, axis=0)
    elif method == "mean":
        center = np.ma.mean(values, axis=0)
    else:
        center = mstats.trimmed_mean(values, limits=(trim, trim), inclusive=(True, True), axis=0)
    return np.ma.filled(np.ma.asarray(center, dtype=np.float64), 0.0)


@dataclass(frozen=True)
class BiasDamping:
    """What damping did to one round's item-bias changes (for the round's row)."""

    capped: int  # items whose change `cap_bias_change` cut
    flagged: list[int]  # items whose rise `damp_bias_jumps` flagged and damped, by index
    threshold: float  # the rise above which an item was flagged (score units); 0 when off

    def as_row(self) -> dict:
        return {
            "bias_capped": self.capped,
            "bias_flagged": len(self.flagged),
            "bias_flagged_items": self.flagged[:10],
            "bias_jump_threshold": self.threshold,
        }


def cap_bias_change(change: np.ndarray, cap: float) -> tuple[np.ndarray, int]:
    """Each item's change of served bias (score units) clipped to [-cap, cap], and how many
    were cut. A few devices can move an item only as far as the cap in one round, however
    they coordinate (an honest item moves by the same at most: the price in quality is
    measured in benchmarks/results/poisoning.json)."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, not {cap}")
    clipped = np.clip(change, -cap, cap)
    return clipped, int(np.count_nonzero(clipped != change))


# 1.4826 x MAD estimates the standard deviation of normal data (the bulk of a round's bias
# changes: most items move by DP noise alone)
MAD_TO_STD = 1.4826


def damp_bias_jumps(
    change: np.ndarray, bias: np.ndarray, *, sustained: float, k: float
) -> tuple[np.ndarray, list[int], float]:
    """Flag and damp items whose bias rises far beyond what their own bias sustains.

    `bias` is each item's served bias before the round (score units), `change` the round's
    change of it. Under per-round decay d of the biases an item whose popularity holds steady
    needs a change of `sustained` x its bias each round (d / (1 - d)), so the item's excess
    rise is change - sustained x max(bias, 0). An excess above k robust standard deviations
    of the round's changes (1.4826 x MAD over all items: mostly the DP noise) is a jump: the
    item is flagged and its change damped to that threshold. Honest items climbing the ranks
    are slowed too (a rise is spread over rounds); falls are never touched. Rises are measured
    from the round's median change (the shift every item shares). Returns the damped
    changes, the flagged items and the threshold."""
    if not k > 0 or sustained < 0:
        raise ValueError(f"k must be > 0 and sustained >= 0, not {k} and {sustained}")
    median = float(np.median(change))
    threshold = k * MAD_TO_STD * float(np.median(np.abs(change - median)))
    allowed = median + sustained * np.maximum(bias, 0.0) + threshold
    flagged = np.flatnonzero(change > allowed)
    return np.minimum(change, allowed), [int(i) for i in flagged], threshold

"""What a device puts into a round's two secure sums, and the round's SecAgg+ configurations:
the one definition the simulated devices, the deployed devices and the server share.

A round runs two SecAgg+ instances over the same devices: the updates' DDG encodings mod 2^b
(`fedrec.common.secagg.encoding`) and the round counters, fixed point mod 2^62
(`fedrec.common.secagg.counters`; a separate modulus, since a wider one would reveal the
encodings' carries). Devices derive both configurations themselves from the run's settings,
the round's device count and its public seed, so each can check what it is asked to take
part in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.privacy.randomness import PrivacyRandomness
from fedrec.common.secagg import counters
from fedrec.common.secagg.encoding import DDGParams, encode_update, modular_sum, noised_residues
from fedrec.common.secagg.protocol import SecAggConfig

# What a device's reply may add to a secure sum besides its update (`reply_counters`):
# counters that add up. "trained" and "loss_count" are derived when summing; the rest are
# its metrics.
SUMMED_METRICS = (
    "declined",
    "noise_only",
    "examples",
    "retired_now",
    "preq_count",
    "preq_hits@10",
    "preq_ndcg@10",
)

# A maximum does not add up: under secure aggregation each device adds a 1 to the bin of its
# worst interaction ε (bins EPS_BIN wide up to EPS_BINS * EPS_BIN, then one open bin), and the
# round reports the upper edge of the highest non-empty bin, a bound on the sampled maximum.
EPS_BIN, EPS_BINS = 0.25, 64

# The counters a pooled reply carries: SUMMED_METRICS, the derived ones, and the histogram of
# the devices' worst interaction ε (`epsilon_bin_key`).
COUNTERS: tuple[str, ...] = (
    *SUMMED_METRICS,
    "trained",
    "loss",
    "loss_count",
    *(f"eps_bin/{edge}" for edge in range(EPS_BINS + 2)),
)


def epsilon_bin_key(epsilon: float) -> str:
    edge = min(math.ceil(epsilon / EPS_BIN), EPS_BINS + 1)
    return f"eps_bin/{edge}"


def reply_counters(metrics: Mapping[str, float]) -> dict[str, float]:
    """What one member's reply adds to a secure sum's counters: its SUMMED_METRICS, a 1 in
    "trained" and its finite loss if it trained, and a 1 in the bin of its worst interaction ε."""
    out = {key: float(metrics.get(key, 0.0)) for key in SUMMED_METRICS}
    if "max_interaction_epsilon" in metrics:
        out[epsilon_bin_key(float(metrics["max_interaction_epsilon"]))] = 1.0
    if metrics.get("noise_only") != 1.0:
        out["trained"] = 1.0
        loss = float(metrics.get("loss", math.nan))
        if math.isfinite(loss):
            out["loss"], out["loss_count"] = loss, 1.0
    return out


def secagg_configs(
    ddg: DDGParams, *, devices: int, min_survivors: int, public_seed: int
) -> tuple[SecAggConfig, SecAggConfig]:
    """(updates, counters) SecAgg+ configurations of a round of `devices` devices: k = 2⌈log₂ n⌉
    neighbours (all others when fewer), threshold a strict majority t = ⌊(k+1)/2⌋ + 1 of the
    k + 1 share holders (Bell et al. 2020 take k = O(log n); an odd k, n - 1 of a small round,
    needs the +1 that ⌊k/2⌋ + 1 would miss)."""
    degree = max(2, min(devices - 1, 2 * math.ceil(math.log2(max(devices, 2)))))
    common = {
        "degree": degree,
        "threshold": (degree + 1) // 2 + 1,
        "min_survivors": min_survivors,
        "public_seed": public_seed,
    }
    return (
        SecAggConfig(bits=ddg.bits, length=ddg.padded_dim, **common),
        SecAggConfig(bits=counters.BITS, length=len(COUNTERS), **common),
    )


def round_public_seed(run_seed: int, round: int) -> int:
    """A round's public randomness (rotation signs, neighbour graph), known to everyone."""
    digest = hashlib.sha256(f"fedrec secagg round {run_seed} {round}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def encode_inputs(
    change: Mapping[str, np.ndarray],
    metrics: Mapping[str, float],
    ddg: DDGParams,
    public_seed: int,
    randomness: PrivacyRandomness,
) -> tuple[np.ndarray, np.ndarray]:
    """A device's two secure-sum inputs: its update's change from the received parameters,
    DDG-encoded with its discrete noise share (zeros for an idle device: only the share), and
    its counters. ValueError when the change cannot be encoded."""
    encoded = encode_update(change, ddg, public_seed, randomness)
    return encoded, counters.encode_counters(reply_counters(metrics), COUNTERS)


def encode_members(
    rounded: Sequence[np.ndarray],
    metrics: Sequence[Mapping[str, float]],
    ddg: DDGParams,
    randomness: PrivacyRandomness,
) -> tuple[np.ndarray, np.ndarray]:
    """One SecAgg+ party's two inputs for several devices (an execution slot of the
    simulation): Σ of the trained members' `rounded` updates (`encoding.rounded_update`, each
    rounded on its own) plus every member's noise share, drawn as one (`noised_residues`: a
    member per entry of `metrics`, idle ones included), and Σ of the members' counters. The
    same modular sums the members' own `encode_inputs` would add up to, in distribution."""
    total = np.zeros(ddg.padded_dim, np.int64)
    for vector in rounded:
        total += vector
    update = noised_residues(total, ddg, shares=len(metrics), randomness=randomness)
    tallies = [counters.encode_counters(reply_counters(m), COUNTERS) for m in metrics]
    tally = modular_sum(tallies, counters.BITS) if tallies else np.zeros(len(COUNTERS), np.uint64)
    return update, tally

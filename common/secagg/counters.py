"""A device's round counters as integers for a secure sum (no DP noise: the same counters the
clear simulated sum reveals, `fedrec.server.secure_aggregation.secure_sum`).

Fixed point with SCALE (the loss and NDCG sums are fractional), summed mod 2^BITS: a sum of
up to 2^(BITS-1)/SCALE ≈ 2·10^12 in each counter decodes exactly (to 1/SCALE per device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.secagg.encoding import centre

BITS = 62
SCALE = 1 << 20


def encode_counters(values: Mapping[str, float], keys: Sequence[str]) -> np.ndarray:
    """(len(keys),) uint64 residues mod 2^BITS of round(value·SCALE); a missing key is 0."""
    ints = np.array([round(float(values.get(k, 0.0)) * SCALE) for k in keys], dtype=np.int64)
    return np.mod(ints, 1 << BITS).astype(np.uint64)


def decode_counters(total: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    """The summed counters of a modular total of `encode_counters` vectors."""
    centred = centre(total, BITS)
    return {k: float(v) / SCALE for k, v in zip(keys, centred.tolist(), strict=True)}

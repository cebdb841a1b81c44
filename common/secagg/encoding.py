"""The distributed discrete Gaussian (DDG) encoding of a device's update, and its decoding.

Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation" (ICML; arXiv 2102.06387), Algorithm 1 (client) and
Algorithm 2 (server). A device, with its update x clipped to ‖x‖₂ ≤ c:
  (a) scales by γ⁻¹ (γ, the granularity, is one integer step in the update's units);
  (b) rotates by the randomized Walsh-Hadamard transform H·D/√D' (D' = d padded to a power of
      2, D a diagonal of ±1 from a PUBLIC seed shared by all devices of the round): an
      orthonormal map, so norms are kept, and it spreads the mass evenly over coordinates, so
      that no coordinate of the sum comes near the modulus (their Section 4.2, Lemma 29);
  (c) rounds each coordinate to ⌊z⌋ or ⌈z⌉ at random, unbiased, and retries until the rounded
      vector's norm is at most (Theorem 1 / Proposition 22, the bound their code implements)
        min( c/γ + √D',  √((c/γ)² + D'/4 + √(2 log(1/β))·(c/γ + √D'/2)) ),
      which a single try meets with probability ≥ 1 - β; this bound is the L2 sensitivity the
      accounting uses (`fedrec.common.secagg.ddg_accounting`);
  (d) adds N_Z(0, σ²) noise per coordinate (σ in integer units);
  (e) reduces mod 2^b.
The server's modular sum of the survivors' vectors is centred into [-2^(b-1), 2^(b-1)),
rotated back and scaled by γ. It equals the true sum whenever no coordinate of the integer sum
left that range; `decode_sum` counts the coordinates near its edge (wrap-around risk).

Public randomness (the rotation's signs) comes from numpy's seeded generator; every draw a
guarantee depends on (rounding, noise) from a `PrivacyRandomness`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedrec.common.privacy.randomness import PrivacyRandomness
from fedrec.common.secagg.discrete_gaussian import sample_discrete_gaussian

MAX_BITS = 62  # a sum of two residues < 2^62 stays below 2^63: no int64 overflow anywhere
_MAX_ROUNDING_TRIES = 1000  # each try passes with probability ≥ 1 - β; β near 1 is rejected


@dataclass(frozen=True)
class DDGParams:
    """The DDG mechanism of one round, shared by the devices and the server."""

    gamma: float  # γ: one integer step, in the update's units (smaller: finer, larger sums)
    bits: int  # b: the secure sum is mod 2^b
    clip_norm: float  # c: L2 bound of a device's update, in the update's units
    beta: float  # β in [0, 1): conditional rounding's failure rate; tightens the norm bound
    sigma: float  # σ: each device's discrete Gaussian std, in integer units
    dim: int  # d: coordinates of the flattened update (before padding)

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError("gamma must be a finite number > 0")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= MAX_BITS):
            raise ValueError(f"bits must be an integer in [2, {MAX_BITS}]")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError("clip_norm must be a finite number > 0")
        if not 0 <= self.beta < 1:
            raise ValueError("beta must be in [0, 1)")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError("sigma must be a finite number >= 0")
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError("dim must be an integer >= 1")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def padded_dim(self) -> int:
        """D': d rounded up to a power of 2 (the Walsh-Hadamard transform's length)."""
        return 1 << (self.dim - 1).bit_length()

    @property
    def rounded_norm_bound(self) -> float:
        """L2 bound of a device's rounded integer vector: its sensitivity in integer units."""
        return rounded_norm_bound(self.clip_norm / self.gamma, self.beta, self.padded_dim)


def rounded_norm_bound(scaled_norm: float, beta: float, dim: int) -> float:
    """Kairouz et al. 2021, Theorem 1 / Proposition 22: the L2 norm that conditional randomized
    rounding keeps a vector of norm `scaled_norm` in `dim` coordinates under (β = 0: the
    triangle inequality's c + √d, since each coordinate moves by less than 1)."""
    plain = scaled_norm + math.sqrt(dim)
    if beta == 0:
        return plain
    squared = (
        scaled_norm**2
        + dim / 4
        + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + math.sqrt(dim) / 2)
    )
    return min(plain, math.sqrt(squared))


def heuristic_gamma(
    *, noise_std: float, clip_norm: float, bits: int, n: int, padded_dim: int, k_stds: float = 4.0
) -> float:
    """γ at which k standard deviations of a coordinate of the n-device sum just fit in
    [-2^(b-1), 2^(b-1)) (Kairouz et al. 2021, Sections 4.2 and 4.4; the authors' code's
    `heuristic_scale_factor` with flatness ρ = 1): after the rotation a coordinate of the sum
    is treated as subgaussian with variance (c·n)²/D' (all updates aligned, the worst case)
    plus n·(γ²/4 + noise_std²) (rounding and noise; `noise_std` in the update's units, σ·γ),
    so 2^b·γ = 2k·√((c·n)²/D' + n·(γ²/4 + noise_std²)), solved for γ."""
    room = 2.0 ** (2 * bits) - n * k_stds**2
    if room <= 0:
        raise ValueError(f"{bits} bits cannot hold {k_stds} standard deviations of {n} devices")
    spread = (clip_norm * n) ** 2 / padded_dim + n * noise_std**2
    return 2 * k_stds * math.sqrt(spread) / math.sqrt(room)


def rotation_signs(public_seed: int, padded_dim: int) -> np.ndarray:
    """The round's public ±1 diagonal: the same for every device (public randomness)."""
    rng = np.random.default_rng([int(public_seed), padded_dim, 0xDD6])
    return rng.integers(0, 2, padded_dim, dtype=np.int8) * 2.0 - 1.0


def walsh_hadamard(x: np.ndarray) -> np.ndarray:
    """H·x/√n for n = len(x) a power of 2: orthonormal and its own inverse."""
    n = x.shape[0]
    if n & (n - 1):
        raise ValueError("length must be a power of 2")
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < n:
        pairs = y.reshape(-1, 2, h)  # (blocks, 2, h): the butterfly's two halves
        a, b = pairs[:, 0, :].copy(), pairs[:, 1, :]
        pairs[:, 0, :] += b
        pairs[:, 1, :] = a - b
        h *= 2
    return y / math.sqrt(n)


def rotate(x: np.ndarray, public_seed: int) -> np.ndarray:
    """H·D·x/√D' of x padded with zeros to D'."""
    padded = np.zeros(1 << (x.shape[0] - 1).bit_length())
    padded[: x.shape[0]] = x
    return walsh_hadamard(rotation_signs(public_seed, padded.shape[0]) * padded)


def unrotate(y: np.ndarray, public_seed: int, dim: int) -> np.ndarray:
    """The inverse of `rotate`: D·H·y/√D', truncated to the first `dim` coordinates."""
    return (rotation_signs(public_seed, y.shape[0]) * walsh_hadamard(y))[:dim]


def l2_norm(x: np.ndarray) -> float:
    """‖x‖₂ without BLAS (`np.linalg.norm` calls a threaded dot product that costs
    milliseconds on a busy machine for a vector of 16k)."""
    return math.sqrt(float(np.square(x).sum()))


def conditional_round(z: np.ndarray, bound: float, randomness: PrivacyRandomness) -> np.ndarray:
    """Unbiased randomized rounding of z to integers, retried until ‖·‖₂ ≤ bound."""
    floor = np.floor(z)
    frac = z - floor
    for _ in range(_MAX_ROUNDING_TRIES):
        rounded = floor + (randomness.random(z.shape[0]) <= frac)
        if l2_norm(rounded) <= bound:
            return rounded.astype(np.int64)
    raise RuntimeError(f"no rounding within norm {bound} in {_MAX_ROUNDING_TRIES} tries")


def flatten(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """The update's arrays as one float64 vector, in the mapping's order."""
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in delta.values()])


def clip(x: np.ndarray, clip_norm: float) -> np.ndarray:
    norm = l2_norm(x)
    return x * (clip_norm / norm) if norm > clip_norm else x


def rounded_update(
    delta: Mapping[str, np.ndarray],
    params: DDGParams,
    public_seed: int,
    randomness: PrivacyRandomness,
) -> np.ndarray:
    """(D',) int64: one device's clipped, scaled, rotated and rounded update (module docstring,
    steps a-c), before its noise. ValueError for a change of the wrong size or not finite."""
    x = flatten(delta)
    if x.shape[0] != params.dim:
        raise ValueError(f"update has {x.shape[0]} coordinates, params.dim is {params.dim}")
    if not np.isfinite(x).all():
        raise ValueError("update has non-finite values")
    if not x.any():  # an idle device's zero change: rotating and rounding 0 give 0 exactly
        return np.zeros(params.padded_dim, np.int64)
    z = rotate(clip(x, params.clip_norm) / params.gamma, public_seed)
    return conditional_round(z, params.rounded_norm_bound, randomness)


def encode_update(
    delta: Mapping[str, np.ndarray],
    params: DDGParams,
    public_seed: int,
    randomness: PrivacyRandomness,
) -> np.ndarray:
    """(D',) uint64 residues mod 2^b: one device's clipped, scaled, rotated, rounded and
    noised update (module docstring, steps a-e)."""
    rounded = rounded_update(delta, params, public_seed, randomness)
    return noised_residues(rounded, params, shares=1, randomness=randomness)


def noised_residues(
    rounded: np.ndarray, params: DDGParams, *, shares: int, randomness: PrivacyRandomness
) -> np.ndarray:
    """(rounded + the noise shares of `shares` devices) mod 2^b, uint64 (steps d-e).

    Several devices' shares are drawn as ONE N_Z(0, shares·σ²) (a party that sums the
    encodings of several simulated devices, `fedrec.common.secagg.round_inputs.encode_members`).
    Why the accountant's bound for n separate shares still holds: Kairouz et al. build it by
    adding one share at a time to a running sum with their two-term bound, N_Z(0, aσ²) plus
    N_Z(0, bσ²) being within 10·exp(-2π²σ²·ab/(a+b)) of N_Z(0, (a+b)σ²); the j-th of the n - 1
    joins (a = j, b = 1) gives τ's term j/(j+1) (`fedrec.common.secagg.ddg_accounting.tau`).
    Joining P ≤ n parties' draws takes P - 1 joins, the j-th with a ≥ j and b ≥ 1, so
    ab/(a+b) ≥ j/(j+1): every term is at most the i.i.d. chain's, and there are fewer of them.
    The summed noise is at least as close to N_Z(0, nσ²) as n separate shares.
    """
    if shares < 0:
        raise ValueError("shares must be >= 0")
    noised = np.asarray(rounded, np.int64)
    if shares:
        sigma = params.sigma * math.sqrt(shares)
        noised = noised + sample_discrete_gaussian(sigma, noised.shape[0], randomness)
    return np.mod(noised, params.modulus).astype(np.uint64)


def modular_sum(vectors: Sequence[np.ndarray], bits: int) -> np.ndarray:
    """Σ vectors mod 2^bits, reduced after each addition (uint64, never past 2^63)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}]")
    mask = np.uint64((1 << bits) - 1)
    total = np.zeros_like(np.asarray(vectors[0], np.uint64))
    for v in vectors:
        total = (total + (np.asarray(v, np.uint64) & mask)) & mask
    return total


def centre(total: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^bits as int64 in [-2^(bits-1), 2^(bits-1))."""
    v = (np.asarray(total, np.uint64) & np.uint64((1 << bits) - 1)).astype(np.int64)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def decode_sum(
    total: np.ndarray,
    shapes: Mapping[str, tuple[int, ...]],
    params: DDGParams,
    public_seed: int,
    survivors: int,
    *,
    k_stds: float = 4.0,
) -> tuple[dict[str, np.ndarray], int]:
    """(Σ of the survivors' updates as arrays shaped `shapes`, wrap-around risk count).

    A coordinate of the integer sum that left [-2^(b-1), 2^(b-1)) reappears at the other end
    of the range, and the decoded sum is then wrong by 2^b·γ spread over all coordinates by
    the rotation; it cannot be told apart from a legitimate value there. So the count is of
    the coordinates in the outer 1/k of the range (|centred| ≥ (1 - 1/k)·2^(b-1), k =
    `k_stds`): with γ from `heuristic_gamma` (which provisions k standard deviations) about
    0.3% of them for k = 4; many more say γ or b is too small for this round.
    `survivors` is the number of devices in the sum (checked; a mean divides by it)."""
    if not (isinstance(survivors, int) and survivors >= 1):
        raise ValueError("survivors must be an integer >= 1")
    if sum(math.prod(s) for s in shapes.values()) != params.dim:
        raise ValueError("shapes do not add up to params.dim")
    total = np.asarray(total)
    if total.shape != (params.padded_dim,):
        raise ValueError(f"sum has shape {total.shape}, expected ({params.padded_dim},)")
    centred = centre(total, params.bits)
    edge = float(1 << (params.bits - 1))
    at_risk = int((np.abs(centred) >= edge * (1 - 1 / k_stds)).sum())
    flat = unrotate(centred.astype(np.float64), public_seed, params.dim) * params.gamma
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = flat[start : start + size].reshape(shape)
        start += size
    return out, at_risk

"""Privacy of the distributed discrete Gaussian: n devices' N_Z(0, σ²) shares over one sum.

Kairouz, Liu & Steinke 2021 (ICML; arXiv 2102.06387). The sum of n independent N_Z(0, σ²) is
close to N_Z(0, nσ²) (their Theorem 1 with Proposition 14): with
    τ = 10 · Σ_{k=1}^{n-1} exp(-2π²σ² · k/(k+1)),
and the sensitivities Δ₂, Δ₁ of one device's integer vector (in integer units), s₂ = Δ₂/(√n·σ),
s₁ = Δ₁/(√n·σ), the summed noise gives, at every Rényi order α ≥ 1 (Proposition 14 / Eq. 17),
    D_α ≤ min( α/2·s₂² + τ·d,  α/2·(s₂² + 2·s₁·τ + τ²·d),  α/2·(s₂ + τ·√d)² ),
d the number of noised coordinates (the padded dimension). Since τ·d ≤ α·τ·d for α ≥ 1, this
is ½ε²-concentrated DP with
    ε = min( √(s₂² + 2τd),  √(s₂² + 2·s₁·τ + τ²·d),  s₂ + τ·√d ),
and as τ → 0 (σ ≳ 1 makes τ negligible) it is the continuous Gaussian's ρ = Δ₂²/(2nσ²).
Sensitivities (Theorem 1 / Proposition 22): Δ₂ is conditional rounding's norm bound
(`fedrec.common.secagg.encoding.rounded_norm_bound`) and, the vector being integral,
Δ₁ ≤ min(Δ₂², √d·Δ₂).

Verified against: the formulas above as implemented by the paper's authors in
google-research/federated `distributed_dp/accounting_utils.py` (`compute_rdp_dgaussian`,
`rounded_l2_norm_bound`, `ddgauss_epsilon`), read while writing this module; the paper itself
was not at hand, so equation numbers follow that code's comments (arXiv numbering).

Adjacency: one device's vector replaced by zero while its noise share stays in the sum (what the
authors analyse, and what this project's idle devices do: they send noise only). Replacing one
vector by another doubles Δ. n must be a lower bound on the devices whose noise is in the sum:
the server's K_min (it discards rounds with fewer survivors).

Poisson subsampling of devices at rate q: the general upper bound of Zhu & Wang 2019, "Poisson
Subsampled Rényi Differential Privacy" (ICML), Theorem 6, at integer orders α ≥ 2:
    (α-1)·ε_q(α) ≤ log( (1-q)^{α-1}(αq - q + 1) + C(α,2) q² (1-q)^{α-2} e^{ε(2)}
                        + 3 Σ_{l=3}^{α} C(α,l) q^l (1-q)^{α-l} e^{(l-1)ε(l)} ),
(the authors' code uses the same bound), and the unamplified ε(α) at the other orders of
`fedrec.common.privacy.accounting.ORDERS`, which is always valid. It assumes the sampled set is
secret and that every sampled device's noise share is in the sum (idle devices send noise).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, logsumexp

from fedrec.common.privacy.accounting import ORDERS, epsilon_from_rdp
from fedrec.common.secagg.encoding import DDGParams, rounded_norm_bound

_ORDERS = np.asarray(ORDERS, dtype=np.float64)
_MAX_SIGMA = 1e9  # integer units; beyond it the calibration gives up


def tau(sigma: float, n: int) -> float:
    """τ = 10·Σ_{k=1}^{n-1} exp(-2π²σ²·k/(k+1)): how far n shares' sum is from N_Z(0, nσ²)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if sigma <= 0:
        return math.inf
    k = np.arange(1, n, dtype=np.float64)
    return float(10 * np.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)).sum())


def sensitivities(*, clip_norm: float, gamma: float, beta: float, dim: int) -> tuple[float, float]:
    """(Δ₂, Δ₁) of one device's rounded integer vector in `dim` (padded) coordinates."""
    l2 = rounded_norm_bound(clip_norm / gamma, beta, dim)
    return l2, l2 * min(math.sqrt(dim), l2)


def zcdp_epsilon(*, l2: float, l1: float, sigma: float, n: int, dim: int) -> float:
    """ε of ½ε²-concentrated DP of one noisy sum (module docstring)."""
    if sigma <= 0:
        return math.inf
    s2, s1, t = l2 / (math.sqrt(n) * sigma), l1 / (math.sqrt(n) * sigma), tau(sigma, n)
    return min(
        math.sqrt(s2**2 + 2 * t * dim),
        math.sqrt(s2**2 + 2 * s1 * t + t**2 * dim),
        s2 + t * math.sqrt(dim),
    )


def rdp(orders: np.ndarray, *, l2: float, l1: float, sigma: float, n: int, dim: int) -> np.ndarray:
    """Rényi DP at each of `orders` (≥ 1) of one noisy sum, without subsampling."""
    a = np.asarray(orders, dtype=np.float64)
    if sigma <= 0:
        return np.full(a.shape, np.inf)
    s2, s1, t = l2 / (math.sqrt(n) * sigma), l1 / (math.sqrt(n) * sigma), tau(sigma, n)
    return np.minimum.reduce(
        [
            a / 2 * s2**2 + t * dim,
            a / 2 * (s2**2 + 2 * s1 * t + t**2 * dim),
            a / 2 * (s2 + t * math.sqrt(dim)) ** 2,
        ]
    )


def _log_comb(a: int, ls: np.ndarray) -> np.ndarray:
    return gammaln(a + 1) - gammaln(ls + 1) - gammaln(a - ls + 1)


def subsampled_rdp(order: int, q: float, eps: np.ndarray) -> float:
    """Zhu & Wang 2019, Theorem 6, at integer `order` ≥ 2; eps[l] the unsampled RDP at order
    l for l = 0..order (entries 0 and 1 unused)."""
    if q == 1:
        return float(eps[order])
    a = order
    logs = [
        (a - 1) * math.log1p(-q) + math.log(a * q - q + 1),
        float(_log_comb(a, np.array(2.0))) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + eps[2],
    ]
    ls = np.arange(3, a + 1, dtype=np.float64)
    if ls.size:
        terms = (
            math.log(3)
            + _log_comb(a, ls)
            + ls * math.log(q)
            + (a - ls) * math.log1p(-q)
            + (ls - 1) * eps[3 : a + 1]
        )
        logs.extend(terms.tolist())
    return float(logsumexp(logs)) / (a - 1)


def ddg_rdp(
    *,
    sigma: float,
    n: int,
    clip_norm: float,
    gamma: float,
    beta: float,
    dim: int,
    rounds: int = 1,
    sample_rate: float = 1.0,
) -> np.ndarray:
    """RDP over ORDERS of `rounds` noisy sums (dim: the padded dimension D'), composed
    additively; with sample_rate < 1, Zhu & Wang's bound at integer orders where it is lower."""
    if not 0 < sample_rate <= 1:
        raise ValueError("sample_rate must be in (0, 1]")
    l2, l1 = sensitivities(clip_norm=clip_norm, gamma=gamma, beta=beta, dim=dim)
    plain = rdp(_ORDERS, l2=l2, l1=l1, sigma=sigma, n=n, dim=dim)
    if sample_rate < 1 and np.isfinite(plain).all():
        top = int(_ORDERS.max())
        eps = rdp(np.arange(top + 1.0), l2=l2, l1=l1, sigma=sigma, n=n, dim=dim)
        for i, a in enumerate(_ORDERS):
            if a >= 2 and float(a).is_integer():
                plain[i] = min(plain[i], subsampled_rdp(int(a), sample_rate, eps))
    return plain * rounds


def ddg_epsilon(
    *,
    sigma: float,
    n: int,
    clip_norm: float,
    gamma: float,
    beta: float,
    dim: int,
    rounds: int,
    delta: float,
    sample_rate: float = 1.0,
) -> float:
    """ε at δ after `rounds` sums, by the RDP conversion of `fedrec.common.privacy.accounting`."""
    curve = ddg_rdp(
        sigma=sigma,
        n=n,
        clip_norm=clip_norm,
        gamma=gamma,
        beta=beta,
        dim=dim,
        rounds=rounds,
        sample_rate=sample_rate,
    )
    return epsilon_from_rdp(curve, delta)[0]


def params_epsilon(
    params: DDGParams, *, n: int, rounds: int, delta: float, sample_rate: float = 1.0
) -> float:
    """`ddg_epsilon` of a round's `DDGParams` (noise in its padded dimension)."""
    return ddg_epsilon(
        sigma=params.sigma,
        n=n,
        clip_norm=params.clip_norm,
        gamma=params.gamma,
        beta=params.beta,
        dim=params.padded_dim,
        rounds=rounds,
        delta=delta,
        sample_rate=sample_rate,
    )


def calibrate_ddg_sigma(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    n: int,
    dim: int,
    clip_norm: float,
    gamma: float,
    beta: float,
    sample_rate: float = 1.0,
) -> float:
    """Smallest per-device σ (integer units) on a 0.1% relative grid, rounded UP, with
    ε(δ) ≤ target after `rounds` sums of n ≥ K_min devices; dim is the padded dimension.

    Bisection on log σ, using that ε decreases as σ grows (s₂, s₁ and τ all fall). The result
    is exactly what `ddg_epsilon` charges for it."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError("target_epsilon must be a finite number > 0")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError("rounds must be an integer >= 1")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError("n must be an integer >= 1")

    def fits(sigma: float) -> bool:
        eps = ddg_epsilon(
            sigma=sigma,
            n=n,
            clip_norm=clip_norm,
            gamma=gamma,
            beta=beta,
            dim=dim,
            rounds=rounds,
            delta=delta,
            sample_rate=sample_rate,
        )
        return eps <= target_epsilon

    lo, hi = 0.0, 1.0  # invariant: lo does not fit (σ = 0 is ε = inf), hi fits
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > _MAX_SIGMA:
            raise ValueError(f"no sigma up to {_MAX_SIGMA} reaches ε ≤ {target_epsilon}")
    while hi - lo > 1e-3 * hi:
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi

"""Independent recomputation of ε with Google's `dp_accounting` (RDP and PLD).

A history is a multiset of Poisson-subsampled Gaussian mechanisms: `Key` = sorted tuples
(q, σ, steps), steps summed over equal (q, σ). Ledgers hold few distinct histories, so every
figure is computed once per distinct key and cached; 10k ledgers audit in seconds.

RDP: over the RDP orders fedrec states it uses (Opacus's defaults: 1.1..10.9 step 0.1, then
12..63), add/remove-one adjacency, converted to (ε, δ) by dp_accounting's
`rdp_privacy_accountant.compute_epsilon` (Balle et al. 2020 / Canonne, Kamath & Steinke 2020,
the conversion fedrec states it uses). Integer orders come from
`dp_accounting.rdp.RdpAccountant` (closed form). Fractional orders are integrated numerically
from the definition (`_log_a_fractional`): dp_accounting 0.6's series for them stops on a
relative criterion that differs from Opacus's, returns values up to ~15% higher at some orders
(looser, still valid) and gives up (+inf) on low orders when σ is small; with those values ε
comes out 0.01-1.5% above fedrec's, which would hide a real disagreement in the tolerance. The
integral matches Opacus's series to < 1e-4 relative per order (the largest gaps on RDP values
below 1e-8, where they do not move ε), and the recomputed ε matches fedrec's to ~1e-14
relative on real runs; the audit tolerates `RDP_REL_TOL`.

PLD: as `dp_accounting.pld.PLDAccountant` composes it (pessimistic discretisation, interval `pld_interval`),
a tighter valid bound. Any RDP value must be ≥ the PLD value: RDP is an upper bound on the
true ε and the pessimistic PLD is within a discretisation error above it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as PLD
from dp_accounting.privacy_accountant import NeighboringRelation as NeighborRel
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

# The orders fedrec states it minimises over (README / ledger docs): written out, not imported.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
_INTEGER = [i for i, a in enumerate(ORDERS) if float(a).is_integer()]
_FRACTIONAL = [i for i, a in enumerate(ORDERS) if not float(a).is_integer()]
RDP_REL_TOL = 1e-6  # reported vs recomputed RDP ε: the same math, so floating-point slack
PLD_REL_TOL = 1e-6  # slack of "RDP ≥ PLD" for the PLD discretisation's rounding


class DDGCharge(NamedTuple):
    """One device's distributed discrete Gaussian over a sum of n shares (its "σ" slot in a
    history): σ in integer steps, γ, the update's clip, the padded dimension D', n."""

    sigma: float
    gamma: float
    clip_norm: float
    padded_dim: int
    n: int


# sorted (sample rate q, noise multiplier σ or a DDGCharge, steps)
Key = tuple[tuple[float, float | DDGCharge, int], ...]


@dataclass(frozen=True)
class AccountingConfig:
    pld: bool = True  # also compute the PLD bound of every distinct history
    pld_interval: float = 1e-3  # PLD value discretisation (finer: slower)


def key_of(counts: dict[tuple[float, Any], int]) -> Key:
    """Gaussian charges first (by q, σ), then discrete ones: never a float compared with one."""
    items = [(q, s, n) for (q, s), n in counts.items() if n > 0]
    return tuple(sorted(items, key=lambda t: (isinstance(t[1], DDGCharge), t)))


def _log_a_fractional(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """(α-1)·RDP_α of one step for each α in `orders`: log E_{z~N(0,σ²)}[((1-q) +
    q·e^{(2z-1)/(2σ²)})^α], the defining integral (Mironov, Talwar & Zhang 2019, Sec. 3).

    Trapezoid rule on a uniform grid, in log space: the integrand is smooth and decays like a
    Gaussian, for which the rule converges exponentially in the grid step (step σ/40 over
    ±40σ around the mass, which lies in [0, α]); checked against Opacus's series in the tests.
    """
    var = sigma * sigma
    z = np.arange(-40 * sigma - 2, float(orders.max()) + 40 * sigma + 2, sigma / 40)
    ratio = (2 * z - 1) / (2 * var)
    mix = np.logaddexp(math.log1p(-q), math.log(q) + ratio)  # log((1-q) + q·e^ratio)
    log_f = -z * z / (2 * var) - 0.5 * math.log(2 * math.pi * var) + orders[:, None] * mix
    weights = np.full(len(z), math.log(sigma / 40))
    weights[[0, -1]] += math.log(0.5)
    return special.logsumexp(log_f + weights, axis=1)


class Recomputer:
    """ε of histories, cached per distinct history and δ."""

    def __init__(self, config: AccountingConfig | None = None) -> None:
        self.config = config or AccountingConfig()
        self._one: dict[tuple[float, Any], np.ndarray] = {}
        self._rdp: dict[tuple[Key, float], float] = {}
        self._pld: dict[tuple[Key, float], float] = {}
        self._pld_parts: dict[tuple[float, float, int], Any] = {}

    def one_step(self, q: float, sigma: float) -> np.ndarray:
        """RDP over ORDERS of one Poisson-subsampled Gaussian step (σ > 0): integer orders by
        dp_accounting's closed form, fractional orders by integrating the definition."""
        if (q, sigma) not in self._one:
            acc = rdp_privacy_accountant.RdpAccountant([ORDERS[i] for i in _INTEGER])
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, _gaussian(sigma)), 1)
            rdp = np.full(len(ORDERS), math.inf)
            rdp[_INTEGER] = acc.rdp
            frac = np.asarray([ORDERS[i] for i in _FRACTIONAL])
            if q == 1.0:  # no sampling: the Gaussian mechanism's RDP, α/(2σ²)
                rdp[_FRACTIONAL] = frac / (2 * sigma * sigma)
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    log_a = _log_a_fractional(q, sigma, frac)
                # an order that does not come out finite is left out (a larger, safe ε)
                rdp[_FRACTIONAL] = np.where(np.isfinite(log_a), log_a / (frac - 1), math.inf)
            self._one[(q, sigma)] = rdp
        return self._one[(q, sigma)]

    def epsilon(self, key: Key, delta: float) -> float:
        """RDP ε at δ of the history `key` (0 without steps, inf with a noiseless step)."""
        if (key, delta) not in self._rdp:
            if not key:
                eps = 0.0
            elif any(s == 0 for _, s, _ in key):
                eps = math.inf
            else:
                rdp = sum(n * self.step(q, s) for q, s, n in key)
                eps = float(rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, delta)[0])
            self._rdp[(key, delta)] = eps
        return self._rdp[(key, delta)]

    def step(self, q: float, sigma: float | DDGCharge) -> np.ndarray:
        """RDP over ORDERS of one Gaussian step, or of one round of a discrete Gaussian."""
        if isinstance(sigma, DDGCharge):
            return self.ddg_step(q, sigma)
        return self.one_step(q, sigma)

    def ddg_step(self, q: float, charge: DDGCharge) -> np.ndarray:
        """RDP over ORDERS of one round of the summed discrete Gaussian (Kairouz, Liu & Steinke
        2021, Proposition 14 with Zhu & Wang 2019's subsampling bound at integer orders), with
        the sensitivity of unconditional rounding, Δ₂ = c/γ + √D'. Computed by fedrec's own
        `ddg_accounting` (no second implementation exists to check it against)."""
        from fedrec.common.secagg.ddg_accounting import ddg_rdp

        if (q, charge) not in self._one:
            self._one[(q, charge)] = ddg_rdp(
                sigma=charge.sigma,
                n=charge.n,
                clip_norm=charge.clip_norm,
                gamma=charge.gamma,
                beta=0.0,
                dim=charge.padded_dim,
                sample_rate=q,
            )
        return self._one[(q, charge)]

    def epsilon_pld(self, key: Key, delta: float) -> float | None:
        """PLD ε at δ of `key`; None when PLD is switched off or the history holds a discrete
        Gaussian (dp_accounting has no PLD of it)."""
        if not self.config.pld or any(isinstance(s, DDGCharge) for _, s, _ in key):
            return None
        if (key, delta) not in self._pld:
            if not key:
                eps = 0.0
            elif any(s == 0 for _, s, _ in key):
                eps = math.inf
            else:
                # What PLDAccountant.compose does for PoissonSampledDpEvent(Gaussian), with
                # the one-step and self-composed PLDs cached: histories share them.
                pld = None
                for q, sig, n in key:
                    part = self._pld_steps(q, sig, n)
                    pld = part if pld is None else pld.compose(part)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    eps = float(pld.get_epsilon_for_delta(delta))
            self._pld[(key, delta)] = eps
        return self._pld[(key, delta)]

    def _pld_steps(self, q: float, sigma: float, steps: int):
        if (q, sigma, steps) not in self._pld_parts:
            if (q, sigma, 1) not in self._pld_parts:
                self._pld_parts[(q, sigma, 1)] = PLD.from_gaussian_mechanism(
                    standard_deviation=sigma,
                    value_discretization_interval=self.config.pld_interval,
                    sampling_prob=q,
                    neighboring_relation=NeighborRel.ADD_OR_REMOVE_ONE,
                )
            one = self._pld_parts[(q, sigma, 1)]
            self._pld_parts[(q, sigma, steps)] = one.self_compose(steps) if steps > 1 else one
        return self._pld_parts[(q, sigma, steps)]

    def distinct(self) -> int:
        return len(self._rdp)


def _gaussian(sigma: float) -> dp_accounting.GaussianDpEvent:
    return dp_accounting.GaussianDpEvent(sigma)


def rdp_agrees(reported: float, recomputed: float) -> bool:
    if math.isinf(reported) or math.isinf(recomputed):
        return reported == recomputed
    return math.isclose(reported, recomputed, rel_tol=RDP_REL_TOL, abs_tol=1e-9)


def pld_below(rdp: float, pld: float | None) -> bool:
    return pld is None or math.isinf(rdp) or pld <= rdp * (1 + PLD_REL_TOL) + 1e-9


def quantiles(values: Iterable[float]) -> dict[str, float | int | None]:
    """The distribution of ε actually spent, as a DP statement should give it."""
    arr = np.asarray(list(values), dtype=np.float64)
    if not len(arr):
        return {"count": 0}
    finite = arr[np.isfinite(arr)]
    out: dict[str, float | int | None] = {
        "count": len(arr),
        "infinite": int(len(arr) - len(finite)),
    }
    for name, p in (
        ("min", 0),
        ("p10", 10),
        ("median", 50),
        ("p90", 90),
        ("p99", 99),
        ("max", 100),
    ):
        out[name] = float(np.percentile(finite, p)) if len(finite) else None
    out["mean"] = float(finite.mean()) if len(finite) else None
    return out

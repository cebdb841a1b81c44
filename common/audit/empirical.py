"""Empirical privacy from the outside: one-run canary audits of the shipped mechanism.

m canaries, each included by an independent fair coin, go through the real device code in one
run (`fedrec.simulations.canaries`, run by `fedrec.simulations.empirical_audit`); an auditor
who sees what the threat model's adversary sees scores each canary, guesses "in" for the k
highest scores, "out" for the k lowest (or only the "in" guesses) and abstains on the rest.
From the number of correct guesses, two tests of a privacy claim at level p:

- Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1) Training Run", Thm 3.1),
  valid for ANY (ε, δ)-DP mechanism: P[V ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v]
  + 2·m·δ·max_i P[v-i ≤ Binomial < v]/i. Its δ term grows with m, so at δ = 1e-5 no canary
  count lets it reject more than ε ≈ 5.9 (`max_certifiable`): it cannot refute fedrec's ε ≈ 7.
- Mahloujifar, Melis & Chaudhuri 2024 ("Auditing f-Differential Privacy in One Run"), for a
  claim that is a trade-off curve: here μ-GDP (Dong, Roth & Su 2019). fedrec's per-interaction
  claim IS a Gaussian mechanism when q = 1 (the shipped calibrations: full batch, sensitivity C
  per round, noise σ·C, R rounds compose to μ = √R/σ), and its ε at δ is an upper bound on that
  Gaussian's, so "the mechanism is as private as the Gaussian whose exact ε at δ is ε"
  rejected for ε above the claimed ε refutes the claim. 1,000 perfect guesses reject ε ≈ 9.

The empirical lower bound is the largest ε rejected at `confidence`. k is not tuned on the
labels: the bound is the maximum over a fixed grid of guess counts with a Bonferroni split of
p, so the confidence holds for the maximum. Verdict: "violation" when the bound of the test the
claim allows (GDP for q = 1, else Steinke et al.) exceeds the claimed ε.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special, stats

K_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5)  # guesses on each side, a fraction of m


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under (ε, δ)-DP with m canaries (Steinke et al. Thm 3.1)."""
    if not 0 <= v <= r <= m:
        raise ValueError("need 0 <= v <= r <= m")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # α = max_i P[v > Binomial >= v - i] / i: the worst-case mass δ can shift per guess
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # v-1, v-2, ..., 0
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float) -> float:
    """Largest ε rejected at level p (bisection; p_value grows with ε). 0 if none is."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    return _largest_rejected(lambda eps: p_value(m, r, v, eps, delta) < p)


def gaussian_delta(eps: float, mu: float) -> float:
    """δ(ε) of μ-GDP, the exact privacy profile of a Gaussian mechanism of sensitivity/σ = μ
    (Balle & Wang 2018; Dong, Roth & Su 2019, Cor. 2.13)."""
    tail = math.exp(eps + float(special.log_ndtr(-eps / mu - mu / 2)))
    return float(special.ndtr(-eps / mu + mu / 2)) - tail


def gaussian_mu(eps: float, delta: float) -> float:
    """μ of the Gaussian mechanism whose exact ε at δ is `eps` (δ(ε) grows with μ)."""
    lo, hi = 0.0, 1.0
    while gaussian_delta(eps, hi) < delta:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_delta(eps, mid) < delta else (lo, mid)
    return hi


def gdp_rejected(m: int, r: int, v: int, mu: float, p: float) -> bool:
    """Whether v correct of r guesses on m canaries reject μ-GDP at level p (Mahloujifar et
    al. 2024, the bound on correct guesses with abstention): starting from the mass p spread
    over the guesses, push the correct-guess mass through the trade-off curve
    x -> Φ(Φ⁻¹(x) - μ) until it stops moving; the claim is rejected when the mass μ-GDP then
    needs exceeds the fraction of canaries guessed on (the observation is too good for it)."""
    if not 0 <= v <= r <= m:
        raise ValueError("need 0 <= v <= r <= m")
    right, wrong = p * v / m, p * (r - v) / m
    for i in range(v - 1, -1, -1):
        moved = max(wrong, float(special.ndtr(special.ndtri(right) - mu)))
        if moved == wrong:
            break
        right = min(right + i / (r - i) * (moved - wrong), 1.0)
        wrong = moved
    return right + wrong > r / m


def gdp_epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float) -> float:
    """Largest ε whose Gaussian (exact ε at δ) v correct of r guesses reject at level p."""
    if r == 0 or not gdp_rejected(m, r, v, gaussian_mu(1e-6, delta), p):
        return 0.0
    return _largest_rejected(lambda eps: gdp_rejected(m, r, v, gaussian_mu(eps, delta), p))


def _largest_rejected(rejects) -> float:
    """sup{ε : rejects(ε)} for a claim that is harder to reject as ε grows."""
    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


BOUNDS = {"steinke": epsilon_lower_bound, "gdp": gdp_epsilon_lower_bound}


def _grid(m: int) -> list[tuple[int, bool]]:
    ks = sorted({max(1, int(f * m)) for f in K_FRACTIONS if 2 * max(1, int(f * m)) <= m})
    return [(k, two) for k in ks for two in (False, True)]


def max_certifiable(m: int, delta: float, confidence: float = 0.95, method: str = "gdp") -> float:
    """The largest ε the design could ever reject: every guess of the grid correct."""
    grid = _grid(m)
    p = (1 - confidence) / len(grid)
    bound = BOUNDS[method]
    return max(bound(m, r, r, delta, p) for r in {2 * k if two else k for k, two in grid})


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    method: str = "steinke",
) -> dict[str, Any]:
    """The one-run bound from membership scores (higher = more likely in).

    Guesses: "in" for the k highest scores and, two-sided, "out" for the k lowest; abstain on
    the rest. The (k, sides) options form a fixed grid chosen before seeing any label; p is
    split evenly over it (Bonferroni), so the best option's bound holds at `confidence`."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    grid = _grid(m)
    p = (1 - confidence) / len(grid)
    bound = BOUNDS[method]
    best = {"epsilon_lower_bound": 0.0, "k": None, "two_sided": None, "guesses": 0, "correct": 0}
    for k, two in grid:
        v = int(included[order[:k]].sum())
        if two:
            v += int((~included[order[m - k :]]).sum())
        r = 2 * k if two else k
        eps = bound(m, r, v, delta, p)
        if eps > best["epsilon_lower_bound"]:
            best = {
                "epsilon_lower_bound": eps,
                "k": k,
                "two_sided": two,
                "guesses": r,
                "correct": v,
            }
    return best | {
        "method": method,
        "canaries": m,
        "included": int(included.sum()),
        "confidence": confidence,
    }


def recorded_calibration(run: Path):
    """The SimulationConfig a run folder recorded (config.json): the mechanism to audit."""
    import json

    from fedrec.common.run_config import SimulationConfig

    path = Path(run) / "config.json"
    try:
        flat = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path}: the run's configuration is missing or unreadable: {err}"
        ) from err
    return SimulationConfig.from_flat(flat)

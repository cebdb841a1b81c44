"""Empirical privacy from the outside: the one-run canary audit of Steinke, Nasr & Jagielski
2023 ("Privacy Auditing with One (1) Training Run", NeurIPS).

m canaries are drawn, each a pair of fresh items (first -> second) that only it uses, at a
random client: one training example (a device trains on pairs of its interactions), so its
analytic ε is its cohort's per-interaction ε. Each is put into the training data by an
independent fair coin. The federation trains as usual (same
code, same DP); afterwards an auditor who sees only the final global model scores each canary
by the model's logit of its second item after its first, guesses "in" for the k highest, "out" for the k
lowest (or only the "in" guesses) and abstains on the rest. If the training is (ε, δ)-DP with respect to each canary,
the number of correct guesses V among the r = 2k made satisfies (their Theorem 3.1)

    P[V ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2·m·δ·max_{i=1..v} P[v-i ≤ Binomial < v] / i

so any ε whose right-hand side is below p is rejected at confidence 1-p: the largest rejected ε
is an empirical LOWER bound on the true ε. k is not tuned on the labels: the bound is taken
over a fixed grid of k with a Bonferroni split of p, so the confidence holds for the maximum.
It must stay below the analytic ε of the canaries; a run without DP is the control that shows
the audit can see leakage.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

K_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)  # guesses made on each side, as a fraction of m


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
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def audit_scores(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95
) -> dict[str, Any]:
    """The one-run bound from membership scores (higher = more likely in).

    Guesses: "in" for the k highest scores and, two-sided, "out" for the k lowest; abstain on
    the rest. The (k, sides) options form a fixed grid chosen before seeing any label; p is
    split evenly over it (Bonferroni), so the best option's bound holds at `confidence`."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    ks = sorted({max(1, int(f * m)) for f in K_FRACTIONS if 2 * max(1, int(f * m)) <= m})
    grid = [(k, two) for k in ks for two in (False, True)]
    p = (1 - confidence) / len(grid)
    best = {"epsilon_lower_bound": 0.0, "k": None, "two_sided": None, "guesses": 0, "correct": 0}
    for k, two in grid:
        v = int(included[order[:k]].sum())
        if two:
            v += int((~included[order[m - k :]]).sum())
        r = 2 * k if two else k
        eps = epsilon_lower_bound(m, r, v, delta, p)
        if eps > best["epsilon_lower_bound"]:
            best = {
                "epsilon_lower_bound": eps,
                "k": k,
                "two_sided": two,
                "guesses": r,
                "correct": v,
            }
    return best | {"canaries": m, "included": int(included.sum()), "confidence": confidence}


@dataclass(frozen=True)
class EmpiricalConfig:
    """A small federated run with canaries; the DP run and its no-DP control differ only in dp."""

    num_users: int = 30  # small: the DP and control runs take seconds each
    num_items: int = 60
    canaries: int = 200  # m; the bound's resolution grows with m (~3 at best for r = 100)
    rounds: int = 2
    num_negatives: int = 20
    local_steps: int = 4
    id_embeddings: bool = True  # per-item rows a single example can move (the attack's signal)
    dp: str = "local"  # per-interaction DP with each device's own noise (the earned guarantee)
    epsilon: float = 8.0  # per-interaction budget of the DP run
    local_noise_multiplier: float = 1.0
    delta: float = 1e-5
    local_lr: float = 0.5
    confidence: float = 0.95
    seed: int = 0


def run_empirical(config: EmpiricalConfig, out: Path) -> dict[str, Any]:
    """Train the DP run and the no-DP control on the same canaries; bound both."""
    from fedrec.common.audit.canaries import Canaries, score_canaries, train

    out = Path(out)
    for ours in ("data", "dp", "control"):  # a previous audit's canary runs: start afresh
        shutil.rmtree(out / ours, ignore_errors=True)
    canaries = Canaries.draw(config, out / "data")
    results: dict[str, Any] = {"config": dataclasses.asdict(config)}
    for name, dp in (("dp", config.dp), ("control", "off")):
        run = train(config, canaries, dp, out / name)
        scores = score_canaries(run, canaries)
        bound = audit_scores(scores, canaries.included, config.delta, config.confidence)
        analytic = canaries.analytic_epsilon(run, out / name) if dp != "off" else math.inf
        results[name] = bound | {"dp": dp, "analytic_epsilon": analytic}
    results["dp_epsilon_lower_bound"] = results["dp"]["epsilon_lower_bound"]
    results["dp_epsilon_analytic"] = results["dp"]["analytic_epsilon"]
    results["control_epsilon_lower_bound"] = results["control"]["epsilon_lower_bound"]
    results["lower_bound_within_analytic"] = (
        results["dp_epsilon_lower_bound"] <= results["dp_epsilon_analytic"]
    )
    return results

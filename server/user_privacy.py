"""User-level (device-level) differential privacy of the published global models: the accountant.

Guarantee. DP-FedAvg with fixed clipping (McMahan, Ramage, Talwar & Zhang 2018, "Learning
Differentially Private Recurrent Language Models"): each round the server samples every
registered client independently with probability q (Poisson sampling), clips each sampled
client's WHOLE update to L2 norm C, sums, divides by the FIXED expected count q·N and adds
N(0, (z·C / (q·N))²) noise (`fedrec.server.aggregation.aggregate`). One round is then one
composition of the sampled Gaussian mechanism with noise multiplier z and rate q, accounted in
Rényi DP (Mironov, Talwar & Zhang 2019) with the same code as the per-interaction ledger
(`fedrec.common.privacy.accounting`), and (ε, δ) follows by Balle et al. 2020.

Unit and adjacency: one user (device), all of their data in all rounds; add/remove one user.
Threat model: holds against anyone who sees the published global models (every round's),
including the other clients and whoever downloads the model. It TRUSTS THE SERVER: the server
sees individual updates and must sample, clip and add the noise honestly; it does not hold
against the server. Assumptions the caller must keep: sampling is Poisson with the recorded q
(a fixed-size sample of the Flower grid is a different mechanism this accounting does not
cover); q = expected clients per round / registered clients, with N the population the
adjacency is over; sampled clients that drop out only shrink the sum, which is fine; an empty
sample still produces a noised, counted round; the aggregation diagnostics (raw update norms)
are not private. Per-interaction ε of the devices' own DP-SGD is a separate guarantee.

Persistence: the accountant must outlive rounds AND runs. Record a round and save the accountant
(in the checkpoint's `extra` and/or its own file, `save_accountant`) BEFORE publishing that
round's model, and check `would_exceed` before starting every round (and before a run starts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.privacy.accounting import (
    ORDERS,
    DiscreteGaussian,
    Guarantee,
    Mechanism,
    charge_of,
    epsilon_from_rdp,
    rdp_of,
)
from fedrec.server.checkpoint import atomic_write_json

FORMAT = 1
_MAX_NOISE_MULTIPLIER = 1e4  # calibration gives up beyond this (the target is unreachable)


def client_sample_rate(*, expected_clients: float, registered_clients: int) -> float:
    """q for Poisson client sampling: each registered client is in a round with probability q."""
    if registered_clients < 1 or not (0 < expected_clients <= registered_clients):
        raise ValueError("need 0 < expected_clients <= registered_clients")
    return float(expected_clients) / float(registered_clients)


def aggregate_noise_std(
    *, noise_multiplier: float, clip_norm: float, expected_clients: float
) -> float:
    """Noise std in units of the averaged delta: z · C / (q·N), the `noise_std` of `aggregate`."""
    if noise_multiplier < 0 or clip_norm <= 0 or expected_clients <= 0:
        raise ValueError("need noise_multiplier >= 0, clip_norm > 0, expected_clients > 0")
    return noise_multiplier * clip_norm / expected_clients


def user_level_mechanism(
    *, noise_multiplier: float, sample_rate: float, clip_norm: float, delta: float
) -> Mechanism:
    """One round of DP-FedAvg: one composition of the sampled Gaussian mechanism."""
    return Mechanism(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=1,
        clip_norm=clip_norm,
        delta=delta,
    )


def discrete_user_level(
    ddg: DiscreteGaussian, *, sample_rate: float, min_survivors: int, delta: float
) -> Mechanism:
    """One round of user-level DP from the devices' discrete Gaussian alone (secagg): the
    sum of ≥ K_min shares, each device's whole update clipped to the DDG's clip (Δ₂ = c/γ + √D'
    in integer steps under zero-out adjacency, as per interaction: one step at reference
    batch 1), devices Poisson-sampled at `sample_rate`. Noise the server adds on top is
    post-processing and is not counted."""
    return Mechanism(
        noise_multiplier=0.0,
        sample_rate=sample_rate,
        steps=1,
        clip_norm=ddg.clip_norm,
        delta=delta,
        aggregate_noise_multiplier=0.0,
        min_survivors=min_survivors,
        ddg=ddg,
    )


@dataclass(frozen=True)
class RoundRecord:
    round: int  # a label for the log; the same label twice is charged twice (never under-counts)
    mechanism: Mechanism


class UserLevelAccountant:
    """RDP accountant of the server's rounds. Four verbs, as Opacus's: record, ε, to/from dict."""

    def __init__(self) -> None:
        self._records: list[RoundRecord] = []

    @property
    def records(self) -> tuple[RoundRecord, ...]:
        return tuple(self._records)

    @property
    def num_rounds(self) -> int:
        return len(self._records)

    def record_round(self, mechanism: Mechanism, *, round: int) -> None:
        """Charge one published round. Call before the round's model is published."""
        _check_round_mechanism(mechanism)
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise ValueError("round must be an integer >= 0")
        self._records.append(RoundRecord(round=round, mechanism=mechanism))

    def rdp(self, extra: Mechanism | None = None) -> np.ndarray:
        """RDP over ORDERS of all recorded rounds (plus `extra`, not recorded).

        Rounds with equal (q, z) are charged as one mechanism with that many steps, which is
        exactly what `calibrate_noise_multiplier` computes: a run calibrated for R rounds then
        reaches the same ε after R rounds, to the last bit, not a rounding error above it.
        """
        counts: dict[tuple[float, float], int] = {}
        total = np.zeros(len(ORDERS))
        for m in [r.mechanism for r in self._records] + ([extra] if extra is not None else []):
            if m.ddg is not None:  # the devices' discrete Gaussian alone (`discrete_user_level`)
                total = total + charge_of(m, Guarantee.DISTRIBUTED, None)
                continue
            key = (m.sample_rate, m.noise_multiplier)
            counts[key] = counts.get(key, 0) + 1
        for (q, z), steps in counts.items():
            total = total + rdp_of(_mechanism(z=z, q=q, rounds=steps))
        return total

    def epsilon(self, delta: float) -> float:
        """ε at δ of everything published so far (0 before the first round)."""
        return epsilon_from_rdp(self.rdp(), delta)[0]

    def epsilon_after(self, mechanism: Mechanism, delta: float | None = None) -> float:
        """ε at δ (default: the mechanism's δ) if one more round of `mechanism` were run."""
        _check_round_mechanism(mechanism)
        return epsilon_from_rdp(self.rdp(mechanism), mechanism.delta if delta is None else delta)[0]

    def would_exceed(
        self, budget: float, mechanism: Mechanism, *, delta: float | None = None
    ) -> bool:
        """True if running the NEXT round as `mechanism` would take ε above `budget`.

        Check before every round and refuse to start it (a run whose first round would exceed
        the budget refuses to start at all).
        """
        if not (isinstance(budget, (int, float)) and budget >= 0):
            raise ValueError("budget must be a number >= 0")
        return self.epsilon_after(mechanism, delta) > budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "user-level DP-FedAvg, Poisson client sampling, RDP",
            "rounds": [
                {"round": r.round, "mechanism": r.mechanism.to_dict()} for r in self._records
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserLevelAccountant:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a user-level accountant state (format {FORMAT})")
        acc = cls()
        for item in data["rounds"]:
            acc.record_round(Mechanism.from_dict(item["mechanism"]), round=item["round"])
        return acc


def _check_round_mechanism(m: Mechanism) -> None:
    if not isinstance(m, Mechanism):
        raise TypeError("expected a Mechanism (see user_level_mechanism)")
    if m.steps != 1 or (m.aggregate_noise_multiplier is not None and m.ddg is None):
        raise ValueError("a user-level round is one composition (steps=1, no distributed σ)")


def _mechanism(*, z: float, q: float, rounds: int) -> Mechanism:
    # clip_norm and delta do not enter the RDP; placeholders of valid values.
    return Mechanism(noise_multiplier=z, sample_rate=q, steps=rounds, clip_norm=1.0, delta=0.5)


def save_accountant(path: str | Path, accountant: UserLevelAccountant) -> None:
    """Atomic JSON write (temp file, fsync, rename): a crash leaves the old or the new state."""
    atomic_write_json(Path(path), accountant.to_dict())


def load_accountant(path: str | Path) -> UserLevelAccountant | None:
    """The saved accountant, or None if there is no file (a new run: the caller decides)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable user-level accountant ({exc})") from exc
    return UserLevelAccountant.from_dict(data)


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, rounds: int
) -> float:
    """Smallest z on a 0.001 grid (so rounded UP) with ε(δ) ≤ target after `rounds` rounds.

    A bracketing search over integer thousandths, using that ε decreases as z grows. The result
    is exactly what `UserLevelAccountant` charges for those rounds (same arithmetic).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError("target_epsilon must be a finite number > 0")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError("rounds must be an integer >= 1")

    def epsilon_at(milli: int) -> float:
        m = _mechanism(z=milli / 1000, q=sample_rate, rounds=rounds)
        return epsilon_from_rdp(rdp_of(m), delta)[0]

    # invariant: z = lo/1000 does not fit (z = 0 is ε = inf); hi fits
    lo, hi, eps_lo, eps_hi = 0, 1000, math.inf, epsilon_at(1000)
    while eps_hi > target_epsilon:
        lo, hi, eps_lo = hi, hi * 2, eps_hi
        if hi > _MAX_NOISE_MULTIPLIER * 1000:
            raise ValueError(
                f"no noise multiplier up to {_MAX_NOISE_MULTIPLIER} reaches ε ≤ {target_epsilon}"
            )
        eps_hi = epsilon_at(hi)
    # Each ε is costly (fractional RDP orders): secant steps on log ε, which is smooth in z,
    # close the bracket in fewer evaluations than bisection. The bracket invariant makes the
    # answer the same either way.
    last = [(lo, eps_lo), (hi, eps_hi)]
    while hi - lo > 1:
        (m1, e1), (m2, e2) = last[-2:]
        if all(0 < e < math.inf for e in (e1, e2)) and e1 != e2:
            step = (math.log(target_epsilon) - math.log(e2)) / (math.log(e2) - math.log(e1))
            mid = round(m2 + step * (m2 - m1))
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        eps_mid = epsilon_at(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo, eps_lo = mid, eps_mid
        last.append((mid, eps_mid))
    return hi / 1000


def discard_delta(
    *, epsilon: float, rounds: int, registered_clients: int, sample_rate: float, min_survivors: int
) -> float:
    """Extra δ user-level DP pays for discarding rounds with fewer than K_min survivors.

    The released rounds differ from an always-publishing run M' only on the event that a round
    had n < K_min, so their total variation distance is at most P = Σ_rounds P(n < K_min);
    then P[M(D) ∈ A] <= P[M'(D) ∈ A] + P <= e^ε (P[M(D') ∈ A] + P) + δ + P, i.e. the run is
    (ε, δ + (1 + e^ε)·P)-DP at the user level. n counts Poisson-sampled devices (idle ones
    send noise, so declines do not thin it); with the adjacent dataset's N - 1 others,
    P(n < K_min) <= BinomCDF(K_min - 1; N - 1, q). Assumes device failures do not depend on
    the data of the user the guarantee protects.
    """
    if min_survivors <= 1 or rounds <= 0:
        return 0.0
    per_round = discard_probability(
        registered_clients=registered_clients, sample_rate=sample_rate, min_survivors=min_survivors
    )
    return min(1.0, rounds * (1.0 + math.exp(min(epsilon, 700.0))) * per_round)


def discard_probability(
    *, registered_clients: int, sample_rate: float, min_survivors: int
) -> float:
    """P(n < K_min) for one round: n ~ Binomial(N - 1, q) devices besides the one protected."""
    from scipy.stats import binom

    return float(binom.cdf(min_survivors - 1, max(registered_clients - 1, 0), sample_rate))


def largest_min_survivors(
    *, registered_clients: int, sample_rate: float, max_discard_probability: float
) -> int:
    """The largest K_min whose rounds are discarded with probability at most the given one
    (0 when even K_min = 1 is too likely to fail: the sample is too small)."""
    lo, hi = 0, registered_clients  # invariant: lo fits (K_min = 0 never discards)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = discard_probability(
            registered_clients=registered_clients, sample_rate=sample_rate, min_survivors=mid
        )
        lo, hi = (mid, hi) if p <= max_discard_probability else (lo, mid - 1)
    return lo

"""The DDG parameters of a run's rounds, derived from its settings by one deterministic rule
(devices, the server and an auditor all derive the same ones from the same numbers).

Target: one round costs the interaction what the continuous calibration's round costs, the
ε(δ) of `steps` Poisson-subsampled Gaussian compositions at the aggregate noise multiplier
(the default 0.7 at q = 1, one step: ε 7.16 at δ = 1e-5). σ (integer steps) is calibrated
to it for a sum of K_min devices (`calibrate_ddg_sigma`, β = 0: unconditional rounding, see
`fedrec.common.privacy.accounting.DiscreteGaussian`), γ sized so that 4 standard deviations of
a coordinate of the sum of up to `max_devices` devices fit in b bits (`heuristic_gamma`); the
two depend on each other and settle in a few alternations. b: the widest in BITS whose σ stays
≤ SIGMA_LIMIT, where the float64 sampler is accurate (`discrete_gaussian`); wider bits give
finer γ, so rounding matters less.
"""

from __future__ import annotations

import math
from functools import lru_cache

from fedrec.common.privacy.accounting import Mechanism, epsilon_from_rdp, rdp_of
from fedrec.common.secagg.ddg_accounting import calibrate_ddg_sigma
from fedrec.common.secagg.encoding import DDGParams, heuristic_gamma

SIGMA_LIMIT = 1e4  # integer steps: the sampler's float64 deviation stays < 1e-10 per coordinate
BITS = tuple(range(24, 11, -1))  # widest first
_ALTERNATIONS = 4


def per_round_target(
    *, aggregate_noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """ε at δ of one round of the continuous calibration (what the DDG round may cost)."""
    mechanism = Mechanism(
        noise_multiplier=aggregate_noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        clip_norm=1.0,
        delta=delta,
    )
    return epsilon_from_rdp(rdp_of(mechanism), delta)[0]


def max_devices(expected: int) -> int:
    """Devices a round's sum is provisioned for: 8 standard deviations above the expected
    Poisson count (more only raise the wrap-around risk that `decode_sum` counts)."""
    return math.ceil(expected + 8 * math.sqrt(expected) + 8)


@lru_cache(maxsize=64)
def ddg_round_params(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    min_survivors: int,
    max_devices: int,
    dim: int,
    clip_norm: float,
) -> DDGParams:
    """The round's `DDGParams` (module docstring); ValueError when no b in BITS keeps σ within
    SIGMA_LIMIT."""
    padded = 1 << (dim - 1).bit_length()
    found = []
    for bits in BITS:
        noise_std = clip_norm / math.sqrt(min_survivors)  # a first guess, in update units
        gamma = sigma = math.nan
        for _ in range(_ALTERNATIONS):
            gamma = heuristic_gamma(
                noise_std=noise_std,
                clip_norm=clip_norm,
                bits=bits,
                n=max_devices,
                padded_dim=padded,
            )
            sigma = calibrate_ddg_sigma(
                target_epsilon=target_epsilon,
                delta=delta,
                rounds=1,
                n=min_survivors,
                dim=padded,
                clip_norm=clip_norm,
                gamma=gamma,
                beta=0.0,
                sample_rate=sample_rate,
            )
            noise_std = sigma * gamma
        found.append(f"{bits} bits: σ {sigma:.4g}")
        if sigma <= SIGMA_LIMIT:
            return DDGParams(
                gamma=gamma, bits=bits, clip_norm=clip_norm, beta=0.0, sigma=sigma, dim=dim
            )
    raise ValueError(
        f"no modulus keeps the discrete Gaussian's σ within {SIGMA_LIMIT:g} integer steps "
        f"({'; '.join(found)}): the sampler is not accurate beyond it"
    )

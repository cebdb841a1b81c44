"""Privacy of the distributed discrete Gaussian: τ, zCDP, RDP curves and σ calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from fedrec.common.privacy.accounting import ORDERS
from fedrec.common.secagg.ddg_accounting import (
    calibrate_ddg_sigma,
    ddg_epsilon,
    ddg_rdp,
    rdp,
    sensitivities,
    tau,
    zcdp_epsilon,
)
from fedrec.common.secagg.encoding import rounded_norm_bound

SETTING = dict(n=100, clip_norm=1.0, gamma=1e-3, beta=math.exp(-0.5), dim=2**16)


def test_tau_by_hand_and_vanishing_for_large_sigma():
    expected = 10 * sum(math.exp(-2 * math.pi**2 * 0.25 * k / (k + 1)) for k in range(1, 5))
    assert tau(0.5, 5) == pytest.approx(expected, rel=1e-12)
    assert tau(0.5, 1) == 0.0  # one share is exactly a discrete Gaussian
    assert tau(3.0, 1000) < 1e-36  # ~10·(n-1)·e^{-2π²σ²·1/2} at worst


def test_sensitivities_follow_the_rounding_bound():
    l2, l1 = sensitivities(clip_norm=1.0, gamma=0.01, beta=0.0, dim=64)
    assert l2 == rounded_norm_bound(100.0, 0.0, 64) == 108.0
    assert l1 == 108.0 * 8.0  # √d·Δ₂ < Δ₂²
    l2, l1 = sensitivities(clip_norm=1.0, gamma=1.0, beta=0.0, dim=64)
    assert l1 == min(l2**2, 8 * l2)


def test_large_sigma_gives_the_continuous_gaussians_zcdp():
    l2, l1 = 1000.0, 30_000.0
    for sigma, n in [(5.0, 10), (50.0, 100), (400.0, 1000)]:
        eps = zcdp_epsilon(l2=l2, l1=l1, sigma=sigma, n=n, dim=2**16)
        rho = l2**2 / (2 * n * sigma**2)
        assert eps**2 / 2 == pytest.approx(rho, rel=0.01)
        curve = rdp(np.asarray(ORDERS), l2=l2, l1=l1, sigma=sigma, n=n, dim=2**16)
        assert np.allclose(curve, np.asarray(ORDERS) * rho, rtol=0.01)


def test_small_sigma_pays_for_tau():
    l2, l1, d = 100.0, 800.0, 64
    eps = zcdp_epsilon(l2=l2, l1=l1, sigma=0.5, n=50, dim=d)
    assert eps > l2 / (math.sqrt(50) * 0.5)
    t = tau(0.5, 50)
    s2, s1 = l2 / (math.sqrt(50) * 0.5), l1 / (math.sqrt(50) * 0.5)
    assert eps == pytest.approx(
        min(math.sqrt(s2**2 + 2 * t * d), math.sqrt(s2**2 + 2 * s1 * t + t**2 * d), s2 + t * 8)
    )


def test_unsampled_curve_matches_opacus_gaussian_when_tau_vanishes():
    sigma = 643.0
    l2, _ = sensitivities(clip_norm=1.0, gamma=1e-3, beta=SETTING["beta"], dim=2**16)
    z = math.sqrt(SETTING["n"]) * sigma / l2
    mine = ddg_rdp(sigma=sigma, **SETTING)
    ref = np.asarray(compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=list(ORDERS)))
    assert np.allclose(mine, ref, rtol=1e-6)


def test_subsampled_curve_is_between_the_exact_gaussian_and_no_amplification():
    sigma, q = 643.0, 0.1
    l2, _ = sensitivities(clip_norm=1.0, gamma=1e-3, beta=SETTING["beta"], dim=2**16)
    z = math.sqrt(SETTING["n"]) * sigma / l2
    plain = ddg_rdp(sigma=sigma, **SETTING)
    sampled = ddg_rdp(sigma=sigma, sample_rate=q, **SETTING)
    exact = np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(ORDERS)))
    integer = np.array([float(a).is_integer() and a >= 2 for a in ORDERS])
    assert np.all(sampled <= plain)
    assert np.all(sampled[integer] < plain[integer])
    # Zhu & Wang's bound is general, so never below Mironov et al.'s exact Gaussian one
    assert np.all(sampled[integer] >= exact[integer] * (1 - 1e-9))
    assert np.array_equal(sampled[~integer], plain[~integer])


def test_epsilon_decreases_with_sigma_and_grows_with_rounds():
    sigmas = [1.0, 5.0, 50.0, 200.0, 1000.0]
    eps = [ddg_epsilon(sigma=s, rounds=10, delta=1e-5, **SETTING) for s in sigmas]
    assert all(a > b for a, b in itertools.pairwise(eps))
    assert ddg_epsilon(sigma=200.0, rounds=20, delta=1e-5, **SETTING) > eps[3]
    assert ddg_epsilon(sigma=0.0, rounds=1, delta=1e-5, **SETTING) == math.inf


@pytest.mark.parametrize("sample_rate", [1.0, 0.1])
def test_calibration_round_trip(sample_rate):
    sigma = calibrate_ddg_sigma(
        target_epsilon=8.0, delta=1e-5, rounds=50, sample_rate=sample_rate, **SETTING
    )
    kw = dict(rounds=50, delta=1e-5, sample_rate=sample_rate, **SETTING)
    assert ddg_epsilon(sigma=sigma, **kw) <= 8.0
    assert ddg_epsilon(sigma=sigma * 0.998, **kw) > 8.0


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError):
        calibrate_ddg_sigma(target_epsilon=0.0, delta=1e-5, rounds=1, **SETTING)
    with pytest.raises(ValueError):
        calibrate_ddg_sigma(target_epsilon=1.0, delta=1e-5, rounds=0, **SETTING)

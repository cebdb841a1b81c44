"""The discrete Gaussian sampler: N_Z(0, σ²)'s moments, symmetry and point masses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedrec.common.privacy.randomness import PrivacyRandomness
from fedrec.common.secagg.discrete_gaussian import (
    discrete_gaussian_variance,
    discrete_laplace,
    sample_discrete_gaussian,
)

N = 200_000


def _pmf(sigma: float, k: np.ndarray) -> np.ndarray:
    grid = np.arange(-math.ceil(40 * sigma) - 10, math.ceil(40 * sigma) + 11)
    norm = np.exp(-(grid**2) / (2 * sigma**2)).sum()
    return np.exp(-(k.astype(np.float64) ** 2) / (2 * sigma**2)) / norm


def test_exact_variance_is_below_sigma_squared_for_small_sigma_and_equal_for_large():
    assert discrete_gaussian_variance(0.5) == pytest.approx(0.21501, abs=1e-5)
    assert discrete_gaussian_variance(0.5) < 0.25
    assert discrete_gaussian_variance(2.0) == pytest.approx(4.0, rel=1e-9)
    assert discrete_gaussian_variance(50.0) == pytest.approx(2500.0, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 50.0, 1242.73])  # 1242.73: the default job's
def test_moments_and_symmetry(sigma):
    x = sample_discrete_gaussian(sigma, N, PrivacyRandomness.reproducible_from(1, "dg", sigma))
    assert x.dtype == np.int64 and x.shape == (N,)
    var = discrete_gaussian_variance(sigma)
    # 5 standard errors; the variance's uses the sample's fourth moment
    assert abs(x.mean()) < 5 * math.sqrt(var / N)
    se_var = math.sqrt((np.mean(x.astype(np.float64) ** 4) - var**2) / N)
    assert abs(x.var() - var) < 5 * se_var
    positive, negative = int((x > 0).sum()), int((x < 0).sum())
    assert stats.binomtest(positive, positive + negative).pvalue > 1e-4


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_point_masses_match_the_discrete_gaussian(sigma):
    x = sample_discrete_gaussian(sigma, N, PrivacyRandomness.reproducible_from(2, "pmf", sigma))
    edge = math.ceil(3 * sigma)
    k = np.arange(-edge, edge + 1)
    observed = np.array([(x == v).sum() for v in k] + [(np.abs(x) > edge).sum()])
    p = _pmf(sigma, k)
    expected = N * np.append(p, 1 - p.sum())
    keep = expected > 5
    observed, expected = observed[keep], expected[keep]
    expected *= observed.sum() / expected.sum()
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_reproducible_shapes_and_zero_sigma():
    a = sample_discrete_gaussian(3.0, (4, 5), PrivacyRandomness.reproducible_from(3, "r"))
    b = sample_discrete_gaussian(3.0, (4, 5), PrivacyRandomness.reproducible_from(3, "r"))
    assert a.shape == (4, 5) and np.array_equal(a, b)
    zero = sample_discrete_gaussian(0.0, 7, PrivacyRandomness.reproducible_from(3, "z"))
    assert zero.dtype == np.int64 and not zero.any()
    with pytest.raises(ValueError):
        sample_discrete_gaussian(-1.0, 3, PrivacyRandomness.reproducible_from(3, "n"))


def test_discrete_laplace_has_the_two_sided_geometric_masses():
    t = 2.0
    y = discrete_laplace(t, N, PrivacyRandomness.reproducible_from(4, "lap"))
    r = math.exp(-1 / t)
    # P(0) = (1 - r) / (1 + r) for the two-sided geometric
    p0 = (1 - r) / (1 + r)
    assert abs((y == 0).mean() - p0) < 5 * math.sqrt(p0 * (1 - p0) / N)

"""The source of DP noise and privacy-relevant sampling: a CSPRNG, right distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedrec.common.privacy.randomness import PrivacyRandomness, privacy_randomness

N = 1_000_000


def test_a_million_normals_have_the_moments_and_shape_of_n01():
    z = PrivacyRandomness.reproducible_from(11, "moments").normal(size=N)
    assert z.dtype == np.float64 and z.shape == (N,)
    # each bound is 5 standard errors of its estimator under N(0, 1)
    assert abs(z.mean()) < 5 / np.sqrt(N)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / N)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / N)  # excess kurtosis 0
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / N)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert np.abs(z).max() < 8.7  # 53-bit uniforms bound Box-Muller's radius by ~8.65


def test_scaled_normals_numpy_and_torch():
    source = PrivacyRandomness.reproducible_from(12, "scaled")
    x = source.normal(3.0, 0.5, size=(400, 500))
    assert x.shape == (400, 500)
    assert abs(x.mean() - 3.0) < 5 * 0.5 / np.sqrt(x.size)
    assert abs(x.std() - 0.5) < 0.01
    like = [np.zeros((300, 2), np.float32), torch.zeros(7, 9)]
    parts = source.normal_like(like, std=2.0)
    assert [tuple(p.shape) for p in parts] == [(300, 2), (7, 9)]
    assert all(p.dtype == torch.float32 for p in parts)
    assert all(torch.count_nonzero(p) == p.numel() for p in parts)
    assert source.normal_like(like, std=0.0)[0].abs().max() == 0


@pytest.mark.parametrize("rate", [0.0, 0.003, 0.3, 1.0])
def test_bernoulli_masks_have_their_rate(rate):
    mask = PrivacyRandomness.reproducible_from(13, "mask").bernoulli(N, rate)
    assert mask.dtype == bool and mask.shape == (N,)
    assert abs(mask.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / N)  # exact at 0 and 1
    with pytest.raises(ValueError, match="rate"):
        PrivacyRandomness.secure().bernoulli(3, 1.5)


def test_uniforms_are_on_the_53_bit_grid_in_the_half_open_unit_interval():
    u = PrivacyRandomness.reproducible_from(14, "u").random(N)
    assert 0 < u.min() and u.max() <= 1
    k = u * 2.0**53
    np.testing.assert_array_equal(k, np.round(k))  # exactly (k + 1)·2⁻⁵³
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_two_secure_sources_draw_different_streams_and_seeds_do_not_reach_them():
    a, b = PrivacyRandomness.secure(), PrivacyRandomness.secure()
    assert not np.array_equal(a.normal(size=64), b.normal(size=64))
    # a secure source ignores the seed a run records: two "seed 0" sources differ
    c, d = privacy_randomness(None, "device", 1), privacy_randomness(None, "device", 1)
    assert not c.reproducible and not np.array_equal(c.random(64), d.random(64))


def test_reproducible_sources_repeat_per_seed_and_labels_only():
    def draw(*key):
        return privacy_randomness(*key).normal(size=32)

    assert privacy_randomness(5, "x").reproducible
    np.testing.assert_array_equal(draw(5, "device", 1), draw(5, "device", 1))
    assert not np.array_equal(draw(5, "device", 1), draw(5, "device", 2))
    assert not np.array_equal(draw(5, "device", 1), draw(6, "device", 1))
    # a stream continues across calls: two halves are the whole
    one = PrivacyRandomness.reproducible_from(5, "stream")
    two = PrivacyRandomness.reproducible_from(5, "stream")
    halves = np.concatenate([one.random(10), one.random(22)])
    np.testing.assert_array_equal(halves, two.random(32))

"""The DDG encoding: rotation, conditional rounding, modular sums and decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from fedrec.common.privacy.randomness import PrivacyRandomness
from fedrec.common.secagg.encoding import (
    DDGParams,
    centre,
    conditional_round,
    decode_sum,
    encode_update,
    heuristic_gamma,
    modular_sum,
    rotate,
    rounded_norm_bound,
    unrotate,
    walsh_hadamard,
)

SHAPES = {"items": (10, 3), "bias": (7,)}  # d = 37, padded to 64
SEED = 1234


def _update(rng: np.random.Generator, norm: float) -> dict[str, np.ndarray]:
    parts = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    scale = norm / math.sqrt(sum(float((v**2).sum()) for v in parts.values()))
    return {k: v * scale for k, v in parts.items()}


def _params(**kw) -> DDGParams:
    base = dict(gamma=1e-3, bits=32, clip_norm=1.0, beta=math.exp(-0.5), sigma=0.0, dim=37)
    return DDGParams(**(base | kw))


def test_walsh_hadamard_is_the_normalised_sylvester_matrix_and_an_involution():
    x = np.arange(8.0) - 3
    assert np.allclose(walsh_hadamard(x), hadamard(8) @ x / math.sqrt(8))
    assert np.allclose(walsh_hadamard(walsh_hadamard(x)), x)
    with pytest.raises(ValueError):
        walsh_hadamard(np.ones(6))


def test_rotation_keeps_the_norm_and_inverts():
    x = np.random.default_rng(0).standard_normal(37)
    y = rotate(x, SEED)
    assert y.shape == (64,)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    assert np.allclose(unrotate(y, SEED, 37), x)
    assert not np.allclose(rotate(x, SEED + 1), y)  # the signs depend on the public seed


def test_rotation_flattens_a_spike():
    spike = np.zeros(1024)
    spike[3] = 100.0
    assert np.abs(rotate(spike, SEED)).max() == pytest.approx(100 / 32)


def test_norm_bound_formula():
    # β = 0: c + √d; with β: √(c² + d/4 + √(2 log 1/β)(c + √d/2)) when smaller
    assert rounded_norm_bound(10.0, 0.0, 16) == 14.0
    expected = math.sqrt(100 + 4 + math.sqrt(2 * 1.0) * (10 + 2))
    assert rounded_norm_bound(10.0, math.exp(-1), 16) == pytest.approx(expected)
    assert _params().rounded_norm_bound == pytest.approx(
        min(1000 + 8, math.sqrt(1000**2 + 16 + 1 * (1000 + 4)))
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), scale=st.floats(0.5, 50.0), beta=st.floats(0.01, 0.9))
def test_conditional_rounding_is_integer_close_and_within_the_bound(seed, scale, beta):
    z = np.random.default_rng(seed).standard_normal(64) * scale
    bound = rounded_norm_bound(float(np.linalg.norm(z)), beta, 64)
    r = conditional_round(z, bound, PrivacyRandomness.reproducible_from(seed, "round"))
    assert r.dtype == np.int64
    assert np.all(np.abs(r - z) < 1)
    assert np.linalg.norm(r) <= bound


def test_rounding_is_unbiased():
    z = np.full(50_000, 0.3)
    r = conditional_round(z, math.inf, PrivacyRandomness.reproducible_from(5, "unbiased"))
    assert abs(r.mean() - 0.3) < 5 * math.sqrt(0.21 / z.size)


def test_round_trip_without_noise_within_gamma_sqrt_d():
    params = _params()
    delta = _update(np.random.default_rng(1), 0.8)
    enc = encode_update(delta, params, SEED, PrivacyRandomness.reproducible_from(1, "enc"))
    assert enc.dtype == np.uint64 and enc.shape == (64,)
    assert int(enc.max()) < 2**32
    out, risk = decode_sum(enc, SHAPES, params, SEED, survivors=1)
    assert risk == 0
    err = math.sqrt(sum(float(((out[k] - delta[k]) ** 2).sum()) for k in SHAPES))
    assert err <= params.gamma * math.sqrt(params.padded_dim)
    assert {k: v.shape for k, v in out.items()} == SHAPES


def test_an_update_above_the_clip_norm_is_clipped():
    params = _params()
    delta = _update(np.random.default_rng(2), 5.0)
    enc = encode_update(delta, params, SEED, PrivacyRandomness.reproducible_from(2, "enc"))
    out, _ = decode_sum(enc, SHAPES, params, SEED, survivors=1)
    norm = math.sqrt(sum(float((v**2).sum()) for v in out.values()))
    assert norm == pytest.approx(1.0, abs=params.gamma * 8)


def test_sum_of_encodings_decodes_to_the_sum():
    n = 12
    rng = np.random.default_rng(3)
    deltas = [_update(rng, 0.9) for _ in range(n)]
    truth = {k: sum(d[k] for d in deltas) for k in SHAPES}
    params = _params()
    encs = [
        encode_update(d, params, SEED, PrivacyRandomness.reproducible_from(3, i))
        for i, d in enumerate(deltas)
    ]
    out, risk = decode_sum(modular_sum(encs, params.bits), SHAPES, params, SEED, survivors=n)
    assert risk == 0
    err = math.sqrt(sum(float(((out[k] - truth[k]) ** 2).sum()) for k in SHAPES))
    assert err <= n * params.gamma * math.sqrt(params.padded_dim)
    # with noise: the error is the summed noise, √n·σ·γ per coordinate
    noisy = _params(sigma=50.0)
    encs = [
        encode_update(d, noisy, SEED, PrivacyRandomness.reproducible_from(4, i))
        for i, d in enumerate(deltas)
    ]
    out, risk = decode_sum(modular_sum(encs, noisy.bits), SHAPES, noisy, SEED, survivors=n)
    assert risk == 0
    err = np.concatenate([(out[k] - truth[k]).ravel() for k in SHAPES])
    per_coord = math.sqrt(n) * 50.0 * noisy.gamma
    assert err.std() == pytest.approx(per_coord, rel=0.35)


def test_a_sum_that_wraps_is_counted_at_risk():
    # ±128 steps of 0.001: the sum's rotated coordinates (~240 steps rms) wrap around
    params = _params(bits=8, gamma=0.001, sigma=2.0)
    deltas = [{"items": np.full((10, 3), 0.16), "bias": np.full(7, 0.16)} for _ in range(4)]
    encs = [
        encode_update(d, params, SEED, PrivacyRandomness.reproducible_from(6, i))
        for i, d in enumerate(deltas)
    ]
    _, risk = decode_sum(modular_sum(encs, params.bits), SHAPES, params, SEED, survivors=4)
    assert risk > 0


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(1, 62),
    data=st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=40),
)
def test_modular_sum_never_overflows(bits, data):
    vectors = [np.array([v], dtype=np.uint64) for v in data]
    total = modular_sum(vectors, bits)
    assert total.dtype == np.uint64
    assert int(total[0]) == sum(v % 2**bits for v in data) % 2**bits
    c = int(centre(total, bits)[0]) if bits > 1 else None
    if c is not None:
        assert -(2 ** (bits - 1)) <= c < 2 ** (bits - 1) and c % 2**bits == int(total[0])


def test_params_are_checked():
    with pytest.raises(ValueError):
        _params(bits=63)
    with pytest.raises(ValueError):
        _params(beta=1.0)
    with pytest.raises(ValueError):
        encode_update({"x": np.ones(3)}, _params(), SEED, PrivacyRandomness.reproducible_from(0))
    assert _params(dim=64).padded_dim == 64 and _params(dim=65).padded_dim == 128


def test_heuristic_gamma_fits_k_standard_deviations_in_the_range():
    g = heuristic_gamma(noise_std=0.3, clip_norm=1.0, bits=20, n=50, padded_dim=1024)
    spread = math.sqrt(50**2 / 1024 + 50 * (g**2 / 4 + 0.3**2))
    assert 2**20 * g == pytest.approx(2 * 4 * spread, rel=1e-12)
    with pytest.raises(ValueError):
        heuristic_gamma(noise_std=0.3, clip_norm=1.0, bits=2, n=50, padded_dim=1024)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 1024])
def test_the_fast_transform_equals_the_dense_hadamard_product_at_every_size(n):
    x = np.random.default_rng(n).standard_normal(n)
    assert np.allclose(walsh_hadamard(x), hadamard(n) @ x / math.sqrt(n), atol=1e-12)


def test_an_idle_devices_encoding_is_exactly_its_noise_share():
    # a zero change skips the rotation and the rounding (both give 0 exactly), so the encoding
    # is the discrete Gaussian draw mod 2^b: the same distribution as through the full path
    from fedrec.common.secagg.discrete_gaussian import sample_discrete_gaussian

    params = _params(sigma=30.0, bits=16)
    zero = {k: np.zeros(s) for k, s in SHAPES.items()}
    encoded = encode_update(zero, params, SEED, PrivacyRandomness.reproducible_from(5, "idle"))
    noise = sample_discrete_gaussian(30.0, 64, PrivacyRandomness.reproducible_from(5, "idle"))
    assert np.array_equal(encoded, np.mod(noise, 1 << 16).astype(np.uint64))
    # negative control: a nonzero change is not just the noise
    busy = encode_update(
        _update(np.random.default_rng(1), 0.5),
        params,
        SEED,
        PrivacyRandomness.reproducible_from(5, "idle"),
    )
    assert not np.array_equal(busy, encoded)
    # and the full path on a zero vector gives the same integers in distribution: rounding
    # 0 draws uniforms but keeps 0, so its result is the zero vector
    assert not conditional_round(np.zeros(64), 1.0, PrivacyRandomness.secure()).any()

"""DDG encoding, SecAgg+ and accounting together: what a round will do, without Flower."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest

from fedrec.common.privacy.randomness import PrivacyRandomness
from fedrec.common.secagg.ddg_accounting import calibrate_ddg_sigma, params_epsilon
from fedrec.common.secagg.encoding import DDGParams, decode_sum, encode_update, heuristic_gamma
from fedrec.common.secagg.protocol import SecAggConfig, SecAggDevice, SecAggServer

SHAPES = {"items": (50, 8), "bias": (50,)}  # d = 450, padded to 512


def _entropy(label: object):
    counter = itertools.count()
    return lambda n: hashlib.sha256(f"{label}/{next(counter)}".encode()).digest()[:n]


def test_a_round_of_ddg_under_secagg_plus_decodes_the_survivors_noisy_sum():
    n, k_min, bits, dim = 12, 9, 20, 450  # 20 bits keep σ ~1e4 integer steps
    # γ and σ depend on each other (γ fits σ·γ of noise in b bits; σ in integer units is
    # calibrated at γ): a few alternations settle, since σ·γ hardly moves with γ
    noise_std = 1.0
    for _ in range(3):
        gamma = heuristic_gamma(noise_std=noise_std, clip_norm=1.0, bits=bits, n=n, padded_dim=512)
        sigma = calibrate_ddg_sigma(
            target_epsilon=4.0, delta=1e-5, rounds=10, n=k_min, dim=512,
            clip_norm=1.0, gamma=gamma, beta=math.exp(-0.5),
        )  # fmt: skip
        noise_std = sigma * gamma
    params = DDGParams(
        gamma=gamma, bits=bits, clip_norm=1.0, beta=math.exp(-0.5), sigma=sigma, dim=dim
    )
    assert params_epsilon(params, n=k_min, rounds=10, delta=1e-5) <= 4.0
    rng = np.random.default_rng(0)
    updates = {}
    for i in range(n):
        raw = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        norm = math.sqrt(sum(float((v**2).sum()) for v in raw.values()))
        updates[i] = {k: v * (0.9 / norm) for k, v in raw.items()}
    public_seed = 2024
    encoded = {
        i: encode_update(u, params, public_seed, PrivacyRandomness.reproducible_from(0, "dev", i))
        for i, u in updates.items()
    }
    cfg = SecAggConfig(
        bits=bits, length=params.padded_dim, degree=6, threshold=4, min_survivors=k_min,
        public_seed=public_seed,
    )  # fmt: skip
    devices = {i: SecAggDevice(i, cfg, entropy=_entropy(i)) for i in range(n)}
    server = SecAggServer(cfg)
    roster = server.collect_keys({i: d.advertise_keys() for i, d in devices.items()})
    routed = server.route_shares({i: d.share_keys(roster) for i, d in devices.items()})
    dropped = {3, 8}
    masked = {i: devices[i].masked_input(routed[i], encoded[i]) for i in routed if i not in dropped}
    survivors, dropouts = server.collect_masked(masked)
    total = server.unmask({i: devices[i].unmask(survivors, dropouts) for i in survivors})
    decoded, at_risk = decode_sum(total, SHAPES, params, public_seed, survivors=len(survivors))
    assert sigma < 1e5
    assert at_risk <= 8  # beyond 3 of the 4 provisioned standard deviations: ~0.3% of 512
    truth = {k: sum(updates[i][k] for i in survivors) for k in SHAPES}
    err = np.concatenate([(decoded[k] - truth[k]).ravel() for k in SHAPES])
    # the error is the summed noise (and rounding): √n·√(σ² + ~1/4)·γ per coordinate
    expected = math.sqrt(len(survivors) * (sigma**2 + 0.25)) * gamma
    assert err.std() == pytest.approx(expected, rel=0.15)
    assert abs(err.mean()) < 5 * expected / math.sqrt(err.size)

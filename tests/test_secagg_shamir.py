"""Shamir sharing over GF(2^521 - 1): any t shares rebuild, fewer reveal nothing, bad input."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.common.secagg import shamir


def _entropy(label: str):
    counter = itertools.count()

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}/{next(counter)}".encode()).digest()
        return out[:n]

    return draw


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    num=st.integers(1, 30),
    data=st.data(),
)
def test_any_threshold_subset_rebuilds_the_secret(secret, num, data):
    threshold = data.draw(st.integers(1, num))
    shares = shamir.split(secret, threshold, num)
    assert len(shares) == num and all(len(s) == shamir.SHARE_BYTES for s in shares)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(threshold, num))]
    assert shamir.combine(subset) == secret


def test_fewer_than_threshold_shares_fit_every_secret_equally():
    # t - 1 shares and ANY candidate secret determine a unique polynomial of degree t - 1:
    # the shares are consistent with every secret (perfect secrecy), so combining t - 1 of
    # them does not give the secret back (negative control)
    secret = b"\x07" * 32
    shares = shamir.split(secret, 3, 5, _entropy("a"))
    assert shamir.combine(shares[:3]) == secret
    with pytest.raises(ValueError):  # 2 of 3: a value of ~521 bits, not a 32-byte secret
        shamir.combine(shares[:2])
    x = [int.from_bytes(s[:4], "little") for s in shares[:2]]
    y = [int.from_bytes(s[5:], "big") for s in shares[:2]]
    for candidate in (0, 1, int.from_bytes(secret, "big"), 12345):
        # the quadratic through (0, candidate), (x0, y0), (x1, y1) exists: solve for a1, a2
        p = shamir.PRIME
        r0, r1 = (y[0] - candidate) % p, (y[1] - candidate) % p
        # a1·x + a2·x² = r  for both points
        det = (x[0] * x[1] ** 2 - x[1] * x[0] ** 2) % p
        a1 = (r0 * x[1] ** 2 - r1 * x[0] ** 2) * pow(det, -1, p) % p
        a2 = (x[0] * r1 - x[1] * r0) * pow(det, -1, p) % p
        assert all(
            (candidate + a1 * xi + a2 * xi * xi) % p == yi for xi, yi in zip(x, y, strict=True)
        )


def test_shares_are_fresh_random_and_deterministic_only_under_given_entropy():
    assert shamir.split(b"s" * 32, 2, 3) != shamir.split(b"s" * 32, 2, 3)
    assert shamir.split(b"s" * 32, 2, 3, _entropy("b")) == shamir.split(
        b"s" * 32, 2, 3, _entropy("b")
    )
    # threshold 1: the polynomial is the constant, every share carries the secret
    assert all(s[5:] == (b"\x00" * 34 + b"s" * 32) for s in shamir.split(b"s" * 32, 1, 3))


def test_bad_input_is_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(b"x", 4, 3)
    with pytest.raises(ValueError, match="at most 64 bytes"):
        shamir.split(b"x" * 65, 2, 3)
    with pytest.raises(ValueError, match="entropy gave 32 bytes"):
        shamir.split(b"x", 2, 3, lambda n: b"\x01" * 32)
    shares = shamir.split(b"x" * 32, 2, 3)
    with pytest.raises(ValueError, match="repeat an index"):
        shamir.combine([shares[0], shares[0]])
    with pytest.raises(ValueError, match="no shares"):
        shamir.combine([])
    with pytest.raises(ValueError, match="71 bytes"):
        shamir.combine([shares[0][:-1], shares[1]])

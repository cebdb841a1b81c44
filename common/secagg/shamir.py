"""Shamir secret sharing (Shamir 1979) over the prime field GF(p), p = 2^521 - 1, in Python ints.

A secret of up to 64 bytes is the constant term of a random polynomial of degree t - 1 whose
other coefficients are uniform in GF(p) (drawn by rejection from the OS's entropy, so
exactly uniform); share x (x = 1..n) is the polynomial at x. Any t shares rebuild the secret
by Lagrange interpolation at 0; fewer than t reveal nothing about it (every secret is equally
likely given them). A share is 4 bytes of x (little-endian), 1 byte of the secret's length and
66 bytes of the value (big-endian).

Why not Flower's `create_shares`/`combine_shares`: they wrap pycryptodome's Shamir over
GF(2^128), whose field arithmetic is pure Python (and Flower adds a thread pool per call):
measured ~5 ms per 16-byte chunk to split 13-of-25 and ~15 ms to combine 13, three chunks
for a 32-byte secret, so ~0.1 s of a SecAgg+ device's and server's round per device
(`benchmarks/secagg_cost.py`). Here a split is ~t·n big-integer multiplications and a combine
t (with the Lagrange weights cached per set of x), a few hundred microseconds at most.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import lru_cache

PRIME = (1 << 521) - 1  # the Mersenne prime M521
_VALUE_BYTES = 66  # ⌈521 / 8⌉
_MAX_SECRET = 64  # bytes: a 512-bit integer is below PRIME
SHARE_BYTES = 4 + 1 + _VALUE_BYTES


def _uniform(entropy: Callable[[int], bytes]) -> int:
    """A uniform element of GF(PRIME), by rejection (a draw ≥ PRIME has probability 2^-521)."""
    while True:
        draw = entropy(_VALUE_BYTES)
        if len(draw) != _VALUE_BYTES:
            raise ValueError(f"entropy gave {len(draw)} bytes, not {_VALUE_BYTES}")
        value = int.from_bytes(draw, "big") & PRIME  # the low 521 bits
        if value < PRIME:
            return value


def split(
    secret: bytes, threshold: int, num: int, entropy: Callable[[int], bytes] = os.urandom
) -> list[bytes]:
    """`num` shares of `secret` (≤ 64 bytes), any `threshold` of which rebuild it; share i
    (0-based) is the polynomial at x = i + 1."""
    if not 1 <= threshold <= num:
        raise ValueError(f"threshold must be in [1, num = {num}], not {threshold}")
    if len(secret) > _MAX_SECRET:
        raise ValueError(f"a secret has at most {_MAX_SECRET} bytes, not {len(secret)}")
    coefficients = [_uniform(entropy) for _ in range(threshold - 1)]
    constant = int.from_bytes(secret, "big")
    shares = []
    for x in range(1, num + 1):
        value = 0
        for c in reversed(coefficients):  # Horner, highest degree first
            value = (value + c) * x % PRIME
        value = (value + constant) % PRIME
        shares.append(
            x.to_bytes(4, "little")
            + len(secret).to_bytes(1, "little")
            + value.to_bytes(_VALUE_BYTES, "big")
        )
    return shares


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Weights w_i = Π_{j≠i} x_j / (x_j - x_i) mod PRIME: the secret is Σ w_i·y_i."""
    weights = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def combine(shares: Sequence[bytes]) -> bytes:
    """The secret of `shares` (at least the threshold of them, from one `split`; with fewer,
    or shares of different secrets, the result is a meaningless value, as in any Shamir)."""
    if not shares:
        raise ValueError("no shares to combine")
    if any(len(s) != SHARE_BYTES for s in shares):
        raise ValueError(f"a share has {SHARE_BYTES} bytes")
    xs = tuple(int.from_bytes(s[:4], "little") for s in shares)
    lengths = {s[4] for s in shares}
    if len(set(xs)) != len(xs) or 0 in xs or len(lengths) != 1:
        raise ValueError("shares repeat an index, have index 0 or disagree on the length")
    total = 0
    for w, s in zip(_lagrange_at_zero(xs), shares, strict=True):
        total += w * int.from_bytes(s[5:], "big")
    total %= PRIME
    length = lengths.pop()
    if total >= 1 << (8 * length):
        raise ValueError("the shares do not rebuild a secret of the stated length")
    return total.to_bytes(length, "big")

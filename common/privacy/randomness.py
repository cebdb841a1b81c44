"""The randomness differential privacy rests on: DP noise and privacy-relevant sampling.

A DP guarantee holds only while its noise and its sampling are unknown to whoever sees the
output: a generator whose seed sits in the run folder, or a non-cryptographic one whose state
its outputs reveal (numpy's PCG64, torch's MT19937), lets an observer subtract the noise and
read back who was sampled. Every draw that a guarantee depends on (the server's user-level
noise, device sampling, a device's DP-SGD batch sampling and noise, `fedrec train`'s) comes
from a `PrivacyRandomness`; public randomness (negative items, data generation, splits,
model initialisation) stays on the seeded generators.

Source: the AES-256-CTR keystream (a CTR_DRBG-style generator, NIST SP 800-90A) under a
256-bit key from the OS (`os.urandom`), a fresh key per source, through the `cryptography`
package (OpenSSL, AES-NI). Uniforms take the top 53 bits k of each 64-bit keystream word,
(k + 1)·2⁻⁵³ in (0, 1]. Normals: the Box-Muller transform (Box & Muller 1958) in float64, so
the largest draw is about 8.6σ (tail mass beyond it ~1e-17, far below any δ).

Floating-point attacks (Mironov 2012, "On significance of the least significant bits for
differential privacy"; for Gaussian samplers Jin et al. 2022, "Are we there yet? Timing and
floating-point attacks on differential privacy systems"): the set of floating-point values
x + Z can take depends on x. Not removed here by construction (Opacus's secure mode sums
four draws per value, Holohan & Braghin 2021, at 4x the cost of the dominant one in the
default job): the noise is drawn in float64 and every released value is rounded to float32
(the 29 low-order bits where the sampler's gaps are dropped), which mitigates but does not
prove it away; a discrete Gaussian over integers (Canonne, Kamath & Steinke 2020) would.

`PrivacyRandomness.reproducible(seed, *labels)` is the same generator keyed from the seed:
the same draws for the same labels, for tests and benchmarks only. A run that uses it has no
privacy guarantee (anyone with its seed regenerates its noise), and says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

if TYPE_CHECKING:
    import torch

_SCALE = 2.0**-53
_KEY_DOMAIN = "fedrec reproducible privacy randomness v1"

# What a run with reproducible noise states in place of its guarantees.
VOID_REASON = (
    "reproducible noise: DP noise and sampling are derived from the recorded seed, so "
    "anyone with the run's configuration can regenerate and remove them; no privacy "
    "guarantee holds"
)


class PrivacyRandomness:
    """A cryptographically secure source of DP noise and sampling (see the module docstring).

    `normal` and `random` take numpy Generator's arguments, so code written against a numpy
    Generator accepts this source unchanged."""

    def __init__(self, key: bytes, *, reproducible: bool = False) -> None:
        if len(key) != 32:
            raise ValueError("PrivacyRandomness needs a 256-bit key")
        self.reproducible = reproducible
        # a fresh key per source: the all-zero initial counter never repeats under one key
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    @classmethod
    def secure(cls) -> PrivacyRandomness:
        """A source keyed with 256 bits of OS entropy: its draws are known to no one."""
        return cls(os.urandom(32))

    @classmethod
    def reproducible_from(cls, seed: int, *labels: int | str) -> PrivacyRandomness:
        """A source keyed from (seed, labels): the same draws every time. Voids DP."""
        text = json.dumps([_KEY_DOMAIN, int(seed), *labels])
        return cls(hashlib.sha256(text.encode()).digest(), reproducible=True)

    # -- raw draws ------------------------------------------------------------------------------
    def _uniform(self, n: int) -> torch.Tensor:
        """(n,) float64 uniforms (k + 1)·2⁻⁵³ in (0, 1], k the top 53 bits of a keystream word
        (every step exact: k + 1 <= 2⁵³ is a float64)."""
        import torch  # here, not at the top: parsing a run's settings must not import torch

        buffer = bytearray(8 * n + 16)  # update_into wants a block of slack
        self._stream.update_into(bytes(8 * n), buffer)
        words = torch.frombuffer(buffer, dtype=torch.int64, count=n)
        # the arithmetic shift leaves the top 53 bits as a signed k - 2⁵², uniform on [-2⁵², 2⁵²)
        return words.bitwise_right_shift_(11).add_((1 << 52) + 1).to(torch.float64).mul_(_SCALE)

    def _normal(self, n: int, std: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(n,) N(0, std²) by Box-Muller, computed in float64 and rounded once to `dtype`
        (default float64; torch's vectorised log/cos/sin: ~2x numpy's float64 ones here)."""
        import torch

        dtype = torch.float64 if dtype is None else dtype
        half = (n + 1) // 2
        u = self._uniform(2 * half)
        radius = u[:half].log_().mul_(-2.0).sqrt_().mul_(std)
        angle = u[half:].mul_(2.0 * math.pi)
        out = torch.empty(2 * half, dtype=dtype)
        torch.mul(radius, torch.cos(angle), out=out[:half])
        torch.mul(radius, angle.sin_(), out=out[half:])
        return out[:n]

    # -- numpy ----------------------------------------------------------------------------------
    def random(self, size: int | Sequence[int] | None = None) -> np.ndarray:
        """Uniforms in (0, 1], float64, on the 2⁻⁵³ grid."""
        shape = () if size is None else tuple(np.atleast_1d(size))
        return self._uniform(math.prod(shape)).numpy().reshape(shape)

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | Sequence[int] | None = None
    ) -> np.ndarray:
        """N(loc, scale²) entries of `size`, float64 (numpy Generator.normal's arguments)."""
        shape = () if size is None else tuple(np.atleast_1d(size))
        z = self._normal(math.prod(shape), scale).numpy().reshape(shape)
        return z + loc if loc else z

    def bernoulli(self, n: int, rate: float) -> np.ndarray:
        """(n,) bool: each entry independently True with probability `rate` (Poisson
        sampling of n candidates), rounded down to the 2⁻⁵³ grid: 0 never, 1 always."""
        return self.bernoulli_tensor(n, rate).numpy()

    # -- torch ----------------------------------------------------------------------------------
    def normal_like(
        self, tensors: Sequence, std: float, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """Independent N(0, std²) entries shaped like each of `tensors` (arrays or tensors):
        one draw, split (the same distribution as one draw per tensor), float32 by default."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        sizes = [math.prod(t.shape) for t in tensors]
        flat = self._normal(sum(sizes), std, dtype)
        return [
            part.view(tuple(t.shape)) for part, t in zip(flat.split(sizes), tensors, strict=True)
        ]

    def bernoulli_tensor(self, n: int, rate: float) -> torch.Tensor:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        return self._uniform(n) <= rate


def privacy_randomness(seed: int | None, *labels: int | str) -> PrivacyRandomness:
    """The source for one use: secure when `seed` is None (every real run), else the
    reproducible source of (seed, labels) (an explicit run option that voids DP)."""
    if seed is None:
        return PrivacyRandomness.secure()
    return PrivacyRandomness.reproducible_from(seed, *labels)

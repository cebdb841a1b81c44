"""The discrete mechanism a ledger may record instead of continuous noise (SecAgg+ with the
distributed discrete Gaussian), and its Rényi DP, for `fedrec.common.privacy.accounting`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True)
class DiscreteGaussian:
    """The distributed discrete Gaussian (DDG) a device's update went through instead of
    continuous noise (Kairouz, Liu & Steinke 2021; `fedrec.common.secagg`): clipped to
    `clip_norm` (update units), scaled by 1/γ, rotated, rounded WITHOUT conditioning (β = 0:
    then an interaction's removal moves the rounded vector by at most Δ/γ + √D' under the
    coupling of shared rounding draws, the bound `ddg_rdp` charges) and noised with N_Z(0, σ²)
    per coordinate, σ in integer steps, mod 2^bits. `dim`: coordinates before padding.
    `target_epsilon`: the per-round ε it was calibrated to (recorded so an audit can re-derive
    σ); the charge itself depends only on the other fields."""

    sigma: float
    gamma: float
    clip_norm: float
    bits: int
    dim: int
    target_epsilon: float

    def __post_init__(self) -> None:
        for name in ("sigma", "gamma", "clip_norm", "target_epsilon"):
            value = getattr(self, name)
            _require(
                _is_real(value) and math.isfinite(value), f"ddg {name} must be a finite number"
            )
            object.__setattr__(self, name, float(value))
        _require(self.sigma >= 0 and self.gamma > 0 and self.clip_norm > 0, "bad ddg parameters")
        for name in ("bits", "dim"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"bad ddg {name}")
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def padded_dim(self) -> int:
        return 1 << (self.dim - 1).bit_length()


@lru_cache(maxsize=1 << 10)
def discrete_rdp(ddg: DiscreteGaussian, n: int, q: float, steps: int) -> np.ndarray:
    """RDP over ORDERS of `steps` rounds of `ddg` summed over n devices' shares, each
    interaction Poisson-sampled at rate q (`fedrec.common.secagg.ddg_accounting.ddg_rdp`)."""
    from fedrec.common.secagg.ddg_accounting import ddg_rdp  # it builds on accounting

    rdp = ddg_rdp(
        sigma=ddg.sigma,
        n=n,
        clip_norm=ddg.clip_norm,
        gamma=ddg.gamma,
        beta=0.0,
        dim=ddg.padded_dim,
        rounds=steps,
        sample_rate=q,
    )
    rdp.flags.writeable = False
    return rdp

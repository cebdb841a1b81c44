"""Per-cohort Rényi-DP accounting over a client's privacy ledger. Pure functions, no training.

A cohort is a set of interactions that arrived together and therefore share one privacy history:
every "train" entry that lists a cohort charged every interaction in it with `steps` compositions
of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar & Zhang 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism"). RDP composes additively, so a cohort's RDP vector is
the sum of the vectors of the entries that list it, and ε follows by the conversion of Balle et
al. 2020 (Theorem 21), both as implemented in `opacus.accountants.analysis.rdp`.

Entries are plain mappings as stored in the ledger's JSON lines (see `fedrec.client.ledger`), so an
auditor can feed parsed lines straight in. Fields read here:
  train:     seq, mechanism (`Mechanism.to_dict()`), cohorts ({cohort: interaction count})
  survivors: train_seq (the train entry it reports on), n (devices in that round's sum)
  retire:    cohorts (list)
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.privacy.discrete import DiscreteGaussian, discrete_rdp

# Opacus's default RDP orders (`RDPAccountant.DEFAULT_ALPHAS`), fixed here so that a change of
# Opacus's defaults cannot silently change recorded ε, and so that an auditor using Opacus's
# defaults recomputes exactly our numbers. 1.1..10.9 in steps of 0.1, then 12..63.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
_ORDERS = np.asarray(ORDERS, dtype=np.float64)

TRAIN, RETIRE, SURVIVORS = "train", "retire", "survivors"  # entry kinds as written in the ledger


class Guarantee(StrEnum):
    """Whose noise the ε counts on.

    LOCAL: only the device's own noise. Holds against anyone who sees the device's update.
    DISTRIBUTED: with secure aggregation the server sees only the sum of n surviving devices'
      updates, each carrying independent Gaussian noise σ_dev, so the sum carries σ_dev·√n.
      Assumes secure aggregation holds, the server does not collude with the other devices, and
      they added their noise honestly. Holds against the server and anyone who sees the
      aggregate, not against an observer of this device's own update.
    """

    LOCAL = "local"
    DISTRIBUTED = "distributed"


_RDP_MODULE = "opacus.accountants.analysis.rdp"
_STANDALONE_RDP = "fedrec._opacus_rdp_analysis"  # the same file, loaded without the package


def _opacus_rdp():
    """Opacus's RDP analysis, loaded when an ε is first computed. The module needs only numpy
    and scipy, while importing it through the opacus package imports torch and
    torch.distributed (seconds), which accounting never needs: a device's `ingest` or
    `status`, the server's calibration at start-up and the report's pass over the ledgers.
    In a process that already imported opacus (a training device), that module is used."""
    module = sys.modules.get(_RDP_MODULE) or sys.modules.get(_STANDALONE_RDP)
    if module is None:
        package = importlib.util.find_spec("opacus")
        if package is None or not package.submodule_search_locations:
            raise ImportError("opacus is not installed: it computes every ε")
        path = Path(package.submodule_search_locations[0], "accountants", "analysis", "rdp.py")
        spec = importlib.util.spec_from_file_location(_STANDALONE_RDP, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_STANDALONE_RDP] = module
    return module


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Mechanism:
    """One round of DP-SGD on one device, as it was (or will be) run."""

    noise_multiplier: float  # σ the device added, in units of clip_norm; 0 = no noise
    sample_rate: float  # Poisson inclusion probability q of each interaction per step
    steps: int  # optimizer steps, each one composition (empty batches included)
    clip_norm: float  # per-interaction L2 clip C; recorded, ε does not depend on it
    delta: float  # δ the run targets; recorded, conversions take δ explicitly
    # Distributed calibration (both None without it): the σ that the sum over at least K_min
    # devices is calibrated for, and K_min (the server drops rounds with fewer survivors).
    aggregate_noise_multiplier: float | None = None
    min_survivors: int | None = None
    # The discrete mechanism of SecAgg+ (`secure-aggregation-protocol = "secagg"`): then
    # noise_multiplier and aggregate_noise_multiplier are 0 (no continuous noise; code that
    # ignores this field charges ε = inf, never too little) and the charge is `ddg_rdp`'s.
    ddg: DiscreteGaussian | None = None

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "sample_rate", "clip_norm", "delta"):
            value = getattr(self, name)
            _check(_is_real(value) and math.isfinite(value), f"{name} must be a finite number")
            object.__setattr__(self, name, float(value))
        _check(self.noise_multiplier >= 0, "noise_multiplier must be >= 0")
        _check(0 < self.sample_rate <= 1, "sample_rate must be in (0, 1]")
        _check(_is_int(self.steps) and self.steps >= 0, "steps must be an integer >= 0")
        object.__setattr__(self, "steps", int(self.steps))
        _check(self.clip_norm > 0, "clip_norm must be > 0")
        _check(0 < self.delta < 1, "delta must be in (0, 1)")
        agg, k = self.aggregate_noise_multiplier, self.min_survivors
        _check(
            (agg is None) == (k is None),
            "aggregate_noise_multiplier and min_survivors are set together or not at all",
        )
        if agg is not None:
            _check(_is_real(agg) and math.isfinite(agg) and agg >= 0, "bad aggregate σ")
            _check(_is_int(k) and k >= 1, "min_survivors must be an integer >= 1")
            object.__setattr__(self, "aggregate_noise_multiplier", float(agg))
            object.__setattr__(self, "min_survivors", int(k))
            # The sum of K_min devices' noise is σ·√K_min: a larger claim would be unfounded.
            _check(
                float(agg) <= self.noise_multiplier * math.sqrt(k) * (1 + 1e-9),
                f"aggregate_noise_multiplier {agg} exceeds noise_multiplier·√min_survivors "
                f"= {self.noise_multiplier * math.sqrt(k)}",
            )

        if self.ddg is not None:
            _check(isinstance(self.ddg, DiscreteGaussian), "ddg must be a DiscreteGaussian")
            _check(self.noise_multiplier == 0, "a DDG mechanism adds no continuous noise")

    def to_dict(self) -> dict[str, Any]:
        """The ledger's form; "ddg" only when set (ledgers written before it stay the same)."""
        out = asdict(self)
        if self.ddg is None:
            del out["ddg"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mechanism:
        names = {f.name for f in fields(cls)}
        _check(isinstance(data, Mapping), "mechanism must be a mapping")
        given = set(data) | {"ddg"}
        _check(given == names, f"mechanism fields {sorted(data)} != {sorted(names)}")
        values = dict(data)
        ddg = values.pop("ddg", None)
        if ddg is not None:
            _check(isinstance(ddg, Mapping), "ddg must be a mapping")
            ddg_names = {f.name for f in fields(DiscreteGaussian)}
            _check(set(ddg) == ddg_names, f"ddg fields {sorted(ddg)} != {sorted(ddg_names)}")
            ddg = DiscreteGaussian(**ddg)
        return cls(**values, ddg=ddg)


@lru_cache(maxsize=1 << 12)
def _parse_mechanism(items: tuple[tuple[str, type, Any], ...]) -> Mechanism:
    # validated once per distinct one; a nested mapping (ddg) comes as a tuple of its items
    return Mechanism.from_dict(
        {k: dict((n, v) for n, _, v in value) if t is dict else value for k, t, value in items}
    )


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _key_item(name: str, value: Any) -> tuple[str, type, Any]:
    """A ledger field as a hashable cache key, keyed with its type too (True == 1 must not pass
    as steps=1 from the cache); a nested mapping becomes a tuple of its typed items."""
    kind = type(value)
    if kind in _SCALARS:  # the common case first: the report parses every ledger entry
        return name, kind, value
    if isinstance(value, Mapping):
        return name, dict, tuple((k, type(v), v) for k, v in sorted(value.items()))
    return name, kind, value


def parse_mechanism(data: Mapping[str, Any]) -> Mechanism:
    """A ledger entry's mechanism, parsed and validated (cached per distinct one)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"mechanism must be a mapping, got {type(data).__name__}")
    key = tuple(_key_item(k, v) for k, v in data.items())
    try:
        hash(key)
    except TypeError:  # a list where a number belongs: the uncached path names the field
        return Mechanism.from_dict(data)
    return _parse_mechanism(key)


@lru_cache(maxsize=1 << 16)
def _rdp_one_step(sample_rate: float, sigma: float) -> np.ndarray:
    """RDP of one step over ORDERS. The expensive part, hence cached per (q, σ)."""
    rdp = np.asarray(
        _opacus_rdp().compute_rdp(
            q=sample_rate, noise_multiplier=sigma, steps=1, orders=list(ORDERS)
        ),
        dtype=np.float64,
    )
    rdp.flags.writeable = False
    return rdp


def rdp_of(mechanism: Mechanism, *, sigma_override: float | None = None) -> np.ndarray:
    """RDP over ORDERS of `mechanism.steps` compositions; σ = 0 gives inf, steps = 0 gives 0."""
    sigma = mechanism.noise_multiplier if sigma_override is None else float(sigma_override)
    _check(sigma >= 0, "sigma must be >= 0")
    if mechanism.steps == 0:
        return np.zeros(len(ORDERS))
    if sigma == 0:
        return np.full(len(ORDERS), np.inf)
    # Same arithmetic as compute_rdp(steps=s): the one-step vector times s.
    return _rdp_one_step(mechanism.sample_rate, sigma) * mechanism.steps


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(ε, best order) at δ. No charge at all gives (0, nan); any infinite order alone is harmless,
    all infinite gives (inf, nan)."""
    _check(0 < delta < 1, "delta must be in (0, 1)")
    rdp = np.asarray(rdp, dtype=np.float64)
    _check(rdp.shape == _ORDERS.shape, f"rdp must have {len(ORDERS)} orders")
    if not rdp.any():
        return 0.0, math.nan
    if np.isinf(rdp).all():
        return math.inf, math.nan
    with warnings.catch_warnings():
        # "Optimal order is the smallest/largest alpha": the bound is still valid, just looser.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, order = _opacus_rdp().get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
    return max(float(eps), 0.0), float(order)  # ε < 0 can only come from δ near 1


def _epsilons(rdp: np.ndarray, delta: float) -> np.ndarray:
    """`epsilon_from_rdp` for each row of (cohorts, orders), vectorised: same arithmetic."""
    _check(0 < delta < 1, "delta must be in (0, 1)")
    eps = rdp - (np.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1) + np.log((_ORDERS - 1) / _ORDERS)
    best = np.maximum(eps.min(axis=1), 0.0)  # rows are sums of charges: no nan, only +inf
    best[~rdp.any(axis=1)] = 0.0
    return best


def ddg_charge(mechanism: Mechanism, guarantee: Guarantee, survivors: int | None) -> np.ndarray:
    """RDP over ORDERS of `mechanism.steps` rounds of its discrete Gaussian: the noise of
    n = min(survivors, K_min) devices (K_min if none recorded) under DISTRIBUTED, of the device
    alone (n = 1) under LOCAL, as `effective_sigma` counts the continuous one. Poisson sampling
    of interactions at the mechanism's rate amplifies (Zhu & Wang 2019; `ddg_rdp`)."""
    ddg = mechanism.ddg
    assert ddg is not None
    if mechanism.steps == 0:
        return np.zeros(len(ORDERS))
    k = mechanism.min_survivors
    if guarantee is Guarantee.LOCAL or k is None:
        n = 1
    else:
        n = k if survivors is None else min(survivors, k)
    return discrete_rdp(ddg, n, mechanism.sample_rate, mechanism.steps)


def charge_of(mechanism: Mechanism, guarantee: Guarantee, survivors: int | None) -> np.ndarray:
    """RDP over ORDERS of one train entry's mechanism, as the adversary of `guarantee` sees it."""
    if mechanism.ddg is not None:
        return ddg_charge(mechanism, guarantee, survivors)
    return rdp_of(mechanism, sigma_override=effective_sigma(mechanism, guarantee, survivors))


def effective_sigma(mechanism: Mechanism, guarantee: Guarantee, survivors: int | None) -> float:
    """σ the adversary of `guarantee` faces.

    DISTRIBUTED: σ_dev·√n with n = min(recorded survivors, K_min), or K_min if none recorded.
    A round recorded with fewer survivors than K_min (which the server should have discarded) is
    charged at its real √n. Extra survivors above K_min are not credited: ε then never decreases
    when a survivors entry arrives, and the planner's forecast (made with K_min) stays an upper
    bound. A mechanism without K_min is charged as LOCAL under either guarantee.
    """
    sigma = mechanism.noise_multiplier
    if guarantee is Guarantee.LOCAL or mechanism.min_survivors is None:
        return sigma
    n = mechanism.min_survivors if survivors is None else min(survivors, mechanism.min_survivors)
    return sigma * math.sqrt(n)


def _survivors_by_train_seq(entries: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    train_seqs = {e["seq"] for e in entries if e["kind"] == TRAIN}
    found: dict[int, int] = {}
    for e in entries:
        if e["kind"] == SURVIVORS:
            seq, n = e["train_seq"], e["n"]
            _check(seq in train_seqs, f"survivors entry refers to no train entry seq {seq}")
            _check(_is_int(n) and n >= 1, f"survivors n must be an integer >= 1, got {n!r}")
            found[seq] = min(n, found.get(seq, n))  # conflicting reports: the worse one
    return found


def cohort_rdp(entries: Iterable[Mapping[str, Any]], guarantee: Guarantee) -> dict[str, np.ndarray]:
    """Accumulated RDP vector (over ORDERS) of every cohort that any train entry lists."""
    entries = list(entries)
    survivors = _survivors_by_train_seq(entries)
    acc: dict[str, np.ndarray] = {}
    for e in entries:
        kind = e["kind"]
        _check(kind in (TRAIN, RETIRE, SURVIVORS), f"unknown entry kind {kind!r}")
        if kind != TRAIN:
            continue
        mechanism = parse_mechanism(e["mechanism"])
        charge = charge_of(mechanism, guarantee, survivors.get(e["seq"]))
        for cohort in e["cohorts"]:
            acc[cohort] = acc[cohort] + charge if cohort in acc else charge.copy()
    return acc


def cohort_epsilons(
    entries: Iterable[Mapping[str, Any]], guarantee: Guarantee, delta: float
) -> dict[str, float]:
    """ε at δ of every cohort that any train entry lists."""
    acc = cohort_rdp(entries, guarantee)
    if not acc:
        return {}
    return dict(zip(acc, epsilons_of_rdp(list(acc.values()), delta).tolist(), strict=True))


def epsilons_of_rdp(rdp: Sequence[np.ndarray], delta: float) -> np.ndarray:
    """ε at δ of each accumulated RDP vector (as `cohort_rdp` gives them), in one vectorised
    pass: many ledgers' cohorts at once cost one numpy call instead of one per ledger."""
    if not len(rdp):
        return np.zeros(0, np.float64)
    return _epsilons(np.stack(rdp), delta)


def retired(entries: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    return frozenset(c for e in entries if e["kind"] == RETIRE for c in e["cohorts"])


def epsilon_if(
    entries: Iterable[Mapping[str, Any]],
    planned: Mechanism,
    cohorts: Iterable[str],
    guarantee: Guarantee,
    delta: float,
) -> dict[str, float]:
    """ε each of `cohorts` would have after one more round of `planned` (K_min survivors)."""
    acc = cohort_rdp(entries, guarantee)
    charge = charge_of(planned, guarantee, None)
    cohorts = list(cohorts)
    if not cohorts:
        return {}
    after = np.stack([acc[c] + charge if c in acc else charge for c in cohorts])
    return dict(zip(cohorts, _epsilons(after, delta).tolist(), strict=True))


def plan(
    entries: Iterable[Mapping[str, Any]],
    planned: Mechanism,
    cohorts: Iterable[str],
    budget: float,
    guarantee: Guarantee,
    delta: float,
) -> tuple[list[str], dict[str, float]]:
    """Split `cohorts` into (trainable, to_retire: {cohort: ε it would reach}) before training.

    A cohort is trainable iff its ε after `planned` stays ≤ budget; retired cohorts are left out
    of both. This is an individual (per-record) Rényi filter, sound under adaptive composition
    because each record's inclusion depends only on its own past privacy loss (Feldman & Zrnic
    2021, "Individual Privacy Accounting via a Rényi Filter"). Their theorem is for one fixed
    RDP order; deciding on ε optimised over ORDERS, as here, is exact when the mechanisms'
    parameters follow a schedule, not the released outputs (if they adapt to outputs, fix the
    order in advance). The sample rate is treated as public, as Opacus does. If retiring
    cohorts changes the rate of `planned` (q = batch / size), plan again with the new
    mechanism; the trainable set only shrinks, so that terminates.
    Under DISTRIBUTED the forecast assumes K_min survivors; a round later reported with fewer
    pushes ε higher and the cohort is retired at the next plan.
    """
    _check(_is_real(budget) and budget >= 0, "budget must be a number >= 0")
    entries = list(entries)
    gone = retired(entries)
    live = [c for c in dict.fromkeys(cohorts) if c not in gone]
    eps = epsilon_if(entries, planned, live, guarantee, delta)
    trainable = [c for c in live if eps[c] <= budget]
    return trainable, {c: eps[c] for c in live if eps[c] > budget}

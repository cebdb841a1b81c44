"""Server-side aggregation of client updates: validation, per-user clipping, noise, FedAvg/FedAdam.

Plain functions on `dict[str, np.ndarray]` (name -> float32 array of the model's GLOBAL
parameters); nothing here imports Flower. One round is

    delta_k = params_k - global                      each client's change, all parameters jointly
    delta_k <- delta_k * min(1, C / ||delta_k||)     if user_clip_norm C is set
    avg     = sum_k w_k delta_k / D                  D = sum_k w_k, or a FIXED denominator
    avg    <- avg + N(0, noise_std^2 I)              if noise_std > 0
    global <- server_optimizer(global, avg)          FedAvg or FedAdam

User-level DP (DP-FedAvg with fixed clipping; McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"; Andrew et al. 2021 for the adaptive variant) needs three
things of this function: each user's WHOLE update clipped to C, uniform weights (w_k = 1), and a
denominator that does not depend on who was sampled (D = q * N, the expected number of clients
under Poisson sampling). With the realised count in the denominator, removing one user changes
every other user's weight too and the sensitivity of the average is no longer C / D. The caller
passes noise_std = z * C / D (see `fedrec.server.user_privacy.aggregate_noise_std`).

Accumulation is in float64 per client (no stacking of all updates), so memory is three copies of
the model whatever the number of clients, and the clipped contribution's norm is bounded by C to
float64 precision, not float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from fedrec.common.privacy.randomness import PrivacyRandomness
    from fedrec.common.replies import DeviceReply

Params: TypeAlias = dict[str, np.ndarray]  # parameter name -> float32 array (GLOBAL scope only)
ClientId: TypeAlias = str

Weighting: TypeAlias = Literal["examples", "uniform"]
OptimizerName: TypeAlias = Literal["fedavg", "fedadam"]


@dataclass(frozen=True)
class Rejection:
    """Why the server refused an update: a `kind` to count rounds by, and the detail."""

    kind: str  # one of REJECTION_KINDS
    reason: str


# Every kind of refused reply, counted per round (`RoundReplies.dropped_kinds`)
REJECTION_KINDS = (
    "malformed",  # not a mapping of name to numpy array, or unreadable
    "names",  # missing or unexpected parameters
    "dtype",
    "shape",
    "non-finite",  # NaN or inf
    "norm",  # moves the model further than any honest device could
    "num-examples",  # not a count
    "metrics",  # not a mapping of name to finite number
    "duplicate",  # a second reply of the same device in one round
    "secure-aggregation",  # a device's own update or metrics under secure aggregation
)


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_change: float | None = None,
) -> str | None:
    """None if `update` passes `check_update`; else why not."""
    rejection = check_update(update, reference, max_change)
    return None if rejection is None else rejection.reason


def check_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_change: float | None = None,
) -> Rejection | None:
    """None if `update` has exactly `reference`'s names, shapes, float32 and finite values, and
    (with `max_change`) moves the parameters by at most that L2 norm; else why not.

    Never raises: a malformed update from a client is a reason to drop it, not to crash a round.
    The norm bound is what the run's calibration lets an honest device send; whatever a device
    claims, one update can then move the model by no more than any honest one could.
    """
    try:
        if not isinstance(update, Mapping):
            return Rejection(
                "malformed",
                f"update is a {type(update).__name__}, not a mapping of parameter name to array",
            )
        missing = [name for name in reference if name not in update]
        if missing:
            return Rejection("names", f"missing parameter(s): {', '.join(map(repr, missing))}")
        extra = sorted(repr(name) for name in update if name not in reference)
        if extra:
            return Rejection("names", f"unexpected parameter(s): {', '.join(extra)}")
        for name, ref in reference.items():
            value = update[name]
            if not isinstance(value, np.ndarray):
                return Rejection(
                    "malformed", f"parameter {name!r}: a {type(value).__name__}, not a numpy array"
                )
            if value.dtype != np.float32:
                return Rejection(
                    "dtype", f"parameter {name!r}: dtype {value.dtype}, expected float32"
                )
            if value.shape != ref.shape:
                return Rejection(
                    "shape", f"parameter {name!r}: shape {value.shape}, expected {ref.shape}"
                )
            finite = np.isfinite(value)
            if not finite.all():
                nan = int(np.count_nonzero(np.isnan(value)))
                bad = value.size - int(np.count_nonzero(finite))
                return Rejection(
                    "non-finite",
                    f"parameter {name!r}: {bad} non-finite value(s) of {value.size} "
                    f"({nan} NaN, {bad - nan} inf)",
                )
        if max_change is not None:
            norm = math.sqrt(
                sum(
                    float(np.sum(np.square(update[n].astype(np.float64) - ref, dtype=np.float64)))
                    for n, ref in reference.items()
                )
            )
            if not norm <= max_change:
                return Rejection(
                    "norm", f"update norm {norm:.4g} exceeds the bound {max_change:.4g} of the run"
                )
        return None
    except Exception as exc:  # anything odd a client could send (bad keys, broken array objects)
        return Rejection("malformed", f"update could not be checked: {type(exc).__name__}: {exc}")


def check_reply_fields(reply: DeviceReply) -> Rejection | None:
    """A device's example count and metrics are what the server adds up: a count that is no
    count, or a metric that is no number, would crash the round. (A NaN loss is an honest
    device's with no non-empty batch; the row's figures skip non-finite values.)"""
    n = reply.num_examples
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        return Rejection("num-examples", f"num_examples {n!r} is not a count >= 0")
    if not isinstance(reply.metrics, Mapping):
        return Rejection("metrics", f"metrics are a {type(reply.metrics).__name__}, not a mapping")
    for key, value in reply.metrics.items():
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if not (isinstance(key, str) and ok):
            return Rejection("metrics", f"metric {key!r} = {value!r} is not a number")
    return None


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    client_id: ClientId
    params: Params  # the client's new GLOBAL parameters after local training (not a delta)
    num_examples: int  # weight under weighting="examples"; ignored under "uniform"

    def __post_init__(self) -> None:
        n = self.num_examples
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"client {self.client_id!r}: num_examples must be an integer >= 0")


@dataclass(frozen=True)
class ServerOptConfig:
    name: OptimizerName = "fedavg"
    lr: float = 1.0  # server learning rate η; 1.0 makes FedAvg the plain average. FedAdam: ~1e-2
    beta1: float = 0.9  # FedAdam first-moment decay (Reddi et al. 2021, Algorithm 2)
    beta2: float = 0.99  # FedAdam second-moment decay
    tau: float = 1e-3  # FedAdam adaptivity: bounds the step to η / τ per coordinate

    def __post_init__(self) -> None:
        if self.name not in ("fedavg", "fedadam"):
            raise ValueError(f"unknown server optimizer {self.name!r}: fedavg or fedadam")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lr must be a finite number > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError("tau must be a finite number > 0")


@dataclass(frozen=True, eq=False)
class ServerOptState:
    steps: int  # server optimizer steps applied (rounds that changed the model)
    m: Params = field(default_factory=dict)  # FedAdam first moment (float32); empty for FedAvg
    v: Params = field(default_factory=dict)  # FedAdam second moment (float32); empty for FedAvg


def init_server_state(params: Mapping[str, np.ndarray], cfg: ServerOptConfig) -> ServerOptState:
    if cfg.name == "fedadam":
        zeros = {name: np.zeros(p.shape, dtype=np.float32) for name, p in params.items()}
        return ServerOptState(steps=0, m=zeros, v={n: np.zeros_like(z) for n, z in zeros.items()})
    return ServerOptState(steps=0)


@dataclass(frozen=True)
class AggregationDiagnostics:
    """What happened in one aggregation, for the operator's logs.

    Norms and the clipped fraction are computed from the clients' RAW updates: they are not
    covered by any DP guarantee. Log them on the (trusted) server; do not publish them.
    """

    num_aggregated: int
    mean_delta_norm: float  # before clipping; nan with no updates
    max_delta_norm: float
    fraction_clipped: float  # of the aggregated updates; 0 without clipping
    total_weight: float  # sum of weights (examples, or the count under "uniform")
    denominator: float  # what the weighted sum was divided by; 0 when nothing was averaged
    noise_std: float
    applied: bool  # False: the parameters were returned unchanged
    note: str = ""

    def as_metrics(self) -> dict[str, float]:
        """Numbers only (Flower's MetricRecord takes no strings)."""
        return {
            "num_aggregated": float(self.num_aggregated),
            "mean_delta_norm": self.mean_delta_norm,
            "max_delta_norm": self.max_delta_norm,
            "fraction_clipped": self.fraction_clipped,
            "total_weight": self.total_weight,
            "denominator": self.denominator,
            "noise_std": self.noise_std,
            "applied": float(self.applied),
        }


def _check_args(
    weighting: str, user_clip_norm: float | None, denominator: float | None, noise_std: float
) -> None:
    if weighting not in ("examples", "uniform"):
        raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    if user_clip_norm is not None and not (math.isfinite(user_clip_norm) and user_clip_norm > 0):
        raise ValueError("user_clip_norm must be None or a finite number > 0")
    if denominator is not None:
        if not (math.isfinite(denominator) and denominator > 0):
            raise ValueError("denominator must be None or a finite number > 0")
        if weighting != "uniform":
            raise ValueError("a fixed denominator needs weighting='uniform' (user-level DP)")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError("noise_std must be a finite number >= 0")


def aggregate(
    global_params: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    *,
    weighting: Weighting = "examples",
    user_clip_norm: float | None = None,
    denominator: float | None = None,
    noise_std: float = 0.0,
    rng: PrivacyRandomness | np.random.Generator | None = None,
    opt_cfg: ServerOptConfig,
    opt_state: ServerOptState,
) -> tuple[Params, ServerOptState, AggregationDiagnostics]:
    """One server round: clip, average, noise, optimizer step. See the module docstring.

    `updates` must be valid (`validate_update`; drop bad ones first): an invalid or duplicated
    client raises ValueError, since counting a user twice would double their influence.
    `denominator` (uniform weighting only) replaces the realised count: the user-level DP
    setting, where it is the EXPECTED number of sampled clients. `noise_std` is in delta units.
    Noise is drawn from `rng.normal` per parameter in `global_params`' order. A run passes a
    `PrivacyRandomness` (a CSPRNG under a fresh OS key): noise whose generator can be
    regenerated, as a seeded numpy Generator can, protects nothing (tests of the arithmetic
    only).

    With no updates (or zero total weight) and no fixed denominator there is nothing to average:
    without noise the parameters come back unchanged (`applied=False`). Whenever noise_std > 0
    the noise is still added, to an average of zero: under Poisson client sampling an empty
    sample is a possible outcome of the mechanism that the accountant charges, and skipping it
    would reveal that nobody was sampled (the same rule as an empty Poisson batch in DP-SGD).
    """
    _check_inputs(
        global_params, updates, weighting, user_clip_norm, denominator, noise_std, rng, opt_cfg,
        opt_state,
    )  # fmt: skip
    weights = [1.0 if weighting == "uniform" else float(u.num_examples) for u in updates]
    total_weight = float(sum(weights))
    g64 = {name: g.astype(np.float64) for name, g in global_params.items()}
    acc, norms, clipped = _clipped_sum(g64, updates, weights, user_clip_norm)

    averaged = denominator is not None or total_weight > 0
    denom = denominator if denominator is not None else (total_weight if averaged else 0.0)
    stats = _statistics(norms, clipped, total_weight, denom, noise_std)
    note = _nothing_to_average(len(updates), averaged)
    if not averaged and noise_std == 0:
        unchanged = AggregationDiagnostics(
            **stats, applied=False, note=f"{note}: parameters unchanged"
        )
        return dict(global_params), opt_state, unchanged
    if not averaged:
        note = f"{note}: noise-only step"
    delta = _noisy_average(acc, denom if averaged else None, noise_std, rng)
    new_params, new_state = _server_step(g64, delta, opt_cfg, opt_state)
    return new_params, new_state, AggregationDiagnostics(**stats, applied=True, note=note)


def _statistics(
    norms: np.ndarray, clipped: int, total_weight: float, denominator: float, noise_std: float
) -> dict:
    """The numbers of `AggregationDiagnostics` (nan norms without updates)."""
    n = len(norms)
    return dict(
        num_aggregated=n,
        mean_delta_norm=float(norms.mean()) if n else math.nan,
        max_delta_norm=float(norms.max()) if n else math.nan,
        fraction_clipped=clipped / n if n else 0.0,
        total_weight=total_weight,
        denominator=float(denominator),
        noise_std=float(noise_std),
    )


def _nothing_to_average(count: int, averaged: bool) -> str:
    """Why there is nothing to average ("" when there is)."""
    if count == 0:
        return "no updates"
    if not averaged:
        return "all updates carry zero weight (num_examples == 0)"
    return ""


def _check_inputs(
    global_params: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    weighting: str,
    user_clip_norm: float | None,
    denominator: float | None,
    noise_std: float,
    rng: PrivacyRandomness | np.random.Generator | None,
    opt_cfg: ServerOptConfig,
    opt_state: ServerOptState,
) -> None:
    """ValueError for bad arguments, non-float32 parameters, an invalid or repeated update
    (counting a user twice would double their influence), or FedAdam state of other names."""
    _check_args(weighting, user_clip_norm, denominator, noise_std)
    if noise_std > 0 and rng is None:
        raise ValueError("noise_std > 0 needs an rng")
    for name, g in global_params.items():
        if not isinstance(g, np.ndarray) or g.dtype != np.float32:
            raise ValueError(f"global parameter {name!r} must be a float32 numpy array")
    seen: set[str] = set()
    for u in updates:
        if u.client_id in seen:
            raise ValueError(f"client {u.client_id!r} sent more than one update this round")
        seen.add(u.client_id)
        reason = validate_update(u.params, global_params)
        if reason is not None:
            raise ValueError(f"client {u.client_id!r}: {reason}")
    if opt_cfg.name == "fedadam" and (
        opt_state.m.keys() != global_params.keys() or opt_state.v.keys() != global_params.keys()
    ):
        raise ValueError("FedAdam state does not match the parameters: use init_server_state")


def _clipped_sum(
    g64: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    user_clip_norm: float | None,
) -> tuple[Params, np.ndarray, int]:
    """(sum_k w_k clip(delta_k) in float64, each ||delta_k|| before clipping, how many were
    clipped), one client at a time: memory stays three copies of the model."""
    acc = {name: np.zeros_like(g) for name, g in g64.items()}  # sum_k w_k clip(delta_k)
    buf = {name: np.empty_like(g) for name, g in g64.items()}  # delta_k, reused across clients
    norms = np.zeros(len(updates))
    clipped = 0
    for k, (u, w) in enumerate(zip(updates, weights, strict=True)):
        sq = 0.0
        for name, g in g64.items():
            d = np.subtract(u.params[name], g, out=buf[name])
            flat = d.reshape(-1)
            # einsum, not np.dot/vdot: threaded BLAS ddot stalls when other processes hold the
            # cores.
            sq += float(np.einsum("i,i->", flat, flat))
        norms[k] = math.sqrt(sq)
        scale = w
        if user_clip_norm is not None and norms[k] > user_clip_norm:
            scale *= user_clip_norm / norms[k]
            clipped += 1
        if scale == 0.0:
            continue
        for name, d in buf.items():
            if scale != 1.0:
                d *= scale
            acc[name] += d
    return acc, norms, clipped


def _noisy_average(
    acc: Params,
    denominator: float | None,
    noise_std: float,
    rng: PrivacyRandomness | np.random.Generator | None,
) -> Params:
    """acc / denominator (None: nothing to average) + N(0, noise_std² I), drawn per parameter
    in order; in place, reusing the accumulators."""
    for a in acc.values():
        if denominator is not None:
            a /= denominator
        if noise_std > 0:
            assert rng is not None
            a += rng.normal(0.0, noise_std, size=a.shape)
    return acc


def _server_step(
    g64: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    cfg: ServerOptConfig,
    state: ServerOptState,
) -> tuple[Params, ServerOptState]:
    """FedAvg: x + η Δ. FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2,
    no bias correction): m = β1 m + (1-β1) Δ; v = β2 v + (1-β2) Δ²; x + η m / (√v + τ)."""
    if cfg.name == "fedavg":
        new = {name: (g + cfg.lr * delta[name]).astype(np.float32) for name, g in g64.items()}
        return new, ServerOptState(steps=state.steps + 1)
    new, m_new, v_new = {}, {}, {}
    for name, g in g64.items():
        d = delta[name]
        m = cfg.beta1 * state.m[name].astype(np.float64) + (1 - cfg.beta1) * d
        v = cfg.beta2 * state.v[name].astype(np.float64) + (1 - cfg.beta2) * np.square(d)
        new[name] = (g + cfg.lr * m / (np.sqrt(v) + cfg.tau)).astype(np.float32)
        m_new[name], v_new[name] = m.astype(np.float32), v.astype(np.float32)
    return new, ServerOptState(steps=state.steps + 1, m=m_new, v=v_new)

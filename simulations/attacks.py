"""Malicious devices of a simulated run (`attack` settings; `fedrec simulate --scenario`).

An attacker controls its device: it skips DP-SGD and sends whatever it likes, and meets only
what the server or the protocol enforces (the server's checks, or the input check of a secure
sum, and the defences of `fedrec.server.robustness`). Which devices are malicious and which
items they promote are part of the simulation, drawn from the run's seed (never DP randomness).

- "promote" (targeted; FedRecAttack, Rong et al. 2022; PipAttack, Zhang et al. 2022): every
  malicious device claims interactions with the target items and sends the update that raises
  their served biases most per unit of norm (the limit of training on those fabricated
  interactions: all of its change goes to the targets' popularity), at `attack-boost` times
  the largest norm the run accepts (`update_norm_bound`, which under DP-SGD leaves room for the
  device's noise: an attacker that sends no noise spends that room on signal).
- untargeted: "random" (a random direction at the same norm), "scale" (its honest update's
  change x100), "sign-flip" (its honest change reversed), "nan" / "inf" (one poisoned
  coordinate), "shape" (the item table one row short), "malformed" (not a mapping, a
  negative example count, or a metric that is not a number, in turn).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from fedrec.client.runtime import template_for
from fedrec.common.data.stream import Stream, load_stream
from fedrec.common.model import served_bias_weights
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig

SCALE_FACTOR = 100.0  # "scale": far beyond any honest update, unless nothing bounds updates
ITEM_TABLE = "item_table.weight"


def malicious_devices(config: SimulationConfig) -> frozenset[int]:
    """The dense users whose devices the attacker controls (none without an attack)."""
    return frozenset() if config.attack == "none" else malicious_draw(config)


def malicious_draw(config: SimulationConfig) -> frozenset[int]:
    """`malicious-share` of the stream's registered devices (rounded, at least one), drawn
    from the seed whatever the attack: a clean run measures the same benign users."""
    data = json.dumps(dataclasses.asdict(config.data), sort_keys=True)
    key = (data, config.rounds, config.stream_protocol, config.seed, config.malicious_share)
    if key not in _MALICIOUS:
        registered = load_stream(config.data, config.rounds, config.stream_protocol).clients()
        count = max(1, round(config.malicious_share * len(registered)))
        rng = np.random.default_rng([config.seed, 0xA77AC])
        chosen = rng.choice(registered, size=count, replace=False)
        _MALICIOUS.clear()  # one run per process at a time
        _MALICIOUS[key] = frozenset(int(u) for u in chosen)
    return _MALICIOUS[key]


_MALICIOUS: dict[tuple, frozenset[int]] = {}


def target_items(stream: Stream, count: int) -> list[int]:
    """The promoted items (dense indices): first the least interacted-with item of the whole
    dataset (with none in its data: a brand-new item, the cold start), then the next least
    interacted-with; ties by index."""
    counts = np.bincount(stream.dataset.interactions.item, minlength=stream.dataset.num_items)
    return [int(i) for i in np.argsort(counts, kind="stable")[:count]]


def run_targets(config: SimulationConfig) -> list[int]:
    """The items a promotion attack of these settings targets (a clean run measures them too,
    for comparison)."""
    return target_items(load_stream(config.data, config.rounds, config.stream_protocol),
                        config.attack_targets)  # fmt: skip


def attack_budget(config: SimulationConfig, params: dict[str, np.ndarray]) -> float:
    """The norm the attacker sends: `attack-boost` x the largest change the run accepts (or
    an honest device's bound, `user_sensitivity`, where the run bounds nothing)."""
    bound = config.update_norm_bound(sum(v.size for v in params.values()))
    # a hair inside the bound: the server measures the change in float32 parameters
    return (
        config.attack_boost * (1 - 1e-4) * (bound if bound is not None else config.user_sensitivity)
    )


def malicious_reply(
    config: SimulationConfig,
    user: int,
    round: int,
    params: dict[str, np.ndarray],
    honest: DeviceReply | None = None,
) -> DeviceReply:
    """What malicious device `user` sends in round `round` under `config.attack`. The kinds
    that distort an honest update ("scale", "sign-flip") take the device's `honest` reply."""
    kind = config.attack
    if kind == "promote":
        return _reply(user, _promote(config, params))
    if kind == "random":
        rng = np.random.default_rng([config.seed, user, round])
        direction = {n: rng.standard_normal(v.shape) for n, v in params.items()}
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in direction.values()))
        scale = attack_budget(config, params) / norm
        return _reply(user, {n: v + scale * direction[n] for n, v in params.items()})
    if kind in ("scale", "sign-flip"):
        if honest is None or honest.params is None:
            return _reply(user, dict(params))  # nothing to distort: its change is zero
        factor = SCALE_FACTOR if kind == "scale" else -1.0
        moved = {n: v + factor * (honest.params[n] - v) for n, v in params.items()}
        return _reply(user, moved)
    if kind in ("nan", "inf"):
        poisoned = {n: v.copy() for n, v in params.items()}
        poisoned[ITEM_TABLE].flat[0] = np.nan if kind == "nan" else np.inf
        return _reply(user, poisoned)
    if kind == "shape":
        return _reply(user, {**params, ITEM_TABLE: params[ITEM_TABLE][:-1]})
    if kind == "malformed":
        bad = user % 3
        if bad == 0:
            return DeviceReply(user, list(params.values()), 1, {})  # type: ignore[arg-type]
        if bad == 1:
            return DeviceReply(user, dict(params), -1, {})
        return DeviceReply(user, dict(params), 1, {"loss": "low"})  # type: ignore[dict-item]
    raise ValueError(f"no malicious reply for attack {kind!r}")


def _reply(user: int, new: dict[str, np.ndarray]) -> DeviceReply:
    float32 = {n: np.asarray(v, dtype=np.float32) for n, v in new.items()}
    return DeviceReply(user, float32, 1, {})


def _promote(config: SimulationConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The targets' rows moved along the served-bias direction, the budget split evenly."""
    if ITEM_TABLE not in params:  # the item table is frozen: nothing to promote through
        return dict(params)
    model, _ = template_for(config)
    w = served_bias_weights(model)
    targets = run_targets(config)
    step = attack_budget(config, params) / np.sqrt(len(targets)) * w / np.linalg.norm(w)
    table = params[ITEM_TABLE].astype(np.float64)
    table[targets] += step
    return {**params, ITEM_TABLE: table}

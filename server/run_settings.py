"""Settings derived from the data and the DP mode, for every setting the user left out.

The built-in defaults of `SimulationConfig` fit one dataset; on another the same numbers can
make every round impossible to aggregate (K_min above the devices there are), a guarantee void
(δ not below 1/N) or training diverge (a server step sized for DP noise, without noise). So the
command line derives what it can from the dataset (devices, interactions) and the DP mode, and
never overrides a setting the user gave:

- devices per round K: all devices up to MAX_CLIENTS_PER_ROUND (a round costs time linear in
  K, and past that the noise share of the sum is already small);
- K_min (secure aggregation): SURVIVOR_SHARE of the expected sample, lowered if needed so a
  round is discarded with probability at most the preflight's bound (`preflight`);
- δ: kept while it is below 1/N of every guarantee's unit, else DELTA_PER_UNIT / N;
- a profile per DP mode (`MODE_PROFILES`): without DP noise the server takes FedAdam steps
  instead of the large plain step that DP's averaged noise needs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fedrec.common.data.stream import load_stream
from fedrec.common.run_config import SimulationConfig, format_dp
from fedrec.server.federated_run import MAX_DISCARD_PROBABILITY, tolerable_discard_probability
from fedrec.server.user_privacy import client_sample_rate, largest_min_survivors

MAX_CLIENTS_PER_ROUND = 2700
# K_min as a share of the expected sample: the sum's noise stays within 1/sqrt(0.87) = 1.07x
# of its calibration when everyone sampled answers, and 13% of the sample may fail or drop
SURVIVOR_SHARE = 0.87
DELTA_PER_UNIT = 0.1  # δ = 0.1/N when the given δ is not below 1/N

# Per DP mode, the settings that differ from the DP defaults (a key the user gave wins).
MODE_PROFILES: dict[str, dict[str, Any]] = {
    # no noise to average away: adaptive server steps, not the 15x plain step
    "off": {"server_optimizer": "fedadam", "server_lr": 0.02},
    # a device's own noise drowns per-item parameters at ε ≈ 8: train the content popularity
    # and the year table only, with small server steps (simulations/local_dp.toml)
    "local": {
        "server_lr": 0.3,
        "model": {"text_bias": True, "train_only": "text_bias.weight,year_table.weight"},
    },
}


@dataclasses.dataclass(frozen=True)
class Derived:
    config: SimulationConfig
    reasons: dict[str, str]  # setting -> why it has its value (only the derived ones)


def derive_settings(config: SimulationConfig, given: frozenset[str]) -> Derived:
    """`config` with every setting not in `given` (kebab- or snake-case names) derived from its
    data and DP mode; the reasons say what each derived value rests on."""
    given = frozenset(name.replace("-", "_") for name in given)
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    devices, interactions = len(stream.clients()), len(stream.rows)
    changes: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    mode = format_dp(config.dp)
    for name, value in MODE_PROFILES.get(mode, {}).items():
        if name == "model":
            model_values = {k: v for k, v in value.items() if f"model_{k}" not in given}
            if model_values:
                changes["model"] = dataclasses.replace(config.model, **model_values)
                reasons["model"] = f"the --dp {mode} profile: {model_values}"
        elif name not in given:
            changes[name] = value
            reasons[name] = f"the --dp {mode} profile"

    if "clients_per_round" not in given:
        k = min(devices, MAX_CLIENTS_PER_ROUND)
        changes["clients_per_round"] = k
        reasons["clients_per_round"] = (
            f"all {devices:,} devices" if k == devices
            else f"{k:,} of {devices:,} devices: a round's time grows with it"
        )  # fmt: skip
    k = changes.get("clients_per_round", config.clients_per_round)

    if "delta" not in given and config.dp:
        units = max(devices if "user" in config.dp else 0, interactions)
        if config.delta >= 1 / units:
            changes["delta"] = DELTA_PER_UNIT / units
            reasons["delta"] = f"{DELTA_PER_UNIT:g}/N for the {units:,} units of this dataset"
    delta = changes.get("delta", config.delta)

    if "min_survivors" not in given and config.secure_aggregation:
        rate = client_sample_rate(expected_clients=min(k, devices), registered_clients=devices)
        expected = rate * devices
        bound = MAX_DISCARD_PROBABILITY
        if "user" in config.dp:
            bound = tolerable_discard_probability(dataclasses.replace(config, delta=delta))
        reachable = largest_min_survivors(
            registered_clients=devices, sample_rate=rate, max_discard_probability=bound
        )
        k_min = max(1, min(reachable, math.floor(SURVIVOR_SHARE * expected)))
        changes["min_survivors"] = k_min
        reasons["min_survivors"] = (
            f"{SURVIVOR_SHARE:.0%} of the {expected:,.0f} devices expected per round"
            if k_min == math.floor(SURVIVOR_SHARE * expected)
            else f"the most that {expected:,.0f} expected devices reach but with probability "
            f"below {bound:.2g} per round"
        )
    return Derived(dataclasses.replace(config, **changes), reasons)

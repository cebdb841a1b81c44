"""The settings of a deployed run that are about transport, not learning, parsed in one place.

They travel in Flower's run_config beside the run's settings (`SimulationConfig`) and are split
off here, so nothing else sees them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DeploymentSettings:
    deployment: bool = False  # a run over real SuperNodes (each one device)
    min_nodes: int = 2  # devices connected before a round starts
    wait_nodes_s: float = 600.0  # give up when fewer connect in this time
    # A round waits this long for replies; a device that does not answer in time (killed,
    # offline) is counted as failed and the round completes with the others.
    round_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.min_nodes < 1 or self.wait_nodes_s <= 0 or self.round_timeout_s <= 0:
            raise ValueError("min-nodes >= 1, wait-nodes-s > 0 and round-timeout-s > 0")


KEYS = frozenset(f.name.replace("_", "-") for f in fields(DeploymentSettings))


def split_run_config(flat: dict[str, Any]) -> tuple[DeploymentSettings, dict[str, Any]]:
    """(transport settings, the run's own settings) from one flat run_config."""
    defaults = DeploymentSettings()
    values, rest = {}, {}
    for key, raw in flat.items():
        name = str(key).replace("_", "-")
        if name in KEYS:
            attr = name.replace("-", "_")
            current = getattr(defaults, attr)
            if isinstance(current, bool):
                values[attr] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true")
            else:
                values[attr] = type(current)(raw)
        else:
            rest[key] = raw
    return DeploymentSettings(**values), rest


def shorten_flower_backoff(initial: float = 0.05, cap: float = 0.5) -> None:
    """Flower 1.42 lists a message before its contents have arrived, and a reader that comes
    early retries after 1 s, then 2 s (PULL_INITIAL_BACKOFF): measured 3 s of a warm device's
    message. Start the backoff at `initial` instead (in this process)."""
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__["initial_backoff"] = initial
        fn.__kwdefaults__["backoff_cap"] = cap

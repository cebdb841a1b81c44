"""The two evaluation protocols, in one place so that every command splits data the same way."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.common.data.schema import Interactions
from fedrec.common.data.splits import (
    Split,
    filter_min_interactions,
    global_temporal_split,
    leave_last_out,
)

PROTOCOLS = {
    "loo": "per-user time-ordered leave-last-out (last = test, one before = validation)",
    "temporal": "global temporal split: train before T (90% time quantile), test = first after T",
}


@dataclass(frozen=True)
class ProtocolConfig:
    name: str = "loo"
    # (a) is reported on users with >= 5 interactions, as in papers; (b) keeps every user with
    # at least one training interaction (the split itself enforces that).
    min_user_interactions: int | None = None  # None = the protocol's default above
    temporal_quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(
                f"unknown protocol {self.name!r}; choose one of {', '.join(PROTOCOLS)}"
            )

    @property
    def min_user(self) -> int:
        if self.min_user_interactions is not None:
            return self.min_user_interactions
        return 5 if self.name == "loo" else 1


def make_split(interactions: Interactions, protocol: ProtocolConfig) -> Split:
    kept = filter_min_interactions(interactions, min_user=protocol.min_user)
    if protocol.name == "loo":
        return leave_last_out(kept)
    return global_temporal_split(kept, quantile=protocol.temporal_quantile)

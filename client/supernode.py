"""`flower-supernode` with shorter waits: `python -m fedrec.client.supernode ARGS...` takes the
same arguments as `flower-supernode`.

Flower 1.42's SuperNode asks the SuperLink for a new message every 3 s when idle and checks
for its ClientApp's reply every 0.5 s (`time.sleep` in
`flwr.supernode.start_client_internal`); with one message per round that is up to 3.5 s of
waiting per message. Here those sleeps are capped at FEDREC_SUPERNODE_POLL_S (default 0.25 s):
a few small HTTPS requests per second per device, against a SuperLink that serves thousands.
The backoff of object pulls starts at 50 ms instead of 1 s (`shorten_flower_backoff`).

Heartbeats: the SuperNode declares a 30 s heartbeat interval, and the SuperLink answers a
message to a node that missed 2 intervals with a NODE_UNAVAILABLE error reply; so a device
killed mid-round was noticed only at the round's timeout. Here the interval is
FEDREC_HEARTBEAT_S (default 10 s, the least the SuperLink accepts): a killed device's round
ends for it within ~20 s, with Flower's "Node Unavailable" error as the reason.

Reconnection: while the SuperLink is down (a server restart), Flower's SuperNode retries with
exponential backoff of up to 20 s, so a device could come back up to 20 s after the
SuperLink did, while its heartbeat thread (reconnecting on its own schedule) already had it
counted online. Here the backoff is capped at FEDREC_RETRY_MAX_S (default 2 s).
"""

from __future__ import annotations

import os
import time

HEARTBEAT_MIN_S = 10.0  # flwr.common.constant.HEARTBEAT_MIN_INTERVAL: the SuperLink refuses less


class _CappedSleep:
    """The `time` module as start_client_internal sees it, with sleeps capped."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def heartbeat_interval() -> float:
    value = float(os.environ.get("FEDREC_HEARTBEAT_S", "10"))
    if value < HEARTBEAT_MIN_S:
        raise ValueError(f"FEDREC_HEARTBEAT_S must be >= {HEARTBEAT_MIN_S:g} s, got {value:g}")
    return value


def shorten_heartbeat(interval: float) -> None:
    """The interval the SuperNode declares (fleet_http_connection) and the period its
    heartbeat thread derives from it (supercore.heartbeat): both read the module global."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = interval
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval


def cap_retry_backoff(max_delay: float) -> None:
    """The most Flower's connection retries wait between attempts (module globals read each
    time a retry invoker is made, i.e. at connection)."""
    from flwr.supercore.retry import grpc_retry, http_retry

    http_retry.MAX_RETRY_DELAY = max_delay
    grpc_retry.MAX_RETRY_DELAY = max_delay


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedrec.common.deployment import shorten_flower_backoff

    cap = float(os.environ.get("FEDREC_SUPERNODE_POLL_S", "0.25"))
    start_client_internal.time = _CappedSleep(cap)
    shorten_flower_backoff()
    shorten_heartbeat(heartbeat_interval())
    cap_retry_backoff(float(os.environ.get("FEDREC_RETRY_MAX_S", "2")))
    flower_supernode()


if __name__ == "__main__":
    main()

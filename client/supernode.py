"""`flower-supernode` with a shorter idle poll: `python -m fedrec.client.supernode ARGS...`
takes the same arguments as `flower-supernode`.

Flower 1.42's SuperNode asks the SuperLink for a new message every 3 s when idle and checks
for its ClientApp's reply every 0.5 s (`time.sleep` in
`flwr.supernode.start_client_internal`); with one message per round that is up to 3.5 s of
waiting per message. Here those sleeps are capped at FEDREC_SUPERNODE_POLL_S (default 0.25 s):
a few small HTTPS requests per second per device, against a SuperLink that serves thousands.
The backoff of object pulls starts at 50 ms instead of 1 s (`shorten_flower_backoff`).
"""

from __future__ import annotations

import os
import time


class _CappedSleep:
    """The `time` module as start_client_internal sees it, with sleeps capped."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedrec.common.deployment import shorten_flower_backoff

    cap = float(os.environ.get("FEDREC_SUPERNODE_POLL_S", "0.25"))
    start_client_internal.time = _CappedSleep(cap)
    shorten_flower_backoff()
    flower_supernode()


if __name__ == "__main__":
    main()

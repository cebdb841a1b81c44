"""`flower-supernode` with shorter waits: `python -m fedrec.client.supernode ARGS...` takes the
same arguments as `flower-supernode`.

Flower 1.42's SuperNode asks the SuperLink for a new message every 3 s when idle and checks
for its ClientApp's reply every 0.5 s (`time.sleep` in
`flwr.supernode.start_client_internal`); with one message per round that is up to 3.5 s of
waiting per message. Here the idle poll (a request to the SuperLink) is capped at
FEDREC_SUPERNODE_POLL_S (default 0.25 s): a few small HTTPS requests per second per device,
against a SuperLink that serves thousands. The waits for the ClientApp's reply and for its
contents only read the SuperNode's own state, no network: they are capped at
FEDREC_SUPERNODE_LOCAL_POLL_S (default 0.02 s): a reply left waiting half of a 0.25 s
interval would be a large share of a warm message
(benchmarks/results/deployment-transport-before-after.json).
For FEDREC_SUPERNODE_FAST_WINDOW_S (1 s) after each reply it sent, when the next round's
message usually comes, the SuperNode polls every FEDREC_SUPERNODE_FAST_POLL_S (0.1 s)
(`PollPacer`). When a message has arrived it wakes the warm executor at once
(`wake_executor_on_message`) instead of leaving it to the executor's next poll.
The backoff of object pulls starts at 50 ms instead of 1 s (`shorten_pull_backoff`).

Heartbeats: the SuperNode declares a 30 s heartbeat interval, and the SuperLink answers a
message to a node that missed 2 intervals with a NODE_UNAVAILABLE error reply; so a device
killed mid-round was noticed only at the round's timeout. Here the interval is
FEDREC_HEARTBEAT_S (default 10 s, the least the SuperLink accepts): a killed device's round
ends for it within ~20 s, with Flower's "Node Unavailable" error as the reason.

A device started with --insecure against a SuperLink that speaks TLS gives up at its first
refused request, naming TLS (`give_up_insecure_against_tls`), instead of retrying forever.

Reconnection: while the SuperLink is down (a server restart), Flower's SuperNode retries with
exponential backoff of up to 20 s, so a device could come back up to 20 s after the
SuperLink did, while its heartbeat thread (reconnecting on its own schedule) already had it
counted online. Here the backoff is capped at FEDREC_RETRY_MAX_S (default 2 s).

Every change to Flower itself is made through `fedrec.common.flower_patches`, which makes none
on a Flower version they were not verified on (the SuperNode is then stock Flower's).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from fedrec.common import flower_patches

HEARTBEAT_MIN_S = 10.0  # flwr.common.constant.HEARTBEAT_MIN_INTERVAL: the SuperLink refuses less


class PollPacer:
    """The `time` module as start_client_internal sees it, with its sleeps shortened. Flower
    1.42's loop sleeps 3 s after an empty pull from the SuperLink (network) and 0.5 s while
    waiting for its own state (a reply, an object's contents): a request of 1 s or more is
    the network poll. The network poll runs every `fast` seconds for `window` seconds after
    this device sent a reply (the next round's message usually follows within a fraction of a
    second), every `slow` seconds otherwise; local waits every `local` seconds."""

    def __init__(self, slow: float, local: float, fast: float, window: float):
        self.slow, self.local, self.fast, self.window = slow, local, fast, window
        self.replied_at = -math.inf

    def __getattr__(self, name: str):
        return getattr(time, name)

    def network_interval(self) -> float:
        active = time.monotonic() - self.replied_at < self.window
        return min(self.fast, self.slow) if active else self.slow

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.network_interval() if seconds >= 1 else self.local))

    def track_replies(self) -> None:
        """Note when the loop has sent a reply."""
        flower_patches.after_each_reply(self._note_reply)

    def _note_reply(self) -> None:
        self.replied_at = time.monotonic()


def seconds_from_env(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A duration from the environment, with an error that names the variable."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds >= {minimum:g}, got {raw!r}")
    return value


def supernode_settings() -> dict[str, float]:
    """Every FEDREC_* setting of the SuperNode, validated before anything starts."""
    return {
        "poll": seconds_from_env("FEDREC_SUPERNODE_POLL_S", 0.25, minimum=0.01),
        "local_poll": seconds_from_env("FEDREC_SUPERNODE_LOCAL_POLL_S", 0.02, minimum=0.001),
        "fast_poll": seconds_from_env("FEDREC_SUPERNODE_FAST_POLL_S", 0.1, minimum=0.01),
        "fast_window": seconds_from_env("FEDREC_SUPERNODE_FAST_WINDOW_S", 1.0),
        "heartbeat": seconds_from_env("FEDREC_HEARTBEAT_S", 10.0, minimum=HEARTBEAT_MIN_S),
        "retry_max": seconds_from_env("FEDREC_RETRY_MAX_S", 2.0, minimum=0.1),
        # read by the warm executor (fedrec.client.warm_exec) through Flower's own loop
        "executor_poll": seconds_from_env("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", 1.0, minimum=0.01),
    }


class InsecureAgainstTLS(ConnectionError):
    """The device speaks plain HTTP (--insecure) to a SuperLink that speaks TLS."""


def insecure_against_tls_message(address: str) -> str:
    return (
        f"the SuperLink at {address} speaks TLS, but this device was started with --insecure "
        "(plain HTTP), which it can never accept: start the device without --insecure, with "
        "--root-certificates (the deployment's ca.pem) and --key (this device's key)"
    )


def speaks_tls(address: str, timeout: float = 5.0) -> bool:
    """Whether HOST:PORT completes a TLS handshake (the certificate is not checked: this only
    tells which protocol the server speaks)."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            context.wrap_socket(sock),
        ):
            return True
    except (OSError, ValueError):  # refused, unreachable, not TLS (ssl.SSLError), bad address
        return False


def give_up_insecure_against_tls(address: str) -> None:
    """Flower's SuperNode retries a refused request forever, and a TLS SuperLink refuses every
    plain-HTTP one by closing (or resetting) the connection: a device started
    with --insecure against it would retry forever, with nothing naming TLS. Here the first such
    refusal probes the server with a TLS handshake; if it speaks TLS the connection gives up
    with `InsecureAgainstTLS` (Flower then exits naming it). A plain server that drops a
    connection, or one that is down, is still retried."""
    import httpx

    # how a server that drops a plain-HTTP connection looks: closed without an answer, or reset
    dropped = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

    def check(exc: Exception) -> None:
        if isinstance(exc, dropped) and speaks_tls(address):
            raise InsecureAgainstTLS(insecure_against_tls_message(address)) from exc

    flower_patches.check_failed_requests(check)


EXECUTOR_PIDFILE_ENV = "FEDREC_EXECUTOR_PIDFILE"
SUPERVISOR_PID_ENV = "FEDREC_SUPERVISOR_PID"


def stop_with_supervisor(pid: int, poll: float = 0.5) -> None:
    """End this SuperNode (SIGTERM: Flower's graceful exit) once `fedrec client start`, which
    started it, is gone. Killed outright (an OOM killer, `kill -9`), the supervisor cannot
    stop its children, and the SuperNode would stay connected as an orphan, holding the
    device's key and port while a restarted device starts a second one. A child
    whose parent dies is adopted by another process, so a changed parent PID is the sign,
    also while the dead supervisor is an unreaped zombie. On Linux the kernel also signals
    it at once (`fedrec client start` sets PR_SET_PDEATHSIG); this watch covers macOS."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def is_warm_executor(pid: int) -> bool:
    """Whether `pid` is a running fedrec warm executor (a PID reused by another process after
    the executor died must never get a signal whose default action ends it). Its command
    line through psutil, on Linux and macOS alike."""
    import psutil

    try:
        return any("fedrec.client.warm_exec" in arg for arg in psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):  # gone, a zombie, or another user's
        return False


def wake_executor_on_message(pidfile: Path, is_executor=is_warm_executor) -> None:
    """After the SuperNode has stored a new message, wake the warm executor (SIGUSR1; see
    fedrec.client.warm_exec) instead of leaving the message until its next poll, half an
    interval on average, the largest wait of a warm message after its transport
    (benchmarks/results/deployment-wake-before-after.json). The executor's PID is read from
    `pidfile`, which the executor writes once it can be woken (`fedrec client start` names
    the file to both); without it the executor's own poll still finds the message."""
    import signal

    pid: list[int] = []

    def wake() -> None:
        try:
            pid[:] = pid or [int(pidfile.read_text())]
            if is_executor(pid[0]):
                os.kill(pid[0], signal.SIGUSR1)
            else:
                pid.clear()
        except (OSError, ValueError):
            pid.clear()  # not there (yet): its poll finds the message

    flower_patches.after_each_message(wake)


def main() -> None:
    if os.environ.get(SUPERVISOR_PID_ENV):  # before the imports: they take seconds
        stop_with_supervisor(int(os.environ[SUPERVISOR_PID_ENV]))
    settings = supernode_settings()
    pacer = PollPacer(
        settings["poll"], settings["local_poll"], settings["fast_poll"], settings["fast_window"]
    )
    pacer.track_replies()
    flower_patches.set_supernode_clock(pacer)
    flower_patches.shorten_pull_backoff()
    flower_patches.set_heartbeat_interval(settings["heartbeat"])
    flower_patches.cap_retry_backoff(settings["retry_max"])
    flower_patches.retry_transient_errors_of_supernode()
    if os.environ.get(EXECUTOR_PIDFILE_ENV):
        wake_executor_on_message(Path(os.environ[EXECUTOR_PIDFILE_ENV]))
    args = sys.argv[1:]
    if "--insecure" in args and "--superlink" in args[:-1]:
        give_up_insecure_against_tls(args[args.index("--superlink") + 1])
    flower_patches.run_supernode()


if __name__ == "__main__":
    main()

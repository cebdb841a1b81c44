"""Every change fedrec makes to Flower's internals, in one place, with the Flower versions it
was verified on.

A deployed round spends most of its time in Flower's transport, and Flower's defaults suit
long-running jobs, not a message per device per round: the SuperNode polls every 3 s, object
pulls back off for 1 s, every message starts a fresh Python process. fedrec shortens those
waits by reaching into modules Flower does not publish, whose names, defaults and behaviour
change between releases without notice. Each function here makes one such change, and is
the only place that makes it.

On a Flower version outside VERIFIED nothing is changed: the first patch asked for logs one
warning, every patch returns False, and the deployment runs on stock Flower (slower rounds,
the same results). Moving to a newer Flower: check each patch against its source, then add
its release to VERIFIED; nothing else in fedrec reaches into Flower's internals.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

# (major, minor) releases of Flower the patches were checked against, every patch release
VERIFIED = frozenset({(1, 42)})

log = logging.getLogger(__name__)
_warned = False


def flower_version() -> str:
    return version("flwr")


def is_verified(release: str) -> bool:
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in VERIFIED


def patches_apply() -> bool:
    """Whether the installed Flower is one the patches were verified on. The first time it
    is not, one warning says so; the callers then leave Flower as it is."""
    global _warned
    installed = flower_version()
    if is_verified(installed):
        return True
    if not _warned:
        _warned = True
        verified = ", ".join(f"{major}.{minor}.x" for major, minor in sorted(VERIFIED))
        log.warning(
            "Flower %s: fedrec's speed-ups to Flower's internals are verified on %s only, so "
            "none is applied (stock Flower: slower deployed rounds, the same results)",
            installed,
            verified,
        )
    return False


# --- object transfer (ServerApp, SuperNode, ClientApp) -------------------------------------


def shorten_pull_backoff(initial: float = 0.05, cap: float = 0.5) -> bool:
    """Flower 1.42 lists a message before its contents have arrived, and a reader that comes
    early retries after 1 s, then 2 s (PULL_INITIAL_BACKOFF): seconds added to a message that
    takes a fraction of one. Start the backoff at `initial` instead (in this process)."""
    if not patches_apply():
        return False
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__["initial_backoff"] = initial
        fn.__kwdefaults__["backoff_cap"] = cap
    return True


# --- transient SuperLink failures (ServerApp, SuperNode) ------------------------------------

# How a TLS connection closed by the peer mid-request reads in Python's ssl module: a
# keep-alive connection the SuperLink dropped while a request was on its way.
_DROPPED_TLS = ("unexpected_eof_while_reading", "eof occurred in violation of protocol")
# A peer that keeps failing (a SuperLink on its way down, a bug answering 500 every time) is
# given up on after this many such failures within TRANSIENT_WINDOW_S.
TRANSIENT_RETRIES = 20
TRANSIENT_WINDOW_S = 600.0


def _is_transient(exc: Exception) -> bool:
    """A dropped TLS connection, or an HTTP 500: the SuperLink answers 500 when its SQLite
    state was locked by another request (`database is locked`, its log says; the client
    sees only "internal server error"), and the failed request's transaction was rolled back,
    so sending it again is safe."""
    if any(marker in str(exc).lower() for marker in _DROPPED_TLS):
        return True
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) == 500


def retry_transient_errors(invoker: Any) -> Any:
    """Flower 1.42 gives up at once on an HTTP 500 and on any transport error whose text
    names SSL or TLS (meaning a failed handshake: a wrong certificate will not fix itself).
    Two transient failures read the same way: a keep-alive connection the SuperLink closes
    as a request goes out (`[SSL: UNEXPECTED_EOF_WHILE_READING]`), and a 500 when its
    SQLite state was locked under load. The first killed a ServerApp between two SecAgg+
    stages, and the run with it; the second made a SuperNode drop a device's reply, and
    its round wait out the timeout. Retry both (a new connection, Flower's backoff), up to
    TRANSIENT_RETRIES within TRANSIENT_WINDOW_S; every other error is decided as Flower
    decides it."""
    import time

    giveup = invoker.should_giveup
    failures: list[float] = []

    def should_giveup(exc: Exception) -> bool:
        if _is_transient(exc):
            now = time.monotonic()
            failures[:] = [t for t in failures if now - t < TRANSIENT_WINDOW_S] + [now]
            if len(failures) <= TRANSIENT_RETRIES:
                log.debug("transient SuperLink failure (%s); retrying", exc)
                return False
        return giveup is not None and giveup(exc)

    invoker.should_giveup = should_giveup
    return invoker


def retry_transient_errors_of_grid(grid: Any) -> bool:
    """`retry_transient_errors` for the ServerApp's grid, made before fedrec's code runs
    (the same invoker object serves its connection)."""
    if not patches_apply():
        return False
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is None:  # an in-memory grid (simulation): no connection to drop
        return False
    retry_transient_errors(invoker)
    return True


def retry_transient_errors_of_supernode() -> bool:
    """`retry_transient_errors` for the SuperNode's connections made from now on in this
    process."""
    if not patches_apply():
        return False
    from flwr.supernode import fleet_http_connection as fleet

    make = fleet.make_simple_http_retry_invoker
    fleet.make_simple_http_retry_invoker = lambda: retry_transient_errors(make())
    return True


# --- the SuperNode (fedrec.client.supernode) ------------------------------------------------


def set_supernode_clock(clock: Any) -> bool:
    """Replace the `time` module that the SuperNode's loop (`flwr.supernode.
    start_client_internal`) sleeps with: Flower 1.42 sleeps 3 s after an empty pull and 0.5 s
    while waiting for its own state; `clock` (fedrec.client.supernode.PollPacer) decides."""
    if not patches_apply():
        return False
    from flwr.supernode import start_client_internal

    start_client_internal.time = clock
    return True


def after_each_reply(callback: Callable[[], None]) -> bool:
    """Call `callback` each time the SuperNode's loop has sent (or tried to send) replies."""
    if not patches_apply():
        return False
    from flwr.supernode import start_client_internal as loop

    push = loop._push_messages

    def push_then_note(*args, **kwargs):
        try:
            return push(*args, **kwargs)
        finally:
            callback()

    loop._push_messages = push_then_note
    return True


def after_each_message(callback: Callable[[], None]) -> bool:
    """Call `callback` each time the SuperNode's loop has pulled and stored a new message."""
    if not patches_apply():
        return False
    from flwr.supernode import start_client_internal as loop

    pull = loop._pull_and_store_message

    def pull_then_note(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            callback()
        return run_id

    loop._pull_and_store_message = pull_then_note
    return True


def set_heartbeat_interval(interval: float) -> bool:
    """The interval the SuperNode declares (fleet_http_connection) and the period its
    heartbeat thread derives from it (supercore.heartbeat): both read the module global."""
    if not patches_apply():
        return False
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = interval
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval
    return True


def cap_retry_backoff(max_delay: float) -> bool:
    """The most Flower's connection retries wait between attempts (module globals read each
    time a retry invoker is made, i.e. at connection)."""
    if not patches_apply():
        return False
    from flwr.supercore.retry import grpc_retry, http_retry

    http_retry.MAX_RETRY_DELAY = max_delay
    grpc_retry.MAX_RETRY_DELAY = max_delay
    return True


def check_failed_requests(check: Callable[[Exception], None]) -> bool:
    """Show `check` every failed request of the SuperNode's connection to the SuperLink
    before Flower decides whether to retry it; an exception `check` raises ends the
    connection (Flower's SuperNode then exits naming it). Flower retries some failures
    forever."""
    if not patches_apply():
        return False
    from flwr.supernode import fleet_http_connection as fleet

    make = fleet.make_simple_http_retry_invoker

    def make_checked():
        invoker = make()
        giveup = invoker.should_giveup

        def should_giveup(exc: Exception) -> bool:
            check(exc)
            return giveup is not None and giveup(exc)

        invoker.should_giveup = should_giveup
        return invoker

    fleet.make_simple_http_retry_invoker = make_checked
    return True


def run_supernode() -> None:
    """Flower's own `flower-supernode` command in this process (the console script's entry
    point, reading sys.argv), with whatever patches were made before."""
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


# --- the warm executor (fedrec.client.warm_exec) --------------------------------------------


def watch_parent(pid: int) -> None:
    """Exit this process when process `pid` is gone (Flower's own parent monitor)."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(pid)


def subprocess_executor() -> Any:
    """Flower's own executor: each task in a new process."""
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    return SubprocessExecutor()


def is_clientapp_task(spec: Any) -> bool:
    from flwr.supercore.constant import TaskType

    return spec.task_type == TaskType.CLIENT_APP


def launch_accepted() -> Any:
    """What an executor's `launch` returns for a task it has started."""
    from flwr.supercore.superexec.executor.types import LaunchResult

    return LaunchResult.accepted()


def run_clientapp_task(spec: Any) -> None:
    """Run one ClientApp task in this process: what `flwr-clientapp` runs in a new one."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def serve_tasks(
    executor: Any, clock: Any, runtime_api_address: str, parent_pid: int | None
) -> None:
    """Flower's SuperExec loop (poll the SuperNode's Runtime API for a task, launch it) with
    `executor` (fedrec.client.warm_exec.ForkExecutor) instead of Flower's, and `clock` as the
    `time` module its polls sleep with; Flower's own `flower-superexec` where the patches do
    not apply."""
    if not patches_apply():
        exec_stock_executor(runtime_api_address, parent_pid)
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *a, **k: executor
    superexec.time = clock
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on loopback only
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def exec_stock_executor(runtime_api_address: str, parent_pid: int | None) -> None:
    """Become Flower's own `flower-superexec` (this process is replaced): where the warm
    executor's patches do not apply."""
    here = str(Path(sys.executable).parent)
    exe = shutil.which("flower-superexec", path=here) or shutil.which("flower-superexec")
    if exe is None:
        raise FileNotFoundError("flower-superexec is not installed")
    args = [exe, "--runtime-api-address", runtime_api_address, "--insecure"]
    args += ["--disable-runtime-dependency-installation"]
    if parent_pid is not None:
        args += ["--parent-pid", str(parent_pid)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(exe, args)

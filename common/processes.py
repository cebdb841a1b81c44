"""The processes a run starts stop with it, however it ends (Linux and macOS, through psutil).

A launcher (`fedrec simulate`, `fedrec server start`) gives every process it starts two
environment variables: FEDREC_RUN_TOKEN (one launch) and FEDREC_RUN_DIR (its run folder).
Flower and Ray pass their environment on to what they start (flower-superexec,
flwr-simulation, flwr-serverapp, Ray's raylet, agents and workers), so the run's processes are
found by token whatever their parent, process group or session: flower-superexec starts a
session of its own and Ray's agents ignore SIGTERM, so neither a process group nor a tree
walk from the SuperLink reaches all of them.

- SIGTERM and SIGINT of the launcher raise `Interrupted` in it (`interruptible`): its
  `finally` stops the run's processes at once and the command reports where it stopped.
- SIGKILL cannot be caught: a watchdog (`python -m fedrec.common.processes TOKEN`, in its own
  session) reads a pipe whose write end only the launcher holds. The pipe's end of file (the
  launcher exited, by any cause) makes it stop the run's processes. It shares the launcher's
  run lock (`fedrec.common.run_lock`), so the folder stays locked until they are gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

RUN_TOKEN_ENV = "FEDREC_RUN_TOKEN"
RUN_DIR_ENV = "FEDREC_RUN_DIR"
CLEAN_STOP = b"clean stop\n"  # what a launcher writes its watchdog before closing the pipe
WATCHDOG_GRACE_S = 5.0  # SIGTERM first: a deployment's SuperLink closes its database


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the launcher (a BaseException, like KeyboardInterrupt, so
    that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into `Interrupted`; later ones are ignored, so the
    cleanup they trigger is not itself interrupted (SIGKILL still ends it: the watchdog)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: object) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_env(env: dict[str, str], folder: Path, token: str) -> dict[str, str]:
    return env | {RUN_TOKEN_ENV: token, RUN_DIR_ENV: str(folder)}


def environ_of(process: psutil.Process) -> dict[str, str]:
    """A process's environment. On Linux, the whole of /proc/PID/environ: a process that
    renames itself (setproctitle, as Ray's dashboard and runtime-env agents do) zeroes the
    start of that block, and psutil's parser stops at the first empty entry, so it saw no
    environment at all, and the run's Ray agents would outlive every stop of it, the
    watchdog's included. A launcher's variables come last in the block, past the
    zeroed part. Elsewhere (macOS), psutil's reading."""
    try:
        data = Path(f"/proc/{process.pid}/environ").read_bytes()
    except OSError:  # no procfs (psutil says why: gone, denied, unsupported)
        return process.environ()
    found: dict[str, str] = {}
    for entry in data.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            found.setdefault(key.decode(errors="replace"), value.decode(errors="replace"))
    return found


def processes_with(name: str, value: str) -> list[psutil.Process]:
    """Live processes of this user whose environment has name=value (never this one)."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if environ_of(process).get(name) == value and _alive(process):
                found.append(process)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    return found


def stop_run_processes(token: str, grace: float, settle: float = 0.0) -> int:
    """SIGTERM every process of the launch `token` and every descendant of one, SIGKILL those
    alive after `grace` seconds, and again for any found later, until `settle` seconds of
    looking find none (the watchdog looks on, in the background; a launcher stopping on
    SIGINT stops at the first empty look); returns how many were signalled.

    Descendants count because a token is not always readable: a Ray agent that is starting
    (its environment block rewritten by setproctitle) can hide it from several sweeps and
    then outlive its run; its parent, the raylet, shows it."""
    signalled = 0
    quiet_since: float | None = None
    deadline = time.monotonic() + 10 * (grace + settle) + 5
    while time.monotonic() < deadline:
        processes = _with_descendants(processes_with(RUN_TOKEN_ENV, token))
        if not processes:
            now = time.monotonic()
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= settle:
                break
            time.sleep(0.2)
            continue
        quiet_since = None
        signalled += len(processes)
        for process in processes:
            try:
                process.terminate()
            except psutil.Error:
                pass
        for process in _wait_gone(processes, grace):
            try:
                process.kill()
            except psutil.Error:
                pass
    return signalled


def _with_descendants(processes: list[psutil.Process]) -> list[psutil.Process]:
    """`processes` and every live descendant of one (never this process), each once: one
    look at the process table (psutil's `children` looks at all of it for every process)."""
    found = {p.pid: p for p in processes}
    if not found:
        return []
    children: dict[int, list[psutil.Process]] = {}
    for process in psutil.process_iter(["ppid"]):
        children.setdefault(process.info["ppid"], []).append(process)
    queue = list(found)
    while queue:
        for child in children.get(queue.pop(), []):
            if child.pid not in found and child.pid != os.getpid() and _alive(child):
                found[child.pid] = child
                queue.append(child.pid)
    return list(found.values())


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # raises when gone
    except psutil.Error:
        return False


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those still alive after `timeout` seconds. A zombie counts as gone: an orphan is
    reaped by whoever adopted it, if at all, not by us (psutil.wait_procs waits for that)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


class Watchdog:
    """Stops the launch's processes when this process ends, even by SIGKILL."""

    def __init__(self, token: str, lock_fd: int | None = None, grace: float = WATCHDOG_GRACE_S):
        fds = () if lock_fd is None else (lock_fd,)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fedrec.common.processes", token, str(grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is not for it
            pass_fds=fds,
            env={k: v for k, v in os.environ.items() if k != RUN_TOKEN_ENV},
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self, timeout: float = 10.0) -> None:
        """After a clean stop: let it make its last sweep and exit."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.write(CLEAN_STOP)
                self._proc.stdin.flush()
            except OSError:
                pass  # it is gone already
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def watch(token: str, grace: float) -> None:
    """The watchdog: block until the launcher's end of the pipe closes, then stop its run."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    last = b""
    while chunk := sys.stdin.buffer.read(4096):
        last = (last + chunk)[-len(CLEAN_STOP) :]
    # After a launcher's death, processes starting as it died may still appear: look on a
    # while. After a clean stop the launcher has swept already, and waits for this one.
    stop_run_processes(token, grace, settle=0.0 if last == CLEAN_STOP else 2.0)


if __name__ == "__main__":
    watch(sys.argv[1], float(sys.argv[2]))


@contextmanager
def watched_run(folder: Path, command: str, lock=None) -> Iterator:
    """The run folder's lock (taken here unless the caller holds one; `RunLocked` if another
    process does) and a watchdog that stops the run's processes should this process die:
    what every launcher of a run holds while its processes live."""
    from fedrec.common.run_lock import RunLock

    own_lock = lock is None
    if lock is None:
        lock = RunLock.acquire(folder, command=command)
    try:
        watchdog = Watchdog(lock.token, lock.fileno())
        try:
            lock.record_watchdog(watchdog.pid)
            yield lock
        finally:
            watchdog.close()
    finally:
        if own_lock:
            lock.release()

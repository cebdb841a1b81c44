"""One writer per run folder: an OS lock on <run>/run.lock (Linux and macOS).

`fcntl.flock` locks an open file, and the kernel releases it when the last descriptor of that
open file is closed, so a killed holder never leaves it held. The launcher shares its
descriptor with its watchdog (`fedrec.common.processes`), so after the launcher is killed the
folder stays locked until the watchdog has stopped every process of the run. The file holds
the holder's PID (for the refusal message) and a token that names the launch: the ServerApp
Flower spawns checks that the lock is still held under its token before it writes.

The file is never removed: removing it would let one process lock the old file and another a
new one. A clean release empties it, so content found on acquiring names a holder that died
without releasing.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

LOCK_FILE = "run.lock"
# After its launcher is killed, a run's watchdog holds the lock while it stops the run's
# processes (a few seconds); a new writer waits that long rather than being refused.
CLEANUP_WAIT_S = 30.0


class RunLocked(RuntimeError):
    """The run folder is locked by another live process."""


class RunLockLost(RuntimeError):
    """A ServerApp's launcher no longer holds the lock of the folder it writes."""


@dataclass(frozen=True)
class Holder:
    pid: int
    token: str
    command: str = ""
    started: float = 0.0  # the holder's process creation time: PIDs are reused
    watchdog: int = 0  # PID of the watchdog sharing the lock

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return (
                process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - self.started) < 1.0
            )
        except psutil.Error:
            return False

    def describe(self) -> str:
        return f"process {self.pid}" + (f" ({self.command})" if self.command else "")


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when empty or unreadable."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _notify(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RunLock:
    """The exclusive lock of a run folder, held until `release` (or the holder's death)."""

    def __init__(self, path: Path, fd: int, holder: Holder):
        self.path, self._fd, self.holder = path, fd, holder

    @property
    def token(self) -> str:
        return self.holder.token

    def fileno(self) -> int:
        return self._fd

    @classmethod
    def acquire(
        cls,
        folder: Path,
        *,
        command: str,
        notify: Callable[[str], None] = _notify,
        cleanup_wait: float = CLEANUP_WAIT_S,
    ) -> RunLock:
        """Lock `folder` (created if missing) or raise RunLocked naming the live holder."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline, waiting = time.monotonic() + cleanup_wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(path)
                if holder is not None and holder.alive():
                    os.close(fd)
                    raise RunLocked(
                        f"{folder} is in use by {holder.describe()}: one run writes a folder at "
                        "a time; wait for it to finish or stop it"
                    ) from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    who = f"watchdog {holder.watchdog}" if holder and holder.watchdog else "?"
                    raise RunLocked(
                        f"{folder} is still locked ({who}) {cleanup_wait:.0f}s after its holder "
                        "ended"
                    ) from None
                if holder is not None and not waiting:
                    notify(
                        f"{folder}: {holder.describe()} is gone; waiting for the processes it "
                        "started to stop"
                    )
                    waiting = True
                time.sleep(0.1)
        previous = read_holder(path)
        if previous is not None:
            notify(
                f"{folder}: taking over the lock of {previous.describe()}, which ended without "
                "releasing it"
            )
        me = psutil.Process()
        lock = cls(path, fd, Holder(me.pid, secrets.token_hex(16), command, me.create_time()))
        lock._write()
        return lock

    def record_watchdog(self, pid: int) -> None:
        self.holder = Holder(**(asdict(self.holder) | {"watchdog": pid}))
        self._write()

    def _write(self) -> None:
        data = json.dumps(asdict(self.holder)).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data + b"\n", 0)

    def release(self) -> None:
        """Empty the file (a clean end) and close our descriptor."""
        if self._fd < 0:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_holder(folder: Path, token: str) -> None:
    """Raise RunLockLost unless `folder` is locked under `token`: the process that launched
    this run is alive (or its watchdog is still stopping it) and no other launch took over."""
    path = folder / LOCK_FILE
    holder = read_holder(path)
    if holder is None or holder.token != token:
        now = f"it is now held by {holder.describe()}" if holder else "it is not held"
        raise RunLockLost(f"{folder}: this run no longer holds the folder's lock ({now})")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # held, under our token
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    raise RunLockLost(f"{folder}: the process that launched this run ({holder.pid}) is gone")


class WriterGuard:
    """The ServerApp's side: it writes the run folder only while its launcher holds the lock
    (`token`, passed in run_config), or, started by plain `flwr run` (no token), while it
    holds the lock itself."""

    def __init__(self, folder: Path, token: str):
        self.folder, self.token = folder, token
        self._own = None if token else RunLock.acquire(folder, command="fedrec ServerApp")
        self.check()

    def check(self) -> None:
        """Before each round: raise RunLockLost if the launcher is gone or was replaced."""
        if self.token:
            check_holder(self.folder, self.token)

    def __enter__(self) -> WriterGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.release()

"""What every command that runs a federation does with its run folder: hold its lock for the
whole run (a second writer is refused with exit 2, naming the holder), and stop cleanly on
SIGINT or SIGTERM with a message saying where the run stopped (exit 128 + signal)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from fedrec.cli.options import fail
from fedrec.common.io import atomic_write
from fedrec.common.processes import Interrupted, interruptible
from fedrec.common.run_lock import RunLock, RunLocked


def completed_rounds(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@contextmanager
def hold_run_folder(out: Path, *, command: str, rounds: int, resume_hint: str) -> Iterator[RunLock]:
    with interruptible():
        lock = None
        try:
            try:
                lock = RunLock.acquire(out, command=command)
            except RunLocked as err:
                raise fail(str(err)) from None
            yield lock
        except Interrupted as stop:
            done = completed_rounds(out)
            saved = f"rounds 1-{done} are saved in {out}" if done else "no round completed"
            typer.secho(
                f"interrupted ({stop}) at round {min(done + 1, rounds)} of {rounds}; {saved}; "
                f"{resume_hint}",
                err=True,
                fg=typer.colors.YELLOW,
            )
            raise typer.Exit(stop.exit_status) from None
        finally:
            if lock is not None:
                lock.release()


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under `folder`: what keeping or copying it takes.
    Links are not followed."""
    total = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed meanwhile (a temporary file)
                continue
            if stat.S_ISREG(info.st_mode):
                total, files = total + info.st_size, files + 1
    return total, files


def record_folder_size(out: Path) -> tuple[int, int]:
    """Add the run folder's size to its summary.json (`run_folder_bytes`, `run_folder_files`),
    counting summary.json as written with them; returns (bytes, files)."""
    path = out / "summary.json"
    summary = json.loads(path.read_text())
    others, files = folder_size(out)
    others -= path.stat().st_size
    size = others
    for _ in range(4):  # the figure's own digits lengthen the file it is in: settle them
        summary |= {"run_folder_bytes": size, "run_folder_files": files}
        text = (json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
        if others + len(text) == size:
            break
        size = others + len(text)
    atomic_write(path, lambda f: f.write(text))
    return size, files


def human_bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"

"""What every command that runs a federation does with its run folder: hold its lock for the
whole run (a second writer is refused with exit 2, naming the holder), and stop cleanly on
SIGINT or SIGTERM with a message saying where the run stopped (exit 128 + signal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from fedrec.cli.options import fail
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

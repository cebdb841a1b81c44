"""How much fedrec prints: the level of its loggers and how a run shows its progress.

The `fedrec` command sets both once from its global options (--log-level, --quiet). The
processes a run starts (its ServerApp, the devices' ClientApps) inherit the level through
FEDREC_LOG_LEVEL and apply it with `apply_inherited_level`."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"
LOG_LEVEL_ENV = "FEDREC_LOG_LEVEL"
LOGGER = "fedrec"

ProgressMode = Literal["bar", "lines", "none"]

_quiet = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not the stream of the moment
    it was made (a test runner swaps and closes it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str = DEFAULT_LEVEL, *, quiet: bool = False) -> None:
    """Set the fedrec loggers' level in this process and in the processes it starts, and
    whether progress is shown. `quiet` shows no progress; the caller raises its level."""
    global _quiet
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    _quiet = quiet
    os.environ[LOG_LEVEL_ENV] = level
    _set_level(level)


def apply_inherited_level() -> None:
    """In a process a run started: the level the `fedrec` command was given, if any."""
    level = os.environ.get(LOG_LEVEL_ENV, "").strip().lower()
    if level in LEVELS:
        _set_level(level)


def _set_level(level: str) -> None:
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level.upper())
    # Where the host process routes logging itself (Flower, a test runner: handlers on the
    # root logger), fedrec's records go there; otherwise to stderr, with their level and
    # logger named.
    if not logging.getLogger().handlers and not any(
        isinstance(h, _StderrHandler) for h in logger.handlers
    ):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def progress() -> ProgressMode:
    """How a command shows a run's progress: a live bar on a terminal, one complete line per
    step when its output goes to a file or a pipe (a bar there is redrawn into nothing until
    the end), none under --quiet."""
    if _quiet:
        return "none"
    return "bar" if sys.stdout.isatty() else "lines"

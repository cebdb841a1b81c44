"""A log file for child processes, without terminal colour codes.

Flower 1.42 colours its log level names (`\\x1b[92mINFO`) whatever its output is, with no
setting to turn that off; in a file the codes are noise that `grep` and editors show raw.
Each child writes into a pipe, and a thread here copies its lines into the file without
them."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

# CSI sequences (colours, cursor moves) and the two-byte escapes
ANSI = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def strip_ansi(data: bytes) -> bytes:
    return ANSI.sub(b"", data)


class PlainLog:
    """Appends to `path` what the processes it starts print (stdout and stderr), line by line
    as they print it, without ANSI escape sequences."""

    def __init__(self, path: Path):
        self._file = open(path, "ab")
        self._lock = threading.Lock()
        self._copiers: list[threading.Thread] = []

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """`subprocess.Popen(args, **kwargs)` with its output into this log."""
        read, write = os.pipe()
        try:
            proc = subprocess.Popen(args, stdout=write, stderr=subprocess.STDOUT, **kwargs)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the child (and whatever it starts) holds the only write end
        copier = threading.Thread(target=self._copy, args=(read,), daemon=True)
        copier.start()
        self._copiers.append(copier)
        return proc

    def _copy(self, read: int) -> None:
        with open(read, "rb") as pipe:
            for line in pipe:
                with self._lock:
                    if self._file.closed:  # a straggler after close(): nowhere to write
                        continue
                    self._file.write(strip_ansi(line))
                    self._file.flush()

    def close(self, timeout: float = 5.0) -> None:
        """Copy what the processes printed until they (and their children) closed their
        output, for at most `timeout` seconds in all, then close the file."""
        for copier in self._copiers:
            copier.join(timeout / max(1, len(self._copiers)))
        with self._lock:
            self._file.close()

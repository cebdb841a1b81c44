"""Verify many ledgers in a process of their own: `start(folder, delta)` runs
`python -m fedrec.client.ledger_pass` over every `*/ledger.jsonl` below `folder` and returns the
call that waits for what their cohorts spent (`fedrec.client.ledger.ledgers_epsilons`). The
report over a simulated run uses it to verify thousands of ledgers on the core the finished
devices left free while it evaluates the model."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fedrec.client.ledger import LedgerEpsilons, ledgers_epsilons


def ledger_paths(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*/ledger.jsonl"))


def start(folder: str | Path, delta: float) -> Callable[[], LedgerEpsilons]:
    """`ledgers_epsilons` of every ledger below `folder`, computed in a child process (a
    corrupt ledger raises its LedgerCorruptError here, when the result is asked for)."""
    child = subprocess.Popen(
        [sys.executable, "-m", __name__, str(folder), repr(float(delta))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def result() -> LedgerEpsilons:
        out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(
                f"the ledger pass over {folder} failed (exit {child.returncode}): "
                + err.decode(errors="replace").strip()[-2000:]
            )
        outcome, value = pickle.loads(out)  # our own child's output
        if outcome == "error":
            raise value
        return value

    return result


def main() -> None:
    folder, delta = sys.argv[1], float(sys.argv[2])
    try:
        outcome = ("ok", ledgers_epsilons(ledger_paths(folder), delta))
    except Exception as err:  # re-raised in the parent, with its type and message
        outcome = ("error", err)
    sys.stdout.buffer.write(pickle.dumps(outcome))


if __name__ == "__main__":
    main()

"""Verify many ledgers in a process of their own: `start(folder, delta)` runs
`python -m fedrec.client.ledger_pass` over every `*/ledger.jsonl` below `folder` and returns the
call that waits for what their cohorts spent (`fedrec.client.ledger.ledgers_spent`, ε at
`delta`). The report over a simulated run uses it to verify thousands of ledgers on the core the
finished devices left free while it evaluates the model."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.client.ledger import ledgers_spent
from fedrec.common.privacy.accounting import epsilons_of_rdp


def ledger_paths(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*/ledger.jsonl"))


@dataclass(frozen=True)
class LedgerEpsilons:
    """Each cohort's ε at one δ under the distributed and the local guarantee, over many
    ledgers, with their retired cohorts and head hashes (`LedgersSpent`)."""

    distributed: np.ndarray
    local: np.ndarray
    retired: int
    heads: dict[str, str]


def spent_epsilons(folder: str | Path, delta: float) -> LedgerEpsilons:
    """`ledgers_spent` of every ledger below `folder`, its RDP converted to ε at `delta`."""
    spent = ledgers_spent(ledger_paths(folder))
    return LedgerEpsilons(
        epsilons_of_rdp(spent.distributed_rdp, delta),
        epsilons_of_rdp(spent.local_rdp, delta),
        spent.retired,
        spent.heads,
    )


def start(folder: str | Path, delta: float) -> Callable[[], LedgerEpsilons]:
    """`spent_epsilons(folder, delta)` computed in a child process (a corrupt ledger raises
    its LedgerCorruptError here, when the result is asked for)."""
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
    # run as __main__: the result's class must pickle under the module's own name
    from fedrec.client import ledger_pass

    folder, delta = sys.argv[1], float(sys.argv[2])
    try:
        outcome = ("ok", ledger_pass.spent_epsilons(folder, delta))
    except Exception as err:  # re-raised in the parent, with its type and message
        outcome = ("error", err)
    sys.stdout.buffer.write(pickle.dumps(outcome))


if __name__ == "__main__":
    main()

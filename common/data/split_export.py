"""A run's split as CSV files with external ids, so that other libraries train and are ranked
on exactly the interactions a fedrec run uses (`fedrec data --export-split`).

`known.csv`: every interaction delivered before the test (what the devices of a simulation
hold: the stream's rows); `test.csv`: the held-out rows the final evaluation ranks, each
against the catalogue minus the user's known items of the split (`history.csv`: train and
validation rows; under leave-last-out, users with fewer than 5 interactions are delivered but
not tested). `items.csv` lists the catalogue, the candidates of the full ranking.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedrec.common.data.schema import Interactions
from fedrec.common.data.stream import Stream

COLUMNS = ("user_id", "item_id", "timestamp")


def export_split(stream: Stream, folder: str | Path) -> dict[str, int]:
    """Write known.csv, history.csv, test.csv and items.csv into `folder`; returns the rows
    written per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dataset = stream.dataset
    parts = {
        "known": stream.rows,
        "history": stream.split.before_test(),
        "test": stream.split.test,
    }
    written = {}
    for name, rows in parts.items():
        written[name] = _write(
            folder / f"{name}.csv", rows, dataset.user_ids, dataset.catalogue.item_ids
        )
    with open(folder / "items.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("item_id",))
        writer.writerows((str(i),) for i in dataset.catalogue.item_ids)
    written["items"] = len(dataset.catalogue.item_ids)
    return written


def _write(path: Path, rows: Interactions, user_ids, item_ids) -> int:
    order = rows.time_order()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in order:
            writer.writerow(
                (str(user_ids[rows.user[r]]), str(item_ids[rows.item[r]]), int(rows.timestamp[r]))
            )
    return len(order)

"""Fixtures shared by the data tests: the built-in dataset, loaded once per session."""

from __future__ import annotations

import pytest

from fedrec.common.data.loaders import load_builtin
from fedrec.common.data.schema import Dataset


@pytest.fixture(scope="session")
def builtin_dataset() -> Dataset:
    return load_builtin()


@pytest.fixture
def flower_task(monkeypatch):
    """The identity Flower gives a running task (a Message built outside one needs it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)

"""Fixtures shared by the test modules (pytest imports test files in isolation: what two of
them need lives here)."""

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


# A federated run small enough for a test (120 synthetic users, 3 rounds of 40 devices) and
# large enough for K_min, the secure sum and the per-interaction ledgers to take part.
SMALL_RUN = {
    "dataset": "synthetic",
    "synthetic": "num_users=120,num_items=60,mean_interactions_per_user=12,seed=2",
    "rounds": 3,
    "clients-per-round": 40,
    "min-survivors": 3,
    "aggregate-noise-multiplier": 3.0,
    "model-dim": 8,
    "model-text-dim": 8,
    "num-negatives": 10,
    "local-steps": 2,
    "seed": 1,
}


@pytest.fixture
def small():
    """`small(folder, **overrides)`: the small run's SimulationConfig writing to folder/run;
    `small.flat` is its settings as the command line and run config spell them."""
    from fedrec.common.run_config import SimulationConfig

    def make(folder, **overrides):
        return SimulationConfig.from_flat(SMALL_RUN | {"out": str(folder / "run")} | overrides)

    make.flat = dict(SMALL_RUN)
    return make


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (the run's derived data is rebuilt, never shared)."""
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))

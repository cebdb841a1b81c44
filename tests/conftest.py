"""Fixtures shared by the data tests: the built-in dataset, loaded once per session."""

from __future__ import annotations

import pytest

from fedrec.common.data.loaders import load_builtin
from fedrec.common.data.schema import Dataset


@pytest.fixture(scope="session")
def builtin_dataset() -> Dataset:
    return load_builtin()

"""Attack scenarios: TOML files of attack settings (`fedrec simulate --scenario NAME`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fedrec.common.run_config import SimulationConfig

SCENARIO_FOLDER = "scenarios"


def builtin_scenarios() -> list[str]:
    """The names of the scenarios shipped in simulations/scenarios/."""
    folder = resources.files("fedrec.simulations") / SCENARIO_FOLDER
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def scenario_settings(scenario: str) -> dict[str, Any]:
    """The settings of a scenario: a shipped one by name, or a TOML file by path. Unknown
    names are refused, naming the shipped ones."""
    path = Path(scenario)
    if not path.is_file():
        shipped = resources.files("fedrec.simulations") / SCENARIO_FOLDER / f"{scenario}.toml"
        if not shipped.is_file():
            raise ValueError(
                f"scenario {scenario!r}: no such file, and no shipped scenario of that name "
                f"(one of {', '.join(builtin_scenarios())})"
            )
        path = Path(str(shipped))
    return SimulationConfig.toml_settings(path)

"""Project wiring: the README's commands, CI, packaging."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_install_and_test_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < 20  # the very first thing after the title
    main_job, tests = readme_commands()[:2]
    assert "pip install torch==2.13.0" in main_job and main_job.split("&&")[-1].strip().startswith(
        "fedrec "
    )
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -A1 -F '# 2. run the tests' README.md" in ci
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[lines.index("# 2. run the tests") + 1] == readme_commands()[1]


def test_builtin_data_ships_with_its_license():
    files = importlib.resources.files("fedrec.common.data") / "builtin"
    names = {entry.name for entry in files.iterdir()}
    assert {"ratings.dat.gz", "movies.dat.gz", "LICENSE", "ATTRIBUTION.md"} <= names
    assert "MIT" in (files / "LICENSE").read_text()

"""The packages' one-way layers: cli > simulations > server | client > common.

import-linter checks every import of the installed packages, those inside functions and under
TYPE_CHECKING included, against the contract in pyproject.toml ([tool.importlinter]): a device
process never loads the server or the simulation, the server never the device side."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the configuration found in `folder` (its pyproject.toml); no cache
    folder is written there."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_package_imports_only_the_layers_below_it():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_check_fails_on_an_import_against_the_layers(tmp_path):
    """Negative control: the project's own configuration with its layers upside down (common
    on top, so every package's imports of common go upward) must fail, naming an offending
    import; a check that passed this would prove nothing."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    assert contract["layers"][0] == "fedrec.cli" and contract["layers"][-1] == "fedrec.common"
    (tmp_path / "pyproject.toml").write_text(
        "[tool.importlinter]\n"
        f"root_packages = {json.dumps(config['root_packages'])}\n\n"
        "[[tool.importlinter.contracts]]\n"
        'name = "upside down"\n'
        'type = "layers"\n'
        f"layers = {json.dumps(contract['layers'][::-1])}\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert "is not allowed to import fedrec.common" in result.stdout


def test_settings_ledger_and_accounting_load_without_torch():
    """A device's `ingest` and `status` open its ledger and no model, and every command
    parses its settings before it runs anything: importing the run settings, the ledger and
    the accountant must not import torch (seconds of every command, usage errors included)."""
    probe = (
        "import sys; import fedrec.client.ledger, fedrec.common.privacy.accounting, "
        "fedrec.common.run_config; "
        "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_epsilon_is_computed_without_importing_torch():
    """The server's calibration at start-up and the report's pass over thousands of ledgers
    compute ε with Opacus's RDP analysis; importing it through the opacus package imports torch
    and torch.distributed (seconds at every start). The same analysis, loaded on its own, gives
    the same numbers."""
    probe = (
        "import sys, json; from fedrec.common.privacy import accounting as a; "
        "rdp = a._rdp_one_step(0.3, 1.1); "
        "print(json.dumps([sorted(m for m in ('torch', 'opacus') if m in sys.modules), "
        "rdp.tolist()]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded, rdp = json.loads(out.stdout)
    assert loaded == [], out.stderr
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedrec.common.privacy.accounting import ORDERS

    expected = opacus_rdp.compute_rdp(q=0.3, noise_multiplier=1.1, steps=1, orders=list(ORDERS))
    assert rdp == list(expected)

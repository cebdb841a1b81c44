"""`fedrec audit`: check every privacy claim of a run from its persisted records alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedrec.common.cli.options import fail


def audit(
    path: Annotated[
        Path, typer.Argument(help="a run folder, a device's store folder, or a folder of ledgers")
    ],
    out: Annotated[
        Path | None, typer.Option(help="where to write the report (default PATH/audit)")
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            help="per-interaction ε budget, a finite number > 0 (default: the strictest the "
            "run recorded)"
        ),
    ] = None,
    guarantee: Annotated[
        str | None, typer.Option(help="view the budget is in: local | distributed")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="δ (default: the recorded one)")] = None,
    heads: Annotated[
        Path | None,
        typer.Option(help="summary.json or {client: head hash} JSON kept outside PATH"),
    ] = None,
    pld: Annotated[bool, typer.Option(help="also compute the tighter PLD bound")] = True,
    empirical: Annotated[
        bool,
        typer.Option(
            "--empirical",
            help="also run the one-run canary audit (Steinke et al. 2023): a small DP run and "
            "a no-DP control, then an empirical ε lower bound beside the analytic one",
        ),
    ] = False,
) -> None:
    """Verify every ledger's hash chain, recompute every ε with dp_accounting (RDP and PLD),
    check budgets, retirements and every guarantee the run claims, and write a report
    (audit.md, audit.json, PNG plots). Exit 0: all claims hold; 1: violations (listed);
    2: records missing or unreadable."""
    from fedrec.common.audit import AccountingConfig, AuditOptions, RecordsError
    from fedrec.common.audit import audit as run_audit
    from fedrec.common.audit.report import write_report

    if guarantee not in (None, "local", "distributed"):
        raise typer.BadParameter("--guarantee must be local or distributed")
    options = AuditOptions(
        budget=budget,
        budget_view=guarantee,
        delta=delta,
        heads=heads,
        accounting=AccountingConfig(pld=pld),
    )
    try:
        result = run_audit(path, options)
    except RecordsError as err:
        raise fail(str(err)) from err
    figures = None
    if empirical:
        from fedrec.common.audit.empirical import EmpiricalConfig, run_empirical

        figures = run_empirical(EmpiricalConfig(), (out or path / "audit") / "empirical")
    files = write_report(result, out or path / "audit", figures)
    for g in result.figures["guarantees"]:
        flag = "" if g.get("earned", True) else "  [stated NOT yet earned]"
        typer.echo(
            f"{g.get('name')}: reported ε={_f(g.get('epsilon_reported'))}, recomputed "
            f"RDP {_f(g.get('epsilon_recomputed_rdp'))}, PLD {_f(g.get('epsilon_recomputed_pld'))}"
            f"{flag}"
        )
    if figures is not None:
        typer.echo(
            f"empirical ε lower bound: DP run {figures['dp_epsilon_lower_bound']:.3f} "
            f"(analytic {figures['dp_epsilon_analytic']:.3f}), no-DP control "
            f"{figures['control_epsilon_lower_bound']:.3f}"
        )
    for f in result.findings:
        typer.secho(f"violation {f.line()}", fg="red", err=True)
    if result.unfinished:
        typer.secho(f"unfinished run: {result.unfinished}", fg="yellow", err=True)
    typer.echo(
        f"{len(result.findings)} violations; wrote {files[1]} ({result.figures['seconds']:.2f} s)"
    )
    raise typer.Exit(result.exit_code)


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)

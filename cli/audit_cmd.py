"""`fedrec audit`: check every privacy claim of a run from its persisted records alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedrec.cli.options import fail


def audit(
    path: Annotated[
        Path, typer.Argument(help="a run folder, a device's store folder, or a folder of ledgers")
    ],
    out: Annotated[
        Path | None, typer.Option(help="where to write the report (default PATH/audit)")
    ] = None,
    epsilon: Annotated[
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
            help="also run the one-run canary audit of the run's own calibration (its devices' "
            "DP-SGD, as recorded in config.json) and of a control with 10x less noise: an "
            "empirical ε lower bound against the analytic one; exit 1 if it exceeds it",
        ),
    ] = False,
    empirical_canaries: Annotated[
        int, typer.Option(help="canaries of the empirical audit (each one device round)")
    ] = 2000,
    empirical_noise_scale: Annotated[
        float,
        typer.Option(help="the audited devices add this times their σ, the claim stays σ's"),
    ] = 1.0,
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
        epsilon=epsilon,
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
        from fedrec.common.audit.empirical import recorded_calibration
        from fedrec.simulations.empirical_audit import EmpiricalConfig, run_empirical

        if empirical_canaries < 2 or not empirical_noise_scale > 0:
            raise typer.BadParameter("--empirical-canaries >= 2, --empirical-noise-scale > 0")
        try:  # a run without DP-SGD on its devices has no per-interaction claim to test
            figures = run_empirical(
                recorded_calibration(path),
                EmpiricalConfig(canaries=empirical_canaries),
                (out or path / "audit") / "empirical",
                noise_scale=empirical_noise_scale,
            )
        except ValueError as err:
            raise fail(f"empirical audit: {err}") from err
    files = write_report(result, out or path / "audit", figures)
    for g in result.figures["guarantees"]:
        flag = "" if g.get("earned", True) else "  [stated NOT yet earned]"
        typer.echo(
            f"{g.get('name')}: reported ε={_f(g.get('epsilon_reported'))}, recomputed "
            f"RDP {_f(g.get('epsilon_recomputed_rdp'))}, PLD {_f(g.get('epsilon_recomputed_pld'))}"
            f"{flag}"
        )
    if figures is not None:
        dp, control = figures["dp"], figures["control"]
        typer.echo(
            f"empirical ε lower bound ({dp['method']}, {dp['canaries']} canaries, at most "
            f"{dp['max_certifiable']:.2f} certifiable): {dp['epsilon_lower_bound']:.3f} against "
            f"analytic {dp['analytic_epsilon']:.3f}: {dp['verdict']}; control with "
            f"{control['noise_scale']:g}x the noise {control['epsilon_lower_bound']:.3f}: "
            f"{control['verdict']}"
        )
        if dp["verdict"] == "violation":
            typer.secho(
                f"violation empirical: {dp['epsilon_lower_bound']:.3f} > analytic ε "
                f"{dp['analytic_epsilon']:.3f} ({dp['confidence']:.0%} confidence)",
                fg="red",
                err=True,
            )
    for f in result.findings:
        typer.secho(f"violation {f.line()}", fg="red", err=True)
    if result.unfinished:
        typer.secho(f"unfinished run: {result.unfinished}", fg="yellow", err=True)
    typer.echo(
        f"{len(result.findings)} violations; wrote {files[1]} ({result.figures['seconds']:.2f} s)"
    )
    code = result.exit_code
    if figures is not None and figures["verdict"] == "violation":
        code = max(code, 1)
    raise typer.Exit(code)


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)

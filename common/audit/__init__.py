"""Privacy audits from persisted records alone: hash chains, independent recomputation of ε
with Google's dp_accounting, budgets, retirements, and the statistics of an empirical one-run
lower bound (whose canaries run the device code: `fedrec.simulations.empirical_audit`).

Shares nothing with the code that produced the records but their file formats."""

from fedrec.common.audit.audit import AuditOptions, AuditResult, audit
from fedrec.common.audit.recompute import AccountingConfig, Recomputer
from fedrec.common.audit.records import Finding, RecordsError, verify_chain

__all__ = [
    "AccountingConfig",
    "AuditOptions",
    "AuditResult",
    "Finding",
    "Recomputer",
    "RecordsError",
    "audit",
    "verify_chain",
]

"""Privacy audits from persisted records alone: hash chains, independent recomputation of ε
with Google's dp_accounting, budgets, retirements, and an empirical one-run lower bound.

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

"""Who may do what: the API's roles and their rights, and the void rule. One home for each rule.

The void rule: a RecordVoided takes effect only if it comes from the source
that wrote its target, or from a correction source (an auditor's or admin's,
whose source the gateway sets to `audit:<name>`; no producer token may carry
it). The gateway checks it before publishing, for an answer a person can act
on; the PostgreSQL projector and the ClickHouse sink apply the same rule to
what they read, so a void produced straight to Kafka cannot bypass it. Both
stores take its SQL from `may_void_sql`, so the three can never disagree.
"""

from __future__ import annotations

# The sources of corrections made by people with the right to correct anything.
AUDIT_SOURCE_PREFIX = "audit:"


def is_audit_source(source: str) -> bool:
    return source.startswith(AUDIT_SOURCE_PREFIX)


def may_void(void_source: str, target_source: str) -> bool:
    """Whether a void from void_source takes effect on an event written by target_source."""
    return void_source == target_source or is_audit_source(void_source)


def may_void_sql(void_source: str, target_source: str) -> str:
    """may_void as a SQL expression over two column expressions, the same in PostgreSQL and ClickHouse."""
    n = len(AUDIT_SOURCE_PREFIX)
    return f"({void_source} = {target_source} OR substring({void_source}, 1, {n}) = '{AUDIT_SOURCE_PREFIX}')"

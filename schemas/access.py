"""Who may do what: the API's roles and their rights, and the void rule. One home for each rule.

The void rule: a RecordVoided takes effect only if it comes from the source
that wrote its target, or from a correction source (an auditor's or admin's,
whose source the gateway requires to be `audit:<name>`; no producer token may
carry it). The gateway checks it before publishing, for an answer a person can
act on. Only the platform's own principals may write health.events (the Kafka
ACLs), so nothing else can produce a void past the gateway. The PostgreSQL
projector and the ClickHouse sink do not yet re-check it on what they read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# The sources of corrections made by people with the right to correct anything.
AUDIT_SOURCE_PREFIX = "audit:"


def is_audit_source(source: str) -> bool:
    return source.startswith(AUDIT_SOURCE_PREFIX)


def may_void(void_source: str, target_source: str) -> bool:
    """Whether a void from void_source takes effect on an event written by target_source."""
    return void_source == target_source or is_audit_source(void_source)


# -- the API's roles and rights -------------------------------------------------------------------


class Right(StrEnum):
    READ_ALL = "read:all"  # every summary, analytics, citizen record
    READ_PROVINCE = "read:province"  # those of the token's own province
    WRITE_EVENTS = "write:events"  # POST /v1/events, as the token's source, for its provinces
    VOID_ANY = "void:any"  # RecordVoided of any source's event, as audit:<name>
    AUDIT = "audit"  # the access log
    METRICS = "metrics"  # /metrics
    ADMIN = "admin"  # tokens
    CHECK_IN = "check-in"  # POST /v1/checkins: scan a health-book code, see what staff need of its holder
    HEALTH_BOOK = "health-book"  # the citizen app: health-book codes and vaccination certificates


ROLES: dict[str, frozenset[Right]] = {
    "national": frozenset({Right.READ_ALL, Right.METRICS}),
    "province": frozenset({Right.READ_PROVINCE}),
    "auditor": frozenset({Right.READ_ALL, Right.AUDIT, Right.VOID_ANY, Right.METRICS}),
    "producer": frozenset({Right.WRITE_EVENTS}),
    # a vaccination site's system: a producer that also checks people in by their health-book code
    "site": frozenset({Right.WRITE_EVENTS, Right.CHECK_IN}),
    # the citizen health app's back end, which has authenticated the citizen itself
    "citizen_app": frozenset({Right.HEALTH_BOOK}),
    "admin": frozenset({Right.READ_ALL, Right.AUDIT, Right.VOID_ANY, Right.METRICS, Right.ADMIN}),
}
VOID_EVENT = "RecordVoided"
# Roles that publish as one source, for a list of provinces.
SOURCE_ROLES = ("producer", "site")


class ScopeError(ValueError):
    """A role was given a scope it cannot have (or lacks one it needs); the message says which."""


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a verified token's subject, role and scope."""

    name: str
    role: str
    province: str | None = None  # role province: the one province it reads
    source: str | None = None  # role producer: the source its events must carry
    provinces: frozenset[str] = frozenset()  # role producer: where its events may happen
    token_id: str = ""
    expires_at: float = float("inf")  # epoch seconds

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ScopeError(f"role {self.role!r} must be one of {', '.join(ROLES)}")
        if (self.role == "province") != (self.province is not None):
            raise ScopeError("a province token names exactly one province (--province CODE); no other role has one")
        publishes = self.role in SOURCE_ROLES
        if publishes != (self.source is not None):
            raise ScopeError(
                f"a {self.role} token names its source (--source NAME); only {', '.join(SOURCE_ROLES)} have one"
            )
        if publishes and not self.provinces:
            raise ScopeError(f"a {self.role} token names the provinces it writes for (--province CODE, repeatable)")
        if self.provinces and not publishes:
            raise ScopeError(f"only {' and '.join(SOURCE_ROLES)} tokens have a list of provinces")
        if self.source is not None and is_audit_source(self.source):
            raise ScopeError(f"source {self.source!r}: the prefix {AUDIT_SOURCE_PREFIX!r} is reserved for corrections")

    @property
    def rights(self) -> frozenset[Right]:
        return ROLES[self.role]

    def has(self, right: Right) -> bool:
        return right in ROLES[self.role]

    @property
    def label(self) -> str:
        """The role as the issue and the errors name it: national, province:79, producer:site-1, …"""
        if self.province:
            return f"province:{self.province}"
        if self.source:
            return f"{self.role}:{self.source}"
        return self.role

    @property
    def audit_source(self) -> str:
        return f"{AUDIT_SOURCE_PREFIX}{self.name}"

    def may_read_province(self, code: str) -> bool:
        return self.has(Right.READ_ALL) or (self.has(Right.READ_PROVINCE) and self.province == code)

    def may_post(self) -> bool:
        return self.has(Right.WRITE_EVENTS) or self.has(Right.VOID_ANY)

    def event_problem(self, event_type: str, source: str, province_code: str) -> str | None:
        """Why this caller may not publish this (valid) event, or None."""
        if self.has(Right.WRITE_EVENTS):
            if source != self.source:
                return f"source: must be {self.source!r}, the source of this token (got {source!r})"
            if province_code not in self.provinces and "*" not in self.provinces:
                allowed = ", ".join(sorted(self.provinces))
                return f"province_code: {province_code!r} is not among this token's provinces ({allowed})"
            return None
        if self.has(Right.VOID_ANY):
            if event_type != VOID_EVENT:
                return f"event_type: an {self.role} token may post only {VOID_EVENT} (corrections), not {event_type}"
            if source != self.audit_source:
                return f"source: an {self.role}'s correction carries source {self.audit_source!r} (got {source!r})"
            return None
        return f"a {self.label} token may not publish events"

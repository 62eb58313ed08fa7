"""How an event counts towards the figures (DESIGN §4): the one rule both projections apply.

The PostgreSQL projector (`projections.postgres.projector`) and the ClickHouse
sink's shaping (`projections.clickhouse.shaping`) read every event through
`figure_view`, so the same events are readable, and contribute the same
kind, time, province, subject, vaccine, dose number, flag and amount, in both
stores; `nhdp verify-analytics` compares what they then add up.

An event the figures cannot read raises KeyError, TypeError, ValueError or
AttributeError (READ_ERRORS): the projector dead-letters it (InvalidEvent)
and the sink skips it (the worker dead-letters the same message).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.ids import uuid_bytes

# Stored event kinds; the codes are part of both stores' table contents.
DECLARATION, REGISTRATION, DOSE, ADVERSE, ALLOCATION = 1, 2, 3, 4, 5
ETYPES = {
    "HealthDeclarationSubmitted": DECLARATION,
    "VaccinationRegistered": REGISTRATION,
    "DoseAdministered": DOSE,
    "AdverseEventReported": ADVERSE,
    "VaccineAllocated": ALLOCATION,
}
VOID = "RecordVoided"
READ_ERRORS = (KeyError, TypeError, ValueError, AttributeError)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def micros(value: Any) -> int:
    """occurred_at as integer microseconds since the epoch.

    Accepts an aware datetime (a stock Confluent deserializer) or epoch
    milliseconds (schemas.codec's default).
    """
    if isinstance(value, int):
        return value * 1000
    if value.tzinfo is None:
        raise ValueError("occurred_at has no time zone")
    return (value - _EPOCH) // _US


def nonempty(value: Any, name: str) -> str:
    # counter keys: a NULL would fail a whole batch in the database instead
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value


def figure_view(ev: Mapping[str, Any]) -> tuple:
    """What one decoded event contributes:
    (event_id, raw_id, kind, target, raw_target, province, t_us, subject, vaccine, dose_number, flag, amount).

    kind is 0 for an event no figure depends on (AppointmentScheduled,
    CheckedIn, a type added later) and for a RecordVoided, whose target (its
    canonical text and 16 bytes) is then set. flag is 1 for a declaration with
    symptoms or a serious adverse event; amount is an allocation's doses.
    """
    event_id, raw_id = uuid_bytes(ev["event_id"])
    et = ev["event_type"]
    kind = ETYPES.get(et, 0)
    p = ev["payload"]
    target = raw_target = None
    if kind == 0 and et == VOID:
        target, raw_target = uuid_bytes(p["voided_event_id"])
    province = ev["province_code"]
    if kind:
        nonempty(province, "province_code")
    t_us = micros(ev["occurred_at"])
    subject = ev.get("subject_id") or ""
    flag = amount = number = 0
    vaccine = ""
    if kind == DOSE:
        nonempty(ev["subject_id"], "subject_id")
        number = p["dose_number"]
        if type(number) is not int:
            raise ValueError(f"dose_number must be an integer, not {number!r}")
        vaccine = nonempty(p["vaccine"], "vaccine")
        p["site_id"]  # stored by the projector: an event without it is unreadable in both
    elif kind == DECLARATION:
        flag = 1 if p["symptoms"] else 0
    elif kind == ADVERSE:
        flag = 1 if p["severity"] == "serious" else 0
    elif kind == ALLOCATION:
        amount = p["doses"]
        if type(amount) is not int:
            raise ValueError(f"doses must be an integer, not {amount!r}")
        vaccine = p["vaccine"]
        p["allocation_id"], p["recipient"]
    return event_id, raw_id, kind, target, raw_target, province, t_us, subject, vaccine, number, flag, amount

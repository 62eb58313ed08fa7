"""Hypothesis strategies for NHDP events, shared by every test that needs events.

- ``events(event_type=None)``: valid JSON events as producers post them.
- ``avro_records(event_type=None)``: ``(event_type, record)`` pairs matching the
  Avro schema, made from a valid event by schemas.models.to_avro_record.
- ``json_values``, ``broken_events()``: any JSON, and valid events with one part replaced by it.
- ``invalid_events()``: ``(field_path, event)`` where the event is valid except
  at field_path, so the validator must name that path.

Timestamps have millisecond precision (what Avro keeps) and lie in the past.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from schemas.catalog import CITIZEN_EVENT_TYPES, EVENT_TYPES
from schemas.models import (
    CHANNELS,
    PRIORITY_GROUPS,
    PROVINCE_CODES,
    RECIPIENTS,
    SEVERITIES,
    SEXES,
    SYMPTOMS,
    VACCINES,
    to_avro_record,
    validate_event,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# 2021-01-01 .. 2026-01-01: inside the campaign era, never in the future.
MIN_MS = 1_609_459_200_000
MAX_MS = 1_767_225_600_000
OFFSETS = [
    UTC,
    timezone(timedelta(hours=7)),
    timezone(timedelta(hours=-5)),
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=14)),
]
PROVINCES = sorted(PROVINCE_CODES)

# Realistic ids plus the odd non-ASCII one; none of what schemas.bounds refuses (controls,
# bidirectional overrides, surrogates): invalid_events() adds those on purpose.
_ID_CHARS = string.ascii_letters + string.digits + "-_./:#"
_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
printable = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters=_BIDI)
identifiers = st.one_of(
    st.text(_ID_CHARS, min_size=1, max_size=40),
    st.text(printable, min_size=1, max_size=128),
)
trace_ids = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=128)
forbidden_characters = st.sampled_from(["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9f", *_BIDI])
citizen_ids = st.from_regex(r"[0-9]{9}|[0-9]{12}", fullmatch=True)
subject_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def rfc3339(draw: Any, min_ms: int = MIN_MS, max_ms: int = MAX_MS) -> str:
    ms = draw(st.integers(min_ms, max_ms))
    return format_ts(ms, draw(st.sampled_from(OFFSETS)), z=draw(st.booleans()))


def format_ts(ms: int, tz: timezone = UTC, *, z: bool = False) -> str:
    dt = (EPOCH + timedelta(milliseconds=ms)).astimezone(tz)
    text = dt.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if z and text.endswith("+00:00") else text


@st.composite
def slots(draw: Any) -> tuple[str, str]:
    start = draw(st.integers(MIN_MS, MAX_MS))
    length = draw(st.integers(1, 6 * 3600 * 1000))
    tz = draw(st.sampled_from(OFFSETS))
    return format_ts(start, tz), format_ts(start + length, tz)


def _optional(s: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | s


@st.composite
def payloads(draw: Any, event_type: str) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if event_type in CITIZEN_EVENT_TYPES:
        p["citizen_id"] = draw(citizen_ids)
    if event_type == "HealthDeclarationSubmitted":
        p["symptoms"] = draw(st.lists(st.sampled_from(SYMPTOMS), max_size=6))
        p["contact_with_confirmed_case"] = draw(st.booleans())
        p["channel"] = draw(st.sampled_from(CHANNELS))
    elif event_type == "VaccinationRegistered":
        p["birth_year"] = draw(st.integers(1900, 2021))
        p["sex"] = draw(st.sampled_from(SEXES))
        p["priority_group"] = draw(st.sampled_from(PRIORITY_GROUPS))
        p["channel"] = draw(st.sampled_from(CHANNELS))
    elif event_type == "AppointmentScheduled":
        p["appointment_id"] = draw(identifiers)
        p["site_id"] = draw(identifiers)
        p["slot_start"], p["slot_end"] = draw(slots())
        p["dose_number"] = draw(st.integers(1, 5))
    elif event_type == "CheckedIn":
        p["site_id"] = draw(identifiers)
        if draw(st.booleans()):
            p["appointment_id"] = draw(_optional(identifiers))
    elif event_type == "DoseAdministered":
        p["site_id"] = draw(identifiers)
        p["vaccine"] = draw(st.sampled_from(VACCINES))
        p["lot_number"] = draw(identifiers)
        p["dose_number"] = draw(st.integers(1, 5))
        if draw(st.booleans()):
            p["vaccinator_id"] = draw(_optional(identifiers))
    elif event_type == "AdverseEventReported":
        p["severity"] = draw(st.sampled_from(SEVERITIES))
        if draw(st.booleans()):
            p["dose_event_id"] = draw(_optional(st.uuids().map(str)))
        p["symptoms"] = draw(st.lists(identifiers, max_size=5))
    elif event_type == "VaccineAllocated":
        p["allocation_id"] = draw(identifiers)
        p["vaccine"] = draw(st.sampled_from(VACCINES))
        p["doses"] = draw(st.integers(1, 10_000_000))
        p["recipient"] = draw(st.sampled_from(RECIPIENTS))
    elif event_type == "RecordVoided":
        p["voided_event_id"] = str(draw(st.uuids()))
        p["reason"] = draw(st.text(printable, min_size=1, max_size=200))
    else:  # pragma: no cover
        raise ValueError(event_type)
    return p


@st.composite
def events(draw: Any, event_type: str | None = None) -> dict[str, Any]:
    """A valid event in the JSON form producers post."""
    et = event_type or draw(st.sampled_from(EVENT_TYPES))
    ev = {
        "event_id": str(draw(st.uuids())),
        "event_type": et,
        "occurred_at": draw(rfc3339()),
        "province_code": draw(st.sampled_from(PROVINCES)),
        "source": draw(st.text(printable, min_size=1, max_size=64)),
        "payload": draw(payloads(et)),
    }
    if draw(st.booleans()):
        ev["trace_id"] = draw(_optional(trace_ids))
    return ev


@st.composite
def avro_records(draw: Any, event_type: str | None = None) -> tuple[str, dict[str, Any]]:
    """(event_type, Avro record) for a valid event; subject_id set iff the type names a citizen."""
    ev = draw(events(event_type))
    validated, errors = validate_event(ev)
    assert validated is not None, errors
    subject = draw(subject_ids) if ev["event_type"] in CITIZEN_EVENT_TYPES else None
    return ev["event_type"], to_avro_record(validated, subject)


# -- invalid events ---------------------------------------------------------------------

_ENUM_FIELDS = {
    ("HealthDeclarationSubmitted", "channel"): CHANNELS,
    ("VaccinationRegistered", "sex"): SEXES,
    ("VaccinationRegistered", "priority_group"): PRIORITY_GROUPS,
    ("VaccinationRegistered", "channel"): CHANNELS,
    ("DoseAdministered", "vaccine"): VACCINES,
    ("AdverseEventReported", "severity"): SEVERITIES,
    ("VaccineAllocated", "vaccine"): VACCINES,
    ("VaccineAllocated", "recipient"): RECIPIENTS,
}


def _not_in(symbols: tuple[str, ...]) -> st.SearchStrategy[str]:
    # "unknown" is the Avro reader default; producers may not send it unless DESIGN lists it.
    return (st.just("unknown") | st.text(max_size=20)).filter(lambda s: s not in symbols)


_not_uuid = st.text(max_size=40).filter(lambda s: not _is_uuid(s))


def _is_uuid(s: str) -> bool:
    import uuid

    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


def _bad_envelope(draw: Any, ev: dict[str, Any]) -> str:
    field = draw(st.sampled_from(["event_id", "occurred_at", "province_code", "source", "unknown field"]))
    if field == "event_id":
        ev["event_id"] = draw(_not_uuid | st.integers() | st.none())
    elif field == "occurred_at":
        ev["occurred_at"] = draw(
            st.one_of(
                st.text(max_size=30).filter(lambda s: not s[:4].isdigit()),
                st.integers(MIN_MS // 1000, MAX_MS // 1000),  # unix seconds are not RFC 3339
                rfc3339().map(lambda s: s.replace("Z", "")[:23]),  # offset removed (naive)
                rfc3339(min_ms=4_102_444_800_000, max_ms=4_200_000_000_000),  # after 2100: future
                rfc3339(min_ms=-2_208_988_800_000, max_ms=1_577_836_799_999),  # before the platform epoch
            )
        )
    elif field == "province_code":
        ev["province_code"] = draw(
            st.one_of(
                st.from_regex(r"[0-9]{2}", fullmatch=True).filter(lambda c: c not in PROVINCE_CODES),
                st.text(max_size=5).filter(lambda c: c not in PROVINCE_CODES),
                st.integers(0, 99),
            )
        )
    elif field == "source":
        ev["source"] = draw(
            st.just("")
            | st.text(min_size=65, max_size=80)
            | st.integers()
            | st.tuples(st.text(printable, max_size=10), forbidden_characters).map("".join)
        )
    else:
        field = draw(st.sampled_from(["subject_id", "citizen_id", "foo"]))
        ev[field] = "x"
    return field


def _bad_payload(draw: Any, ev: dict[str, Any]) -> str:
    et, p = ev["event_type"], ev["payload"]
    choices = ["missing", "unknown_field"]
    if "citizen_id" in p:
        choices.append("citizen_id")
    if any(k[0] == et for k in _ENUM_FIELDS):
        choices.append("enum")
    if "dose_number" in p:
        choices.append("dose_number")
    if et == "AppointmentScheduled":
        choices.append("slot_order")
    if et == "VaccineAllocated":
        choices.append("doses")
    texts = [k for k, v in p.items() if isinstance(v, str) and k != "citizen_id" and (et, k) not in _ENUM_FIELDS]
    if texts:
        choices.append("characters")
    if et in ("HealthDeclarationSubmitted", "AdverseEventReported"):
        choices.append("symptoms")
    kind = draw(st.sampled_from(choices))
    if kind == "missing":
        required = [
            k
            for k in p
            if k not in ("appointment_id", "vaccinator_id", "dose_event_id")
            or (et == "AppointmentScheduled" and k == "appointment_id")
        ]
        name = draw(st.sampled_from(required))
        del p[name]
        return f"payload.{name}"
    if kind == "unknown_field":
        name = draw(st.sampled_from(["subject_id", "foo", "citizenId"]))
        p[name] = "x"
        return f"payload.{name}"
    if kind == "citizen_id":
        p["citizen_id"] = draw(
            st.one_of(
                st.text(max_size=14).filter(lambda s: not (s.isascii() and s.isdigit() and len(s) in (9, 12))),
                st.integers(0, 10**12),
            )
        )
        return "payload.citizen_id"
    if kind == "enum":
        name = draw(st.sampled_from([k[1] for k in _ENUM_FIELDS if k[0] == et]))
        p[name] = draw(_not_in(_ENUM_FIELDS[(et, name)]))
        return f"payload.{name}"
    if kind == "dose_number":
        p["dose_number"] = draw(st.integers(max_value=0) | st.integers(min_value=6) | st.just("1") | st.just(1.5))
        return "payload.dose_number"
    if kind == "slot_order":
        p["slot_start"], p["slot_end"] = p["slot_end"], p["slot_start"]
        return "payload.slot_end"
    if kind == "characters":
        name = draw(st.sampled_from(texts))
        p[name] = draw(st.tuples(st.text(printable, max_size=10), forbidden_characters).map("".join))
        return f"payload.{name}"
    if kind == "symptoms":
        p["symptoms"] = ["fever"] * draw(st.integers(33, 200))
        return "payload.symptoms"
    p["doses"] = draw(st.integers(max_value=0) | st.integers(10_000_001, (1 << 63) - 1) | st.just("10"))
    return "payload.doses"


@st.composite
def invalid_events(draw: Any) -> tuple[str, dict[str, Any]]:
    """(path, event): the event is valid except at path."""
    ev = draw(events())
    if draw(st.booleans()):
        return _bad_envelope(draw, ev), ev
    return _bad_payload(draw, ev), ev


# -- anything at all (the fuzz tests) ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@st.composite
def broken_events(draw) -> object:
    event = draw(events())
    where = draw(st.sampled_from(["envelope", "payload", "whole"]))
    if where == "whole":
        return draw(json_values)
    target = event if where == "envelope" else event["payload"]
    key = draw(st.sampled_from(sorted(target)) | st.text(max_size=12))
    target[key] = draw(json_values)
    return event

"""The gateway's fast path: a valid event in its usual spelling, checked and made
into its Avro record without building pydantic models.

`schemas.models` stays the contract and the only source of error messages. This
module accepts a subset of what it accepts and returns exactly what
`to_avro_record(validate_event(obj))` would (tests/unit/test_fastpath.py checks
both on generated valid and invalid events); anything it is unsure of, a problem
included, is answered None and goes the full way. It reuses the models' own
field checks (timestamps, citizen ids, provinces) and `schemas.bounds`, so each
rule keeps one home; what it adds is the shape: which fields, which types.

Why: pydantic's model construction, around the same checks, was most of the
gateway's ~11 µs per event, on a machine where every process competes for CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas import bounds
from schemas import models as m
from schemas.catalog import CITIZEN_EVENT_TYPES
from schemas.ids import uuid_bytes

_ENVELOPE = frozenset(m.EventIn.model_fields) - {"trace_id"}
_ENVELOPE_TRACED = _ENVELOPE | {"trace_id"}

Check = Callable[[Any], Any]  # the Avro value of a JSON value; raises on anything it does not accept


def _text(limit: int) -> Check:
    def check(v: Any) -> str:
        if type(v) is not str or bounds.text_problem(v, limit):
            raise ValueError
        return v

    return check


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _enum(symbols: tuple[str, ...]) -> Check:
    allowed = frozenset(symbols)

    def check(v: Any) -> str:
        if type(v) is not str or v not in allowed:
            raise ValueError
        return v

    return check


def _int(name: str) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int or bounds.int_problem(name, v):
            raise ValueError
        return v

    return check


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError
    return v


def _uuid(v: Any) -> str:
    if type(v) is not str:
        raise ValueError
    return uuid_bytes(v)[0]


def _slot_ms(v: Any) -> int:
    ms = m.to_epoch_millis(m._timestamp(v))  # m._slot's rule, without converting twice
    if bounds.slot_problem(ms, bounds.now_ms()):
        raise ValueError
    return ms


def _list(item: Check, limit: int) -> Check:
    def check(v: Any) -> list:
        if type(v) is not list or len(v) > limit:
            raise ValueError
        return [item(x) for x in v]

    return check


_IDENTIFIER = _text(bounds.IDENTIFIER_MAX)
_SOURCE = _text(bounds.SOURCE_MAX)

# Per payload: field -> its check; citizen_id is taken out before (see fast_record).
PAYLOADS: dict[str, dict[str, Check]] = {
    "HealthDeclarationSubmitted": {
        "symptoms": _list(_enum(m.SYMPTOMS), bounds.SYMPTOMS_MAX),
        "contact_with_confirmed_case": _bool,
        "channel": _enum(m.CHANNELS),
    },
    "VaccinationRegistered": {
        "birth_year": _int("birth_year"),
        "sex": _enum(m.SEXES),
        "priority_group": _enum(m.PRIORITY_GROUPS),
        "channel": _enum(m.CHANNELS),
    },
    "AppointmentScheduled": {
        "appointment_id": _IDENTIFIER,
        "site_id": _IDENTIFIER,
        "slot_start": _slot_ms,
        "slot_end": _slot_ms,
        "dose_number": _int("dose_number"),
    },
    "CheckedIn": {"site_id": _IDENTIFIER, "appointment_id": _optional(_IDENTIFIER)},
    "DoseAdministered": {
        "site_id": _IDENTIFIER,
        "vaccine": _enum(m.VACCINES),
        "lot_number": _IDENTIFIER,
        "dose_number": _int("dose_number"),
        "vaccinator_id": _optional(_IDENTIFIER),
    },
    "AdverseEventReported": {
        "severity": _enum(m.SEVERITIES),
        "dose_event_id": _optional(_uuid),
        "symptoms": _list(_IDENTIFIER, bounds.SYMPTOMS_MAX),
    },
    "VaccineAllocated": {
        "allocation_id": _IDENTIFIER,
        "vaccine": _enum(m.VACCINES),
        "doses": _int("doses"),
        "recipient": _enum(m.RECIPIENTS),
    },
    "RecordVoided": {"voided_event_id": _uuid, "reason": _text(bounds.TEXT_MAX)},
}
# Fields that may be left out (pydantic's defaults), and what they default to.
_DEFAULTS: dict[str, dict[str, Any]] = {
    t: {n: f.default for n, f in model.model_fields.items() if not f.is_required()}
    for t, model in m.PAYLOAD_MODELS.items()
}
_REQUIRED = {t: frozenset(PAYLOADS[t]) - set(_DEFAULTS[t]) for t in PAYLOADS}


def fast_record(obj: Any) -> tuple[dict[str, Any], str | None] | None:
    """(the Avro record with subject_id None, the citizen_id or None), or None: ask
    schemas.models.validate_event, which accepts more spellings and names every problem."""
    try:
        return _fast_record(obj)
    except Exception:
        return None


def _fast_record(obj: Any) -> tuple[dict[str, Any], str | None] | None:
    if type(obj) is not dict:
        return None
    keys = obj.keys()
    if keys != _ENVELOPE and keys != _ENVELOPE_TRACED:
        return None
    event_type = obj["event_type"]
    checks = PAYLOADS.get(event_type) if type(event_type) is str else None
    payload = obj["payload"]
    if checks is None or type(payload) is not dict:
        return None
    province = obj["province_code"]
    if type(province) is not str or province not in m.PROVINCE_CODES:
        return None
    trace_id = obj.get("trace_id")
    if trace_id is not None and (type(trace_id) is not str or not bounds.TRACE_ID.fullmatch(trace_id)):
        return None
    citizen_id = None
    if event_type in CITIZEN_EVENT_TYPES:
        citizen_id = payload.get("citizen_id")
        if type(citizen_id) is not str:
            return None
        m._citizen_id(citizen_id)
        fields = payload.keys() - {"citizen_id"}
    else:
        fields = payload.keys()
    if not _REQUIRED[event_type] <= fields <= checks.keys():
        return None
    out = {name: check(payload[name]) for name, check in checks.items() if name in fields}
    for name, default in _DEFAULTS[event_type].items():
        out.setdefault(name, default)
    if event_type == "AppointmentScheduled" and out["slot_end"] <= out["slot_start"]:
        return None  # in ms, finer times may still differ: the full validator decides
    occurred = m.to_epoch_millis(m._timestamp(obj["occurred_at"]))
    if bounds.occurred_at_problem(occurred, bounds.now_ms()):  # m._occurred's rule
        return None
    return {
        "event_id": _uuid(obj["event_id"]),
        "event_type": event_type,
        "occurred_at": occurred,
        "province_code": province,
        "source": _SOURCE(obj["source"]),
        "subject_id": None,
        "trace_id": trace_id,
        "payload": out,
    }, citizen_id

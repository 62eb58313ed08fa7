"""The JSON form of events, as producers post them to the gateway (DESIGN §2).

One pydantic model per payload (``<Type>Payload``, with ``citizen_id``) and per
event (``<Type>Event``: the envelope with that payload). :func:`validate_event`
checks one posted object and returns every problem as ``"field: reason"``,
where field is a dotted path (``payload.vaccine``, ``payload.symptoms.2``).
:func:`to_avro_record` turns a validated event into the dict of its Avro
schema, replacing citizen_id by the caller's subject_id.

The models are written by hand for readable errors; tests/unit/test_schemas.py
proves they agree with schemas/avro (fields, optionality, enum symbols, types).
Enums in Avro carry one extra symbol, ``unknown``, as the reader default for
symbols added later; producers may not send it (except ``sex``, where DESIGN
lists it).

Messages never echo a citizen_id: they end up in HTTP answers and logs.

Size: one model per payload of the catalog, written out for readable errors; they
are one contract and are checked against the .avsc together, so they stay in one file.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from schemas import bounds
from schemas.catalog import CITIZEN_EVENT_TYPES, EVENT_TYPES

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _load_province_codes() -> frozenset[str]:
    with open(REFERENCE_DIR / "provinces_2008.csv", newline="", encoding="utf-8") as f:
        return frozenset(row["code"] for row in csv.DictReader(f))


PROVINCE_CODES: frozenset[str] = _load_province_codes()

# -- closed sets (exactly as DESIGN §2; Avro adds "unknown" as reader default) --

Symptom = Literal["fever", "cough", "shortness_of_breath", "sore_throat", "loss_of_taste_or_smell", "fatigue"]
Channel = Literal["app", "web", "kiosk", "paper"]
Sex = Literal["female", "male", "unknown"]
PriorityGroup = Literal[
    "health_worker",
    "frontline_worker",
    "armed_forces",
    "police",
    "elderly_65_plus",
    "chronic_condition",
    "essential_worker",
    "general",
]
Vaccine = Literal[
    "astrazeneca",
    "pfizer",
    "moderna",
    "sinopharm",
    "sputnik_v",
    "janssen",
    "abdala",
    "hayat_vax",
    "covaxin",
    "novavax",
]
Severity = Literal["mild", "moderate", "severe", "serious"]
Recipient = Literal["province_health", "armed_forces", "police", "other_unit"]

SYMPTOMS: tuple[str, ...] = get_args(Symptom)
CHANNELS: tuple[str, ...] = get_args(Channel)
SEXES: tuple[str, ...] = get_args(Sex)
PRIORITY_GROUPS: tuple[str, ...] = get_args(PriorityGroup)
VACCINES: tuple[str, ...] = get_args(Vaccine)
SEVERITIES: tuple[str, ...] = get_args(Severity)
RECIPIENTS: tuple[str, ...] = get_args(Recipient)


def _fail(reason: str) -> PydanticCustomError:
    # The reason goes through a context variable so braces in it are never parsed.
    return PydanticCustomError("nhdp", "{reason}", {"reason": reason})


# -- field types ------------------------------------------------------------------

_CITIZEN_ID = re.compile(r"[0-9]{9}(?:[0-9]{3})?")


def _citizen_id(v: str) -> str:
    if not _CITIZEN_ID.fullmatch(v):
        raise _fail("must be a 9- or 12-digit national identity number (digits only)")
    return v


def _text(limit: int) -> AfterValidator:
    def check(v: str) -> str:
        problem = bounds.text_problem(v, limit)
        if problem:
            raise _fail(problem)
        return v

    return AfterValidator(check)


def _trace_id(v: str) -> str:
    if not bounds.TRACE_ID.fullmatch(v):
        raise _fail(f"must be 1 to {bounds.TRACE_ID_MAX} characters of A-Z a-z 0-9 . _ : -")
    return v


def _bounded(name: str) -> AfterValidator:
    def check(v: int) -> int:
        problem = bounds.int_problem(name, v)
        if problem:
            raise _fail(problem)
        return v

    return AfterValidator(check)


_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?")
_EXAMPLE_TS = "2021-08-10T09:30:00+07:00"


def _timestamp(v: Any) -> datetime:
    """RFC 3339 with a UTC offset (or an aware datetime from Python callers)."""
    if isinstance(v, datetime):
        if v.tzinfo is None or v.utcoffset() is None:
            raise _fail(f"must include a UTC offset, e.g. {_EXAMPLE_TS}")
        return v
    if not isinstance(v, str):
        raise _fail(f"must be an RFC 3339 timestamp string, e.g. {_EXAMPLE_TS}")
    m = _RFC3339.fullmatch(v)
    if m is None:
        raise _fail(f"not an RFC 3339 timestamp, e.g. {_EXAMPLE_TS}")
    day, clock, frac, offset = m.groups()
    if offset is None:
        raise _fail(f"must include a UTC offset (Z or +hh:mm), e.g. {_EXAMPLE_TS}")
    frac = (frac or "")[:7]  # datetime keeps microseconds; Avro keeps milliseconds
    try:
        return datetime.fromisoformat(f"{day}T{clock}{frac}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError:
        raise _fail(f"not a valid date and time: {v!r}") from None


def _occurred(v: datetime) -> datetime:
    problem = bounds.occurred_at_problem(to_epoch_millis(v), bounds.now_ms())
    if problem:
        raise _fail(problem)
    return v


def _slot(v: datetime) -> datetime:
    problem = bounds.slot_problem(to_epoch_millis(v), bounds.now_ms())
    if problem:
        raise _fail(problem)
    return v


def _province(v: str) -> str:
    if v not in PROVINCE_CODES:
        if len(v) == 2 and v.isdigit():
            raise _fail(
                f"unknown province code {v!r}; expected one of the 63 two-digit codes of 2008, "
                "e.g. '01' (Hà Nội) or '79' (Hồ Chí Minh City)"
            )
        raise _fail(f"must be a two-digit province code such as '79', got {v!r}")
    return v


CitizenId = Annotated[str, Field(strict=True), AfterValidator(_citizen_id)]
Identifier = Annotated[str, Field(strict=True), _text(bounds.IDENTIFIER_MAX)]
Text = Annotated[str, Field(strict=True), _text(bounds.TEXT_MAX)]
Slot = Annotated[datetime, BeforeValidator(_timestamp), AfterValidator(_slot)]
DoseNumber = Annotated[StrictInt, _bounded("dose_number")]
BirthYear = Annotated[StrictInt, _bounded("birth_year")]
Doses = Annotated[StrictInt, _bounded("doses")]
OccurredAt = Annotated[datetime, BeforeValidator(_timestamp), AfterValidator(_occurred)]
ProvinceCode = Annotated[str, Field(strict=True), AfterValidator(_province)]
Source = Annotated[str, Field(strict=True), _text(bounds.SOURCE_MAX)]
TraceId = Annotated[str, Field(strict=True), AfterValidator(_trace_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- payloads -----------------------------------------------------------------------


class HealthDeclarationSubmittedPayload(_Strict):
    citizen_id: CitizenId
    symptoms: list[Symptom] = Field(description="empty list = no symptoms", max_length=bounds.SYMPTOMS_MAX)
    contact_with_confirmed_case: StrictBool
    channel: Channel


class VaccinationRegisteredPayload(_Strict):
    citizen_id: CitizenId
    birth_year: BirthYear
    sex: Sex
    priority_group: PriorityGroup
    channel: Channel


class AppointmentScheduledPayload(_Strict):
    citizen_id: CitizenId
    appointment_id: Identifier
    site_id: Identifier
    slot_start: Slot
    slot_end: Slot
    dose_number: DoseNumber

    @field_validator("slot_end")
    @classmethod
    def _after_start(cls, v: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("slot_start")
        if start is not None and v <= start:
            raise _fail("must be after slot_start")
        return v


class CheckedInPayload(_Strict):
    citizen_id: CitizenId
    site_id: Identifier
    appointment_id: Identifier | None = None


class DoseAdministeredPayload(_Strict):
    citizen_id: CitizenId
    site_id: Identifier
    vaccine: Vaccine
    lot_number: Identifier
    dose_number: DoseNumber
    vaccinator_id: Identifier | None = Field(default=None, description="since schema v2")


class AdverseEventReportedPayload(_Strict):
    citizen_id: CitizenId
    severity: Severity
    dose_event_id: UUID | None = None
    symptoms: list[Identifier] = Field(max_length=bounds.SYMPTOMS_MAX)


class VaccineAllocatedPayload(_Strict):
    allocation_id: Identifier
    vaccine: Vaccine
    doses: Doses
    recipient: Recipient


class RecordVoidedPayload(_Strict):
    voided_event_id: UUID
    reason: Text


PAYLOAD_MODELS: dict[str, type[_Strict]] = {
    "HealthDeclarationSubmitted": HealthDeclarationSubmittedPayload,
    "VaccinationRegistered": VaccinationRegisteredPayload,
    "AppointmentScheduled": AppointmentScheduledPayload,
    "CheckedIn": CheckedInPayload,
    "DoseAdministered": DoseAdministeredPayload,
    "AdverseEventReported": AdverseEventReportedPayload,
    "VaccineAllocated": VaccineAllocatedPayload,
    "RecordVoided": RecordVoidedPayload,
}
assert tuple(PAYLOAD_MODELS) == EVENT_TYPES


# -- envelope and events --------------------------------------------------------------


class EventIn(_Strict):
    """The envelope, with the payload unchecked. The per-type models narrow it."""

    event_id: UUID
    event_type: str
    occurred_at: OccurredAt
    province_code: ProvinceCode
    source: Source
    trace_id: TraceId | None = Field(default=None, description="optional; also taken from headers")
    payload: dict[str, Any]


class HealthDeclarationSubmittedEvent(EventIn):
    event_type: Literal["HealthDeclarationSubmitted"]
    payload: HealthDeclarationSubmittedPayload


class VaccinationRegisteredEvent(EventIn):
    event_type: Literal["VaccinationRegistered"]
    payload: VaccinationRegisteredPayload


class AppointmentScheduledEvent(EventIn):
    event_type: Literal["AppointmentScheduled"]
    payload: AppointmentScheduledPayload


class CheckedInEvent(EventIn):
    event_type: Literal["CheckedIn"]
    payload: CheckedInPayload


class DoseAdministeredEvent(EventIn):
    event_type: Literal["DoseAdministered"]
    payload: DoseAdministeredPayload


class AdverseEventReportedEvent(EventIn):
    event_type: Literal["AdverseEventReported"]
    payload: AdverseEventReportedPayload


class VaccineAllocatedEvent(EventIn):
    event_type: Literal["VaccineAllocated"]
    payload: VaccineAllocatedPayload


class RecordVoidedEvent(EventIn):
    event_type: Literal["RecordVoided"]
    payload: RecordVoidedPayload


EVENT_MODELS: dict[str, type[EventIn]] = {
    "HealthDeclarationSubmitted": HealthDeclarationSubmittedEvent,
    "VaccinationRegistered": VaccinationRegisteredEvent,
    "AppointmentScheduled": AppointmentScheduledEvent,
    "CheckedIn": CheckedInEvent,
    "DoseAdministered": DoseAdministeredEvent,
    "AdverseEventReported": AdverseEventReportedEvent,
    "VaccineAllocated": VaccineAllocatedEvent,
    "RecordVoided": RecordVoidedEvent,
}

# For OpenAPI and typed callers. validate_event dispatches on event_type itself,
# which is what the discriminator does, and also reports envelope errors of
# events whose type is unknown.
AnyEvent = Annotated[
    HealthDeclarationSubmittedEvent
    | VaccinationRegisteredEvent
    | AppointmentScheduledEvent
    | CheckedInEvent
    | DoseAdministeredEvent
    | AdverseEventReportedEvent
    | VaccineAllocatedEvent
    | RecordVoidedEvent,
    Field(discriminator="event_type"),
]


# -- validation result ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidatedEvent:
    """A valid event: envelope values and the payload as a plain dict.

    event_id is the canonical lower-case UUID text (so retries match whatever
    case the producer used); occurred_at and payload timestamps are aware
    datetimes; payload UUIDs are canonical text; citizen_id is still present.
    """

    event_id: str
    event_type: str
    occurred_at: datetime
    province_code: str
    source: str
    payload: dict[str, Any]
    trace_id: str | None = None

    @property
    def occurred_at_ms(self) -> int:
        return to_epoch_millis(self.occurred_at)


def to_epoch_millis(dt: datetime) -> int:
    """Exact UTC milliseconds since the epoch (floor), as Avro timestamp-millis stores."""
    return (dt - EPOCH) // _ONE_MS


_UUID_FIELDS: dict[str, tuple[str, ...]] = {}
_TIMESTAMP_FIELDS: dict[str, tuple[str, ...]] = {}


def _leaf_types(annotation: Any) -> set[Any]:
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


for _t, _m in PAYLOAD_MODELS.items():
    _UUID_FIELDS[_t] = tuple(n for n, f in _m.model_fields.items() if UUID in _leaf_types(f.annotation))
    _TIMESTAMP_FIELDS[_t] = tuple(n for n, f in _m.model_fields.items() if datetime in _leaf_types(f.annotation))

_ENVELOPE_FIELDS = ", ".join(EventIn.model_fields)


def _payload_dict(event_type: str, payload: BaseModel) -> dict[str, Any]:
    d = dict(payload.__dict__)
    for name in _UUID_FIELDS[event_type]:
        if d[name] is not None:
            d[name] = str(d[name])
    return d


def validate_event(obj: Any) -> tuple[ValidatedEvent | None, list[str]]:
    """Check one posted event. Returns (event, []) or (None, every error as "field: reason")."""
    if not isinstance(obj, dict):
        return None, [f"event: must be a JSON object, got {_json_type(obj)}"]
    event_type = obj.get("event_type")
    model = EVENT_MODELS.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        return None, _unknown_type_errors(obj, event_type)
    try:
        m = model.model_validate(obj)
    except ValidationError as e:
        return None, _messages(e, event_type)
    return ValidatedEvent(
        event_id=str(m.event_id),
        event_type=event_type,
        occurred_at=m.occurred_at,
        province_code=m.province_code,
        source=m.source,
        payload=_payload_dict(event_type, m.payload),
        trace_id=m.trace_id,
    ), []


def _unknown_type_errors(obj: dict[str, Any], event_type: Any) -> list[str]:
    if "event_type" not in obj:
        first = "event_type: field required"
    elif not isinstance(event_type, str):
        first = f"event_type: must be a string, got {_json_type(event_type)}"
    else:
        shown = event_type if len(event_type) <= 64 else event_type[:61] + "..."
        first = f"event_type: unknown event type {shown!r}; expected one of {', '.join(EVENT_TYPES)}"
    try:
        EventIn.model_validate(obj)
    except ValidationError as e:
        rest = [m for m in _messages(e, None) if not m.startswith("event_type:")]
    else:
        rest = []
    # Keep envelope order: event_id before event_type.
    order = {name: i for i, name in enumerate(EventIn.model_fields)}
    msgs = [first, *rest]
    return sorted(msgs, key=lambda m: order.get(m.split(".", 1)[0].split(":", 1)[0], len(order)))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


_SIMPLE = {
    "missing": "field required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "uuid_parsing": "not a valid UUID",
    "uuid_type": "not a valid UUID",
    "uuid_version": "not a valid UUID",
}
_QUOTED = re.compile(r"'([^']*)'")


def _messages(e: ValidationError, event_type: str | None) -> list[str]:
    out = []
    for err in e.errors(include_url=False, include_input=False):
        loc = err["loc"]
        path = ".".join(str(p) for p in loc) or "event"
        kind = err["type"]
        if kind == "nhdp":
            reason = err["ctx"]["reason"]
        elif kind in _SIMPLE:
            reason = _SIMPLE[kind]
        elif kind == "too_long":
            reason = f"must have at most {err['ctx']['max_length']} entries"
        elif kind == "literal_error":
            reason = "must be one of " + ", ".join(_QUOTED.findall(err["ctx"]["expected"]))
        elif kind == "extra_forbidden":
            if len(loc) == 1:
                reason = f"unknown field; the envelope has {_ENVELOPE_FIELDS}"
            elif loc[0] == "payload" and len(loc) == 2 and event_type in PAYLOAD_MODELS:
                names = ", ".join(PAYLOAD_MODELS[event_type].model_fields)
                reason = f"unknown field; the {event_type} payload has {names}"
            else:
                reason = "unknown field"
        else:
            msg = err["msg"]
            reason = msg[:1].lower() + msg[1:]
        out.append(f"{path}: {reason}")
    return out


# -- to Avro -------------------------------------------------------------------------------


def to_avro_record(validated: ValidatedEvent, subject_id: str | None, *, trace_id: str | None = None) -> dict[str, Any]:
    """The dict matching the event's Avro schema (schemas.catalog.current_schema).

    citizen_id is dropped; subject_id (its pseudonym, computed by the caller) is
    required for events about a citizen and must be None for VaccineAllocated
    and RecordVoided. Timestamps become epoch milliseconds (exact, floor).
    trace_id, when given, overrides the one posted in the event.
    """
    event_type = validated.event_type
    if event_type in CITIZEN_EVENT_TYPES:
        if not subject_id:
            raise ValueError(f"{event_type} names a citizen: a subject_id is required")
    elif subject_id is not None:
        raise ValueError(f"{event_type} names no citizen: subject_id must be None")
    payload = {k: v for k, v in validated.payload.items() if k != "citizen_id"}
    for name in _TIMESTAMP_FIELDS[event_type]:
        payload[name] = to_epoch_millis(payload[name])
    return {
        "event_id": validated.event_id,
        "event_type": event_type,
        "occurred_at": to_epoch_millis(validated.occurred_at),
        "province_code": validated.province_code,
        "source": validated.source,
        "subject_id": subject_id,
        "trace_id": trace_id if trace_id is not None else validated.trace_id,
        "payload": payload,
    }

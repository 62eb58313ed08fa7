"""The event catalog: Avro schemas, their evolution gate, and the JSON models.

Pure logic, no servers. The registry- and Kafka-backed round trips live with
the stack tests.
"""

from __future__ import annotations

import copy
import io
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import avro.schema
import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas import catalog
from schemas.catalog import (
    CITIZEN_EVENT_TYPES,
    EVENT_TYPES,
    canonical,
    compatibility_problems,
    current_schema,
    parsed_schema,
    released_schemas,
    subject_for,
)
from schemas.models import (
    EVENT_MODELS,
    PAYLOAD_MODELS,
    PROVINCE_CODES,
    ValidatedEvent,
    to_avro_record,
    validate_event,
)
from tests.strategies import avro_records, events, invalid_events

SCHEMAS_DIR = Path(catalog.__file__).resolve().parent
ALL_AVSC = sorted(SCHEMAS_DIR.glob("avro/*.avsc")) + sorted(SCHEMAS_DIR.glob("released/*/v*.avsc"))
THIS_YEAR = time.gmtime(time.time() + 7 * 3600).tm_year


# -- the .avsc files --------------------------------------------------------------------


def test_the_catalog_files_are_all_there():
    names = {p.stem for p in SCHEMAS_DIR.glob("avro/*.avsc")}
    assert names == {"envelope", *EVENT_TYPES}
    released = {(p.parent.name, p.stem) for p in SCHEMAS_DIR.glob("released/*/v*.avsc")}
    assert released == {(t, "v1") for t in EVENT_TYPES} | {("DoseAdministered", "v2")}


@pytest.mark.parametrize("path", ALL_AVSC, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_avsc_parses_with_fastavro_and_avro(path: Path):
    text = path.read_text(encoding="utf-8")
    fastavro.parse_schema(json.loads(text))
    avro.schema.parse(text)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_composed_schema_parses_with_fastavro_and_avro(event_type: str):
    schema = current_schema(event_type)
    assert schema["name"] == event_type and schema["namespace"] == "vn.nhdp.events"
    fastavro.parse_schema(schema)
    parsed = avro.schema.parse(json.dumps(schema))
    assert parsed.fullname == f"vn.nhdp.events.{event_type}"
    assert [f["name"] for f in schema["fields"]] == [
        "event_id",
        "event_type",
        "occurred_at",
        "province_code",
        "source",
        "subject_id",
        "trace_id",
        "payload",
    ]
    assert schema["fields"][-1]["type"]["name"] == f"{event_type}Payload"


def test_envelope_field_types():
    fields = {f["name"]: f for f in current_schema("CheckedIn")["fields"]}
    assert fields["event_id"]["type"] == {"type": "string", "logicalType": "uuid"}
    assert fields["event_type"]["type"] == "string"
    assert fields["occurred_at"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert fields["province_code"]["type"] == "string"
    assert fields["source"]["type"] == "string"
    for optional in ("subject_id", "trace_id"):
        assert fields[optional]["type"] == ["null", "string"]
        assert fields[optional]["default"] is None


def _all_field_names(schema: Any) -> list[str]:
    out = []
    if isinstance(schema, dict):
        for f in schema.get("fields", []):
            out.append(f["name"])
            out += _all_field_names(f["type"])
        for key in ("items", "values", "type"):
            if isinstance(schema.get(key), (dict, list)):
                out += _all_field_names(schema[key])
    elif isinstance(schema, list):
        for s in schema:
            out += _all_field_names(s)
    return out


@pytest.mark.parametrize("path", ALL_AVSC, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_schema_carries_citizen_id(path: Path):
    assert "citizen_id" not in _all_field_names(json.loads(path.read_text(encoding="utf-8")))


def _named_types(schema: Any, found: dict[str, list[Any]]) -> None:
    if isinstance(schema, list):
        for s in schema:
            _named_types(s, found)
    elif isinstance(schema, dict):
        if schema.get("type") in ("enum", "record", "fixed"):
            found.setdefault(schema["name"], []).append(schema)
        for f in schema.get("fields", []):
            _named_types(f["type"], found)
        for key in ("items", "values"):
            if key in schema:
                _named_types(schema[key], found)


def test_shared_enums_are_identical_across_types():
    found: dict[str, list[Any]] = {}
    for t in EVENT_TYPES:
        _named_types(current_schema(t), found)
    assert len(found["Vaccine"]) == 2 and len(found["Channel"]) == 2
    for name, defs in found.items():
        assert all(canonical(d) == canonical(defs[0]) for d in defs), name


def test_every_enum_has_unknown_as_reader_default():
    found: dict[str, list[Any]] = {}
    for t in EVENT_TYPES:
        _named_types(current_schema(t), found)
    enums = {n: d[0] for n, d in found.items() if d[0]["type"] == "enum"}
    assert set(enums) == {"Symptom", "Channel", "Sex", "PriorityGroup", "Vaccine", "Severity", "Recipient"}
    for name, enum in enums.items():
        assert enum["default"] == "unknown", name
        assert enum["symbols"][-1] == "unknown", name


# -- catalog API -------------------------------------------------------------------------


def test_catalog_api():
    assert isinstance(EVENT_TYPES, tuple) and len(EVENT_TYPES) == 8
    assert subject_for("DoseAdministered") == "health.events-vn.nhdp.events.DoseAdministered"
    assert CITIZEN_EVENT_TYPES == set(EVENT_TYPES) - {"VaccineAllocated", "RecordVoided"}
    assert parsed_schema("CheckedIn") is parsed_schema("CheckedIn")
    a = current_schema("CheckedIn")
    a["fields"].clear()  # callers get copies
    assert current_schema("CheckedIn")["fields"]
    with pytest.raises(KeyError, match="unknown event type 'Nope'"):
        current_schema("Nope")
    with pytest.raises(KeyError):
        subject_for("Nope")


def test_canonical_is_sorted_compact_json():
    s = {"type": "record", "name": "X", "fields": [{"type": "string", "name": "a"}]}
    text = canonical(s)
    assert text == '{"fields":[{"name":"a","type":"string"}],"name":"X","type":"record"}'
    assert json.loads(text) == s
    assert canonical(json.loads(json.dumps(s, indent=4))) == text


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_released_versions_are_ordered_and_current_is_the_latest(event_type: str):
    versions = released_schemas(event_type)
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    # Changing a schema in schemas/avro means releasing it as the next vN.avsc.
    assert canonical(versions[-1][1]) == canonical(current_schema(event_type))


def test_dose_administered_v2_adds_an_optional_vaccinator_id():
    (_, v1), (_, v2) = released_schemas("DoseAdministered")
    p1 = {f["name"] for f in v1["fields"][-1]["type"]["fields"]}
    fields2 = {f["name"]: f for f in v2["fields"][-1]["type"]["fields"]}
    assert set(fields2) - p1 == {"vaccinator_id"}
    assert fields2["vaccinator_id"]["type"] == ["null", "string"]
    assert fields2["vaccinator_id"]["default"] is None


# -- evolution: BACKWARD_TRANSITIVE ---------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_current_schema_reads_every_released_version(event_type: str):
    current = current_schema(event_type)
    for version, old in released_schemas(event_type):
        assert compatibility_problems(current, old) == [], f"{event_type} v{version}"


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_released_readers_read_the_current_schema(event_type: str):
    # Not required by BACKWARD_TRANSITIVE, but true today and what lets a codec
    # still holding v1 read v2 data during a rolling upgrade.
    current = current_schema(event_type)
    for version, old in released_schemas(event_type):
        assert compatibility_problems(old, current) == [], f"{event_type} v{version}"


def _dose_payload(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return schema["fields"][-1]["type"]["fields"]


def _breaks_backward(candidate: dict[str, Any], event_type: str = "DoseAdministered") -> list[str]:
    return [p for _, old in released_schemas(event_type) for p in compatibility_problems(candidate, old)]


def test_gate_refuses_a_changed_type():
    s = current_schema("DoseAdministered")
    next(f for f in _dose_payload(s) if f["name"] == "dose_number")["type"] = "string"
    problems = _breaks_backward(s)
    assert problems and all(
        p.startswith("type_mismatch: reader type: string not compatible with writer type: int") for p in problems
    )


def test_gate_refuses_a_new_field_without_default():
    s = current_schema("DoseAdministered")
    _dose_payload(s).append({"name": "batch_expiry", "type": "string"})
    assert _breaks_backward(s) == ["reader_field_missing_default_value: batch_expiry (at /fields/7/type/fields/5)"] * 2


def test_gate_refuses_a_renamed_required_field():
    s = current_schema("DoseAdministered")
    next(f for f in _dose_payload(s) if f["name"] == "lot_number")["name"] = "lot"
    assert any(p.startswith("reader_field_missing_default_value: lot ") for p in _breaks_backward(s))


def test_removing_a_required_field_is_backward_compatible_but_not_forward():
    # Under BACKWARD rules a reader may ignore a writer's field; the harm is to
    # readers still on the old schema, which is what the forward check catches.
    s = current_schema("DoseAdministered")
    s["fields"][-1]["type"]["fields"] = [f for f in _dose_payload(s) if f["name"] != "lot_number"]
    assert _breaks_backward(s) == []
    ((_, v2),) = [vs for vs in released_schemas("DoseAdministered") if vs[0] == 2]
    assert compatibility_problems(v2, s) == [
        "reader_field_missing_default_value: lot_number (at /fields/7/type/fields/2)"
    ]


def test_gate_allows_a_new_optional_field_and_a_new_enum_symbol():
    s = current_schema("DoseAdministered")
    _dose_payload(s).append({"name": "site_name", "type": ["null", "string"], "default": None})
    vaccine = next(f for f in _dose_payload(s) if f["name"] == "vaccine")["type"]
    vaccine["symbols"].insert(-1, "corbevax")
    assert _breaks_backward(s) == []
    # An old reader maps the new symbol to its default, "unknown":
    for _, old in released_schemas("DoseAdministered"):
        assert compatibility_problems(old, s) == []


# -- models agree with the .avsc ----------------------------------------------------------


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1
        return rest[0], True
    return annotation, False


_PLAIN = {
    str: "string",
    bool: "boolean",
    datetime: {"type": "long", "logicalType": "timestamp-millis"},
    uuid.UUID: {"type": "string", "logicalType": "uuid"},
}


def _assert_agree(annotation: Any, avro_type: Any, where: str) -> None:
    """The model's field type describes the same values as the Avro type."""
    if get_origin(annotation) is Annotated:  # constraints inside Optional[...] / list[...]
        annotation = get_args(annotation)[0]
    inner, optional = _unwrap_optional(annotation)
    if optional:
        assert isinstance(avro_type, list) and avro_type[0] == "null" and len(avro_type) == 2, where
        _assert_agree(inner, avro_type[1], where)
        return
    assert not isinstance(avro_type, list), f"{where}: Avro union but the model field is required"
    if get_origin(inner) is Literal:
        assert avro_type["type"] == "enum", where
        symbols = list(get_args(inner))
        # The Avro enum adds its reader default ("unknown") unless DESIGN lists it already.
        extra = [] if avro_type["default"] in symbols else [avro_type["default"]]
        assert avro_type["symbols"] == symbols + extra, where
    elif get_origin(inner) is list:
        assert avro_type["type"] == "array", where
        _assert_agree(get_args(inner)[0], avro_type["items"], f"{where}[]")
    elif inner is int:
        assert avro_type in ("int", "long"), where
    else:
        assert _PLAIN[inner] == avro_type, where


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_models_agree_with_avsc(event_type: str):
    payload_schema = json.loads((SCHEMAS_DIR / "avro" / f"{event_type}.avsc").read_text())
    avro_fields = {f["name"]: f for f in payload_schema["fields"]}
    model_fields = dict(PAYLOAD_MODELS[event_type].model_fields)
    if event_type in CITIZEN_EVENT_TYPES:
        assert model_fields.pop("citizen_id").is_required()
    assert list(model_fields) == list(avro_fields), "same payload fields (minus citizen_id), same order"
    for name, mf in model_fields.items():
        af = avro_fields[name]
        optional = isinstance(af["type"], list)
        assert mf.is_required() is not optional, f"{name}: same optionality"
        if optional:
            assert af["default"] is None and mf.default is None, name
        _assert_agree(mf.annotation, af["type"], f"{event_type}.{name}")


def test_int_widths_match_the_ranges():
    # Avro int is 32-bit: fine for dose_number and birth_year; doses may be large, so long.
    types = {(t, f["name"]): f["type"] for t in EVENT_TYPES for f in current_schema(t)["fields"][-1]["type"]["fields"]}
    assert types[("DoseAdministered", "dose_number")] == "int"
    assert types[("AppointmentScheduled", "dose_number")] == "int"
    assert types[("VaccinationRegistered", "birth_year")] == "int"
    assert types[("VaccineAllocated", "doses")] == "long"


def test_enum_inputs_refuse_the_reader_default_unless_design_lists_it():
    for model in PAYLOAD_MODELS.values():
        for name, f in model.model_fields.items():
            inner, _ = _unwrap_optional(f.annotation)
            if get_origin(inner) is list:
                inner = get_args(inner)[0]
            if get_origin(inner) is Literal:
                assert ("unknown" in get_args(inner)) == (name == "sex"), name


def test_event_models_narrow_the_envelope():
    for event_type, model in EVENT_MODELS.items():
        assert get_args(model.model_fields["event_type"].annotation) == (event_type,)
        assert model.model_fields["payload"].annotation is PAYLOAD_MODELS[event_type]
    assert set(PROVINCE_CODES) >= {"01", "79", "96"} and len(PROVINCE_CODES) == 63


# -- validation messages -----------------------------------------------------------------

GOOD = {
    "event_id": "6f1c1e9e-3b7b-4a53-9d3e-2f0c8b7f4a10",
    "event_type": "DoseAdministered",
    "occurred_at": "2021-08-10T09:30:00.123+07:00",
    "province_code": "79",
    "source": "site-hcm-0123",
    "payload": {
        "citizen_id": "079123456789",
        "site_id": "79-760-0123",
        "vaccine": "astrazeneca",
        "lot_number": "ABV1234",
        "dose_number": 2,
    },
}


def _with(**changes: Any) -> dict[str, Any]:
    ev = copy.deepcopy(GOOD)
    for key, value in changes.items():
        target, name = (ev["payload"], key[2:]) if key.startswith("p_") else (ev, key)
        if value is _DROP:
            del target[name]
        else:
            target[name] = value
    return ev


_DROP = object()
VACCINES_TEXT = "astrazeneca, pfizer, moderna, sinopharm, sputnik_v, janssen, abdala, hayat_vax, covaxin, novavax"
TYPES_TEXT = ", ".join(EVENT_TYPES)
PROVINCE_TEXT = "expected one of the 63 two-digit codes of 2008, e.g. '01' (Hà Nội) or '79' (Hồ Chí Minh City)"
APPT = {
    "citizen_id": "123456789",
    "appointment_id": "A-1",
    "site_id": "S-1",
    "slot_start": "2021-08-10T09:00:00+07:00",
    "slot_end": "2021-08-10T09:30:00+07:00",
    "dose_number": 1,
}

BAD_INPUTS = [
    ("not an object", [1, 2], ["event: must be a JSON object, got an array"]),
    ("null", None, ["event: must be a JSON object, got null"]),
    ("bad vaccine", _with(p_vaccine="sputnik"), [f"payload.vaccine: must be one of {VACCINES_TEXT}"]),
    ("reader default is not input", _with(p_vaccine="unknown"), [f"payload.vaccine: must be one of {VACCINES_TEXT}"]),
    (
        "unknown type plus envelope errors",
        _with(event_type="Foo", event_id="nope"),
        ["event_id: not a valid UUID", f"event_type: unknown event type 'Foo'; expected one of {TYPES_TEXT}"],
    ),
    ("type missing", _with(event_type=_DROP), ["event_type: field required"]),
    ("type not a string", _with(event_type=5), ["event_type: must be a string, got a number"]),
    ("bad uuid", _with(event_id="6f1c1e9e-3b7b-4a53-9d3e"), ["event_id: not a valid UUID"]),
    ("citizen_id missing", _with(p_citizen_id=_DROP), ["payload.citizen_id: field required"]),
    (
        "citizen_id wrong length",
        _with(p_citizen_id="0791234567"),
        ["payload.citizen_id: must be a 9- or 12-digit national identity number (digits only)"],
    ),
    ("citizen_id as number", _with(p_citizen_id=79123456789), ["payload.citizen_id: must be a string"]),
    ("dose number", _with(p_dose_number=6), ["payload.dose_number: must be between 1 and 5, got 6"]),
    ("dose number as text", _with(p_dose_number="2"), ["payload.dose_number: must be an integer"]),
    (
        "naive time",
        _with(occurred_at="2021-08-10T09:30:00"),
        ["occurred_at: must include a UTC offset (Z or +hh:mm), e.g. 2021-08-10T09:30:00+07:00"],
    ),
    (
        "unix time",
        _with(occurred_at=1628562600),
        ["occurred_at: must be an RFC 3339 timestamp string, e.g. 2021-08-10T09:30:00+07:00"],
    ),
    (
        "not a time",
        _with(occurred_at="yesterday"),
        ["occurred_at: not an RFC 3339 timestamp, e.g. 2021-08-10T09:30:00+07:00"],
    ),
    (
        "impossible date",
        _with(occurred_at="2021-02-30T09:30:00Z"),
        ["occurred_at: not a valid date and time: '2021-02-30T09:30:00Z'"],
    ),
    (
        "future",
        _with(occurred_at="2099-01-01T00:00:00Z"),
        ["occurred_at: is in the future (more than 5 minutes ahead of the server clock)"],
    ),
    ("unknown province", _with(province_code="99"), [f"province_code: unknown province code '99'; {PROVINCE_TEXT}"]),
    (
        "new 2025 code is not a 2008 code",
        _with(province_code="03"),
        [f"province_code: unknown province code '03'; {PROVINCE_TEXT}"],
    ),
    (
        "province not two digits",
        _with(province_code="7"),
        ["province_code: must be a two-digit province code such as '79', got '7'"],
    ),
    ("province as number", _with(province_code=79), ["province_code: must be a string"]),
    ("empty source", _with(source=""), ["source: must be 1 to 64 characters long, got 0"]),
    ("long source", _with(source="x" * 65), ["source: must be 1 to 64 characters long, got 65"]),
    ("payload not an object", _with(payload=[]), ["payload: must be an object"]),
    ("payload missing", _with(payload=_DROP), ["payload: field required"]),
    (
        "unknown payload field",
        _with(p_subject_id="abc"),
        [
            "payload.subject_id: unknown field; the DoseAdministered payload has "
            "citizen_id, site_id, vaccine, lot_number, dose_number, vaccinator_id"
        ],
    ),
    (
        "unknown envelope field",
        _with(subject_id="abc"),
        [
            "subject_id: unknown field; the envelope has event_id, event_type, occurred_at, province_code, source, trace_id, payload"
        ],
    ),
    (
        "several at once",
        _with(source="", p_vaccine="x", p_lot_number=_DROP, p_dose_number=0),
        [
            "source: must be 1 to 64 characters long, got 0",
            f"payload.vaccine: must be one of {VACCINES_TEXT}",
            "payload.lot_number: field required",
            "payload.dose_number: must be between 1 and 5, got 0",
        ],
    ),
    (
        "slot order",
        _with(event_type="AppointmentScheduled", payload={**APPT, "slot_end": "2021-08-10T08:59:00+07:00"}),
        ["payload.slot_end: must be after slot_start"],
    ),
    (
        "slot order across offsets",
        _with(event_type="AppointmentScheduled", payload={**APPT, "slot_end": "2021-08-10T02:00:00Z"}),
        ["payload.slot_end: must be after slot_start"],
    ),
    (
        "symptom list item",
        _with(
            event_type="HealthDeclarationSubmitted",
            payload={
                "citizen_id": "123456789",
                "symptoms": ["fever", "headache"],
                "contact_with_confirmed_case": "no",
                "channel": "sms",
            },
        ),
        [
            "payload.symptoms.1: must be one of fever, cough, shortness_of_breath, sore_throat, loss_of_taste_or_smell, fatigue",
            "payload.contact_with_confirmed_case: must be true or false",
            "payload.channel: must be one of app, web, kiosk, paper",
        ],
    ),
    (
        "birth year",
        _with(
            event_type="VaccinationRegistered",
            payload={
                "citizen_id": "123456789",
                "birth_year": 1899,
                "sex": "x",
                "priority_group": "general",
                "channel": "app",
            },
        ),
        [
            f"payload.birth_year: must be between 1900 and {THIS_YEAR}, got 1899",
            "payload.sex: must be one of female, male, unknown",
        ],
    ),
    (
        "doses",
        _with(
            event_type="VaccineAllocated",
            payload={"allocation_id": "AL-1", "vaccine": "pfizer", "doses": 0, "recipient": "army"},
        ),
        [
            "payload.doses: must be between 1 and 10000000, got 0",
            "payload.recipient: must be one of province_health, armed_forces, police, other_unit",
        ],
    ),
    (
        "citizen_id where none belongs",
        _with(event_type="RecordVoided", payload={"voided_event_id": "x", "reason": "", "citizen_id": "123456789"}),
        [
            "payload.voided_event_id: not a valid UUID",
            "payload.reason: must be 1 to 500 characters long, got 0",
            "payload.citizen_id: unknown field; the RecordVoided payload has voided_event_id, reason",
        ],
    ),
    (
        "adverse event",
        _with(
            event_type="AdverseEventReported",
            payload={"citizen_id": "123456789", "severity": "fatal", "dose_event_id": "abc", "symptoms": "rash"},
        ),
        [
            "payload.severity: must be one of mild, moderate, severe, serious",
            "payload.dose_event_id: not a valid UUID",
            "payload.symptoms: must be a list",
        ],
    ),
]


@pytest.mark.parametrize("label,obj,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_validation_messages(label: str, obj: Any, expected: list[str]):
    validated, errors = validate_event(obj)
    assert validated is None
    assert errors == expected


def test_messages_never_echo_a_citizen_id():
    _, errors = validate_event(_with(p_citizen_id="07912345678x"))
    assert errors and not any("07912345678" in e for e in errors)


def test_valid_event_result():
    validated, errors = validate_event(_with(event_id="6F1C1E9E-3B7B-4A53-9D3E-2F0C8B7F4A10", trace_id="t-1"))
    assert errors == []
    assert validated == ValidatedEvent(
        event_id="6f1c1e9e-3b7b-4a53-9d3e-2f0c8b7f4a10",  # canonical, so retries in any case match
        event_type="DoseAdministered",
        occurred_at=datetime(2021, 8, 10, 2, 30, 0, 123000, tzinfo=UTC),
        province_code="79",
        source="site-hcm-0123",
        payload={**GOOD["payload"], "vaccinator_id": None},
        trace_id="t-1",
    )
    assert validated.occurred_at_ms == 1628562600123


def test_five_minutes_of_clock_skew_are_allowed():
    soon = datetime.now(UTC) + timedelta(minutes=4)
    assert validate_event(_with(occurred_at=soon.isoformat()))[1] == []
    later = datetime.now(UTC) + timedelta(minutes=6)
    assert validate_event(_with(occurred_at=later.isoformat()))[1] == [
        "occurred_at: is in the future (more than 5 minutes ahead of the server clock)"
    ]


def test_rfc3339_variants_are_accepted():
    for text in (
        "2021-08-10T02:30:00Z",
        "2021-08-10t02:30:00z",
        "2021-08-10 09:30:00+07:00",
        "2021-08-10T02:30:00.000000001+00:00",
        "2021-08-09T21:30:00-05:00",
    ):
        validated, errors = validate_event(_with(occurred_at=text))
        assert errors == [], text
        assert validated.occurred_at_ms == 1628562600000, text


# -- to_avro_record ------------------------------------------------------------------------


def test_to_avro_record_replaces_citizen_id_by_subject_id():
    validated, _ = validate_event(_with(p_vaccinator_id="VN-77"))
    record = to_avro_record(validated, "ab" * 32, trace_id="trace-9")
    assert record == {
        "event_id": GOOD["event_id"],
        "event_type": "DoseAdministered",
        "occurred_at": 1628562600123,
        "province_code": "79",
        "source": "site-hcm-0123",
        "subject_id": "ab" * 32,
        "trace_id": "trace-9",
        "payload": {
            "site_id": "79-760-0123",
            "vaccine": "astrazeneca",
            "lot_number": "ABV1234",
            "dose_number": 2,
            "vaccinator_id": "VN-77",
        },
    }
    assert "079123456789" not in json.dumps(record)
    with pytest.raises(ValueError, match="subject_id is required"):
        to_avro_record(validated, None)


def test_to_avro_record_refuses_a_subject_for_events_without_citizen():
    validated, errors = validate_event(
        _with(
            event_type="VaccineAllocated",
            payload={"allocation_id": "AL-1", "vaccine": "pfizer", "doses": 836000, "recipient": "province_health"},
        )
    )
    assert errors == []
    assert to_avro_record(validated, None)["subject_id"] is None
    with pytest.raises(ValueError, match="subject_id must be None"):
        to_avro_record(validated, "ab" * 32)


# -- generated events ----------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(events())
def test_generated_valid_events_validate(ev: dict[str, Any]):
    validated, errors = validate_event(ev)
    assert errors == []
    assert validated.event_type == ev["event_type"]
    assert validated.event_id == str(uuid.UUID(ev["event_id"]))
    assert validated.payload.get("citizen_id") == ev["payload"].get("citizen_id")


def _avro_bytes(event_type: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema(event_type), record)
    return buf.getvalue()


def _json_from_avro(record: dict[str, Any], citizen_id: str | None) -> dict[str, Any]:
    """The posted form back from an Avro record (as fastavro returns it) plus the citizen_id."""
    payload = {k: v for k, v in record["payload"].items()}
    for k, v in payload.items():
        if isinstance(v, datetime):
            payload[k] = v.isoformat()
        elif isinstance(v, uuid.UUID):
            payload[k] = str(v)
    if citizen_id is not None:
        payload["citizen_id"] = citizen_id
    ev = {
        "event_id": str(record["event_id"]),
        "event_type": record["event_type"],
        "occurred_at": record["occurred_at"].isoformat(),
        "province_code": record["province_code"],
        "source": record["source"],
        "trace_id": record["trace_id"],
        "payload": payload,
    }
    return ev


@FAST
@given(events(), st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_model_to_avro_to_model_round_trip(ev: dict[str, Any], subject: str):
    validated, errors = validate_event(ev)
    assert errors == []
    has_citizen = ev["event_type"] in CITIZEN_EVENT_TYPES
    record = to_avro_record(validated, subject if has_citizen else None)
    schema = parsed_schema(ev["event_type"])
    back = fastavro.schemaless_reader(io.BytesIO(_avro_bytes(ev["event_type"], record)), schema)
    assert back["subject_id"] == (subject if has_citizen else None)
    again, errors = validate_event(_json_from_avro(back, ev["payload"].get("citizen_id")))
    assert errors == []
    assert again == validated


@FAST
@given(avro_records())
def test_avro_records_match_the_schema(pair: tuple[str, dict[str, Any]]):
    event_type, record = pair
    assert fastavro.validation.validate(record, parsed_schema(event_type), raise_errors=True)


@FAST
@given(invalid_events())
def test_generated_invalid_events_are_rejected_at_the_field(case: tuple[str, dict[str, Any]]):
    path, ev = case
    validated, errors = validate_event(ev)
    assert validated is None
    assert errors, path
    assert any(e.startswith(f"{path}: ") for e in errors), (path, errors)
    for e in errors:
        field, sep, reason = e.partition(": ")
        assert sep and field and reason and "Input should" not in reason, e


def test_validation_is_fast_enough_for_the_gateway():
    # The gateway validates 10,000+ events/s; leave room for slow CI machines.
    evs = [_with(event_id=str(uuid.uuid4())) for _ in range(2000)]
    start = time.perf_counter()
    for ev in evs:
        validate_event(ev)
    rate = len(evs) / (time.perf_counter() - start)
    assert rate > 10_000, f"{rate:,.0f} events/s"


def test_payload_models_are_pydantic_models():
    for model in PAYLOAD_MODELS.values():
        assert issubclass(model, BaseModel)
        assert model.model_config.get("extra") == "forbid"

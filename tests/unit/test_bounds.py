"""The bounds of schemas.bounds, as the models and the router apply them, and the codec's own limits."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from hypothesis import given, settings

from schemas import bounds, catalog
from schemas.avro_codegen import _varint_bytes, compile_decoder
from schemas.codec import Codec, CodecError
from schemas.ids import is_subject_id
from schemas.models import validate_event
from streams.routing import semantic_error
from tests.strategies import avro_records

NOW_MS = int(time.time() * 1000)
SUBJECT = "ab" * 32


def record(event_type: str, payload: dict, **envelope) -> dict:
    base = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": NOW_MS - 60_000,
        "province_code": "79",
        "source": "site-app",
        "subject_id": SUBJECT if event_type in catalog.CITIZEN_EVENT_TYPES else None,
        "trace_id": None,
        "payload": payload,
    }
    return base | envelope


DOSE = {"site_id": "S-1", "vaccine": "pfizer", "lot_number": "L-1", "dose_number": 1, "vaccinator_id": None}
ALLOCATION = {"allocation_id": "AL-1", "vaccine": "pfizer", "doses": 1000, "recipient": "province_health"}


# The three events of issue 14's first finding: each stopped a partition for good.
@pytest.mark.parametrize(
    "rec, reason",
    [
        (record("DoseAdministered", DOSE | {"site_id": "S\x00-1"}), "payload.site_id: must not contain control"),
        (
            record("VaccineAllocated", ALLOCATION | {"allocation_id": "A\x00"}),
            "payload.allocation_id: must not contain control",
        ),
        (record("VaccineAllocated", ALLOCATION | {"doses": (1 << 63) - 1}), "payload.doses: must be between 1 and"),
        (record("DoseAdministered", DOSE, occurred_at=-2208988800000 - 14 * 3600_000), "occurred_at: is before"),
    ],
)
def test_the_router_refuses_what_the_stores_cannot_hold(rec, reason):
    assert semantic_error(rec).startswith(reason)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"occurred_at": NOW_MS + 10 * 60_000}, "occurred_at: is in the future"),  # the edge's check
        ({"source": "x" * 65}, "source: must be 1 to 64 characters"),
        ({"source": "evil\u202etxt"}, "source: must not contain control or bidirectional-override"),
        ({"trace_id": "a b"}, "trace_id: must be 1 to 128 characters"),
        ({"subject_id": SUBJECT + "\n"}, "subject_id: must be 64 lower-case hex digits"),
        ({"subject_id": SUBJECT.upper()}, "subject_id: must be 64 lower-case hex digits"),
    ],
)
def test_the_envelope_bounds(change, reason):
    assert bounds.record_problem(record("DoseAdministered", DOSE) | change, NOW_MS).startswith(reason)


def test_the_router_never_reads_the_clock():
    # A replay years later refuses exactly what the live worker refused: only fixed bounds.
    ahead = record("DoseAdministered", DOSE, occurred_at=NOW_MS + 10 * 60_000)
    assert semantic_error(ahead) is None
    assert (
        semantic_error(record("DoseAdministered", DOSE, occurred_at=bounds.LATEST_MS)) == "occurred_at: is after 2100"
    )
    born = {"birth_year": 2099, "sex": "female", "priority_group": "general", "channel": "app"}
    assert semantic_error(record("VaccinationRegistered", born)) is None
    assert bounds.record_problem(record("VaccinationRegistered", born), NOW_MS).startswith("payload.birth_year")


def test_payload_bounds_by_field():
    adverse = {"severity": "mild", "dose_event_id": None, "symptoms": ["x"] * 33}
    assert bounds.record_problem(record("AdverseEventReported", adverse)).startswith(
        "payload.symptoms: must have at most 32 entries"
    )
    adverse["symptoms"] = ["ok", "bad\x85"]
    assert bounds.record_problem(record("AdverseEventReported", adverse)).startswith("payload.symptoms: 1: must not")
    assert bounds.record_problem(record("DoseAdministered", DOSE | {"dose_number": 6})).startswith(
        "payload.dose_number: must be between 1 and 5"
    )
    slot = {"appointment_id": "A", "site_id": "S", "slot_start": 0, "slot_end": 1, "dose_number": 1}
    assert bounds.record_problem(record("AppointmentScheduled", slot)).startswith("payload.slot_start: is before")
    voided = {"voided_event_id": str(uuid.uuid4()), "reason": "r" * 501}
    assert bounds.record_problem(record("RecordVoided", voided)).startswith("payload.reason: must be 1 to 500")
    assert bounds.record_problem(record("RecordVoided", voided | {"reason": "r" * 500})) is None


@settings(max_examples=300, deadline=None)
@given(avro_records())
def test_every_event_the_gateway_accepts_passes_the_router(pair):
    _, rec = pair
    assert bounds.record_problem(rec) is None
    assert semantic_error(rec) is None
    # and the edge's clock-bound check: why publish_many(validated=True) may skip it
    assert bounds.record_problem(rec, bounds.now_ms()) is None


def test_the_gateway_names_each_bound():
    event = {
        "event_id": str(uuid.uuid4()),
        "event_type": "VaccineAllocated",
        "occurred_at": "1900-01-01T00:00:00+14:00",
        "province_code": "79",
        "source": "logistics",
        "trace_id": "x" * 129,
        "payload": ALLOCATION | {"allocation_id": "A\x00", "doses": (1 << 63) - 1},
    }
    _, errors = validate_event(event)
    assert errors == [
        "occurred_at: is before the platform epoch 2020-01-01",
        "trace_id: must be 1 to 128 characters of A-Z a-z 0-9 . _ : -",
        "payload.allocation_id: must not contain control or bidirectional-override characters (U+0000 at 1)",
        "payload.doses: must be between 1 and 10000000, got 9223372036854775807",
    ]


def test_subject_ids_are_exactly_64_hex_digits():
    assert is_subject_id(SUBJECT)
    assert not is_subject_id(SUBJECT + "\n")
    assert not is_subject_id(SUBJECT[:-1])


# -- the codec cannot be turned into a weapon (issue 14, findings 2 and 3) ----------------------


POC = "x'); __import__('os').system('touch /tmp/nhdp-pwned'); ('"


def poc_schema(kind: str) -> dict:
    schema = catalog.current_schema("DoseAdministered")
    schema = json.loads(json.dumps(schema))
    extra = (
        {"type": "fixed", "name": POC, "size": 4}
        if kind == "fixed"
        else {"type": "enum", "name": POC, "symbols": ["A"]}
    )
    schema["fields"].append({"name": "extra", "type": extra, "default": "A" if kind == "enum" else "\u0000" * 4})
    return schema


@pytest.mark.parametrize("kind", ["fixed", "enum"])
def test_a_schema_name_cannot_inject_code(kind, tmp_path):
    codec = Codec.with_known_schemas({900: poc_schema(kind)})
    with pytest.raises(
        CodecError, match=r"schema id 900: refused writer schema: (fixed|enum) name .* is not a valid Avro name"
    ):
        codec.decode(b"\x00\x00\x00\x03\x84" + b"\x00" * 40)


def test_generated_messages_embed_names_with_repr():
    # A name the grammar allows still reaches the source only through repr().
    dec = compile_decoder({"type": "fixed", "name": "F_1", "size": 4})
    assert "'fixed F_1 runs past the end'" in dec.__source__


def test_a_decode_bomb_is_capped():
    bomb = b"".join(_varint_bytes(60_000) for _ in range(100)) + _varint_bytes(0)  # 301 bytes
    assert len(bomb) == 301
    with pytest.raises(ValueError, match="more than 10000 array or map items in one message"):
        compile_decoder({"type": "array", "items": "null"})(bomb, 0)


def test_foreign_record_names_are_never_decoded():
    foreign = {"type": "record", "name": "Bomb", "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}]}
    codec = Codec.with_known_schemas({901: foreign})
    [result] = codec.decode_many_lenient([b"\x00\x00\x00\x03\x85" + b"\x02\x00\x00"])
    assert isinstance(result, CodecError)
    assert "refused writer schema: it writes 'Bomb', which is not an event of the catalog" in str(result)


def test_oversized_messages_are_refused_before_decoding():
    [result] = Codec.with_known_schemas({}).decode_many_lenient([b"\x00" * (17 * 1024 * 1024)])
    assert isinstance(result, CodecError) and "at most 16,777,216 are read" in str(result)

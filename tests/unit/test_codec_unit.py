"""The Confluent wire-format codec, without servers.

Codecs here know their schemas through a pre-filled SchemaCache (a real part of
the codec, not a stand-in for the registry); the registry-backed round trip is
tested with the stack. The generated encoders/decoders are checked against
fastavro byte for byte and value for value.
"""

from __future__ import annotations

import copy
import io
import socket
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.avro_codegen import CorruptData, compile_decoder, compile_encoder, explain
from schemas.catalog import EVENT_TYPES, current_schema, released_schemas
from schemas.codec import Codec, CodecError, SchemaCache, _strip_logical
from schemas.registry_client import RegistryClient, RegistryError
from tests.strategies import avro_records

IDS = {t: i + 1 for i, t in enumerate(EVENT_TYPES)}
V1_DOSE = released_schemas("DoseAdministered")[0][1]
V1_DOSE_ID = 100
KNOWN = {IDS[t]: current_schema(t) for t in EVENT_TYPES} | {V1_DOSE_ID: V1_DOSE}
TYPE_OF_ID = {i: t for t, i in IDS.items()} | {V1_DOSE_ID: "DoseAdministered"}

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DOSE = {
    "event_id": "6f1c1e9e-3b7b-4a53-9d3e-2f0c8b7f4a10",
    "event_type": "DoseAdministered",
    "occurred_at": 1628562600123,
    "province_code": "79",
    "source": "site-hcm-0123",
    "subject_id": "ab" * 32,
    "trace_id": None,
    "payload": {
        "site_id": "79-760-0123",
        "vaccine": "astrazeneca",
        "lot_number": "ABV1234",
        "dose_number": 2,
        "vaccinator_id": "VN-77",
    },
}


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.with_known_schemas(KNOWN)


def _fastavro_body(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(schema)), record)
    return buf.getvalue()


def _fastavro_read(writer: dict[str, Any], body: bytes, reader: dict[str, Any] | None = None) -> Any:
    w = fastavro.parse_schema(copy.deepcopy(writer))
    r = fastavro.parse_schema(copy.deepcopy(reader)) if reader is not None else None
    return fastavro.schemaless_reader(io.BytesIO(body), w, r)


# -- header and ids -----------------------------------------------------------------------


def test_wire_format_header_and_body(codec: Codec):
    data = codec.encode("DoseAdministered", DOSE)
    assert data[0] == 0
    assert data[1:5] == IDS["DoseAdministered"].to_bytes(4, "big") == b"\x00\x00\x00\x05"
    assert data[5:] == _fastavro_body(current_schema("DoseAdministered"), DOSE)
    assert codec.decode(data) == DOSE


def test_ids_come_from_the_cache(codec: Codec):
    assert codec.register_catalog() == IDS
    assert codec.schema_id("CheckedIn") == 4


def test_large_schema_ids_use_all_four_bytes():
    big = 0x01020304
    c = Codec.with_known_schemas({big: current_schema("CheckedIn")})
    rec = {**DOSE, "event_type": "CheckedIn", "payload": {"site_id": "S", "appointment_id": None}}
    data = c.encode("CheckedIn", rec)
    assert data[:5] == b"\x00\x01\x02\x03\x04"
    assert c.decode(data) == rec


def test_encode_without_a_known_id_says_so():
    c = Codec.with_known_schemas({1: current_schema("CheckedIn")})
    with pytest.raises(CodecError, match="no schema id for DoseAdministered: not among the known schemas"):
        c.encode("DoseAdministered", DOSE)


def test_encode_many_equals_encode(codec: Codec):
    pairs = [("DoseAdministered", {**DOSE, "event_id": str(UUID(int=i))}) for i in range(5)]
    pairs.insert(2, ("CheckedIn", {**DOSE, "event_type": "CheckedIn", "payload": {"site_id": "S"}}))
    assert codec.encode_many(pairs) == [codec.encode(t, r) for t, r in pairs]
    assert codec.encode_many([]) == [] and codec.decode_many([]) == []


def test_datetime_and_uuid_objects_encode_like_their_raw_forms(codec: Codec):
    rich = {
        **DOSE,
        "event_id": UUID(DOSE["event_id"]),
        "occurred_at": datetime(2021, 8, 10, 2, 30, 0, 123000, tzinfo=UTC),
    }
    assert codec.encode("DoseAdministered", rich) == codec.encode("DoseAdministered", DOSE)


def test_logical_types_on_request():
    c = Codec.with_known_schemas(KNOWN, logical_types=True)
    out = c.decode(c.encode("DoseAdministered", DOSE))
    assert out["event_id"] == UUID(DOSE["event_id"])
    assert out["occurred_at"] == datetime(2021, 8, 10, 2, 30, 0, 123000, tzinfo=UTC)


# -- bad bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(5))
def test_messages_shorter_than_the_header(codec: Codec, n: int):
    with pytest.raises(CodecError, match=rf"^message shorter than 5 bytes \({n} bytes\): not Confluent wire format$"):
        codec.decode(b"\x00\x00\x00\x00\x05"[:n])


def test_wrong_magic_byte(codec: Codec):
    data = codec.encode("DoseAdministered", DOSE)
    with pytest.raises(CodecError, match=r"^wrong magic byte 1 \(expected 0\): not Confluent wire format$"):
        codec.decode(b"\x01" + data[1:])
    with pytest.raises(CodecError, match="wrong magic byte 123"):
        codec.decode(b'{"event_id": 1}')  # JSON on an Avro topic


def test_unknown_schema_id(codec: Codec):
    with pytest.raises(CodecError, match=r"^unknown schema id 77 \(no registry configured\)$") as e:
        codec.decode(b"\x00\x00\x00\x00\x4d" + b"\x00" * 20)
    assert e.value.schema_id == 77


def test_every_truncation_is_an_error(codec: Codec):
    data = codec.encode("DoseAdministered", DOSE)
    for cut in range(5, len(data)):
        with pytest.raises(CodecError, match="^truncated or corrupt body for schema id 5: "):
            codec.decode(data[:cut])


def test_trailing_bytes_are_an_error(codec: Codec):
    data = codec.encode("DoseAdministered", DOSE)
    with pytest.raises(CodecError, match=r"^truncated or corrupt body for schema id 5: 2 unread trailing byte\(s\)"):
        codec.decode(data + b"\x00\x00")


def test_huge_length_prefix_fails_fast_without_allocating(codec: Codec):
    # event_id's length prefix says 2**62 bytes: refused before any read.
    huge = b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"
    start = time.perf_counter()
    with pytest.raises(CodecError, match="string length prefix at byte 15 is negative or runs past the end"):
        codec.decode(b"\x00\x00\x00\x00\x05" + huge + b"abc")
    # A huge array count: HealthDeclarationSubmitted.symptoms claims 2**40 items.
    rec = {
        **DOSE,
        "event_type": "HealthDeclarationSubmitted",
        "payload": {"symptoms": [], "contact_with_confirmed_case": False, "channel": "app"},
    }
    body = codec.encode("HealthDeclarationSubmitted", rec)
    count = (1 << 40) << 1  # zig-zag
    varint = bytearray()
    while count > 0x7F:
        varint.append((count & 0x7F) | 0x80)
        count >>= 7
    varint.append(count)
    bad = body[:-3] + bytes(varint) + b"\x00" + body[-2:]
    with pytest.raises(CodecError, match="block of 1099511627776 items cannot fit"):
        codec.decode(bad)
    assert time.perf_counter() - start < 1


def test_negative_lengths_and_bad_indexes(codec: Codec):
    data = bytearray(codec.encode("DoseAdministered", DOSE))
    neg = bytes(data[:5]) + b"\x03" + bytes(data[6:])  # event_id length -2
    with pytest.raises(CodecError, match="negative or runs past the end"):
        codec.decode(neg)
    # subject_id union index 1 -> 3: out of range
    pos = data.index(b"\x02\x80\x01" + b"ab")  # union byte, then length 64 as a 2-byte varint
    data[pos] = 6
    with pytest.raises(CodecError, match=rf"union index byte 6 at {pos} is out of range \(0..1\)"):
        codec.decode(bytes(data))


def test_invalid_utf8(codec: Codec):
    data = codec.encode("DoseAdministered", DOSE)
    bad = data.replace(b"site-hcm-0123", b"site-hcm-\xff\xfe23")
    with pytest.raises(CodecError, match="invalid UTF-8 in a string"):
        codec.decode(bad)


def test_non_bytes_input(codec: Codec):
    data = codec.encode("DoseAdministered", DOSE)
    assert codec.decode(bytearray(data)) == DOSE
    assert codec.decode(memoryview(data)) == DOSE
    with pytest.raises(CodecError, match=r"message is None \(a tombstone\?\)"):
        codec.decode(None)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="message is str, not bytes"):
        codec.decode("abc")  # type: ignore[arg-type]


def test_decode_many_names_the_bad_index(codec: Codec):
    good = codec.encode("DoseAdministered", DOSE)
    with pytest.raises(CodecError, match=r"^message 2: truncated or corrupt body for schema id 5: ") as e:
        codec.decode_many([good, good, good[:-1], good])
    assert e.value.index == 2 and e.value.schema_id == 5
    with pytest.raises(CodecError, match=r"^message 1: wrong magic byte 7"):
        codec.decode_many([good, b"\x07" + good[1:]])


def test_decode_many_lenient_reports_each_message(codec: Codec):
    good = codec.encode("DoseAdministered", DOSE)
    out = codec.decode_many_lenient([good, b"\x00", good + b"!", good, None])
    assert out[0] == DOSE and out[3] == DOSE
    assert [str(x) for x in out if isinstance(x, CodecError)] == [
        "message 1: message shorter than 5 bytes (1 bytes): not Confluent wire format",
        "message 2: truncated or corrupt body for schema id 5: 1 unread trailing byte(s) after the datum",
        "message 4: message is None (a tombstone?), not Confluent wire format",
    ]
    assert [x.index for x in out if isinstance(x, CodecError)] == [1, 2, 4]


_COMPILED = {i: (compile_encoder(s), compile_decoder(s)) for i, s in KNOWN.items()}


def _check_decode_outcome(codec: Codec, data: bytes) -> None:
    """Garbage must give CodecError or a complete record that re-encodes to an equal record."""
    try:
        record = codec.decode(data)
    except CodecError:
        return
    encode, decode = _COMPILED[int.from_bytes(data[1:5], "big")]
    out = bytearray()
    encode(record, out)
    assert decode(bytes(out), 0) == record


@MANY
@given(st.binary(max_size=120))
def test_fuzz_random_bytes(codec: Codec, data: bytes):
    _check_decode_outcome(codec, data)


@MANY
@given(st.sampled_from(sorted(KNOWN)), st.binary(max_size=200))
def test_fuzz_random_body_behind_a_valid_header(codec: Codec, schema_id: int, body: bytes):
    _check_decode_outcome(codec, b"\x00" + schema_id.to_bytes(4, "big") + body)


@FAST
@given(st.sampled_from(sorted(KNOWN)), st.binary(max_size=200))
def test_fuzz_logical_types_codec(schema_id: int, body: bytes):
    # Building UUIDs and datetimes from garbage fails in more ways; all are CodecError.
    try:
        LOGICAL.decode(b"\x00" + schema_id.to_bytes(4, "big") + body)
    except CodecError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(avro_records(), st.data())
def test_fuzz_mutated_messages(codec: Codec, pair: tuple[str, dict[str, Any]], data: st.DataObject):
    event_type, record = pair
    msg = bytearray(codec.encode(event_type, record))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(5, len(msg) - 1))
        msg[i] = data.draw(st.integers(0, 255))
    _check_decode_outcome(codec, bytes(msg))


@FAST
@given(avro_records(), st.data())
def test_truncated_or_extended_valid_messages_always_fail(
    codec: Codec, pair: tuple[str, dict[str, Any]], data: st.DataObject
):
    event_type, record = pair
    msg = codec.encode(event_type, record)
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(CodecError):
        codec.decode(msg[:cut])
    with pytest.raises(CodecError, match="trailing"):
        codec.decode(msg + data.draw(st.binary(min_size=1, max_size=10)))


# -- agreement with fastavro ---------------------------------------------------------------


@FAST
@given(st.lists(avro_records(), min_size=1, max_size=20))
def test_codec_matches_fastavro(codec: Codec, pairs: list[tuple[str, dict[str, Any]]]):
    encoded = codec.encode_many(pairs)
    for (event_type, record), data in zip(pairs, encoded):
        schema = current_schema(event_type)
        assert data[5:] == _fastavro_body(schema, record)
        assert _fastavro_read(_strip_logical(schema), data[5:]) == record
    assert codec.decode_many(encoded) == [r for _, r in pairs]


LOGICAL = Codec.with_known_schemas(KNOWN, logical_types=True)


@FAST
@given(avro_records())
def test_logical_decoding_matches_fastavro(pair: tuple[str, dict[str, Any]]):
    event_type, record = pair
    c = LOGICAL
    data = c.encode(event_type, record)
    assert c.decode(data) == _fastavro_read(current_schema(event_type), data[5:])


# -- evolution -------------------------------------------------------------------------------


def test_v1_reader_reads_v2_data_and_v2_reader_reads_v1_data():
    cache = SchemaCache(None, KNOWN)
    v2 = Codec(cache=cache)
    v1 = Codec(cache=cache, schemas={"DoseAdministered": V1_DOSE})
    assert v1.schema_id("DoseAdministered") == V1_DOSE_ID and v2.schema_id("DoseAdministered") == 5

    v2_bytes = v2.encode("DoseAdministered", DOSE)
    as_v1 = v1.decode(v2_bytes)
    assert "vaccinator_id" not in as_v1["payload"]
    assert as_v1 == {**DOSE, "payload": {k: v for k, v in DOSE["payload"].items() if k != "vaccinator_id"}}
    assert as_v1 == _fastavro_read(
        _strip_logical(current_schema("DoseAdministered")), v2_bytes[5:], _strip_logical(V1_DOSE)
    )

    v1_bytes = v1.encode("DoseAdministered", as_v1)
    assert v1_bytes[:5] == b"\x00\x00\x00\x00\x64"
    as_v2 = v2.decode(v1_bytes)
    assert as_v2["payload"]["vaccinator_id"] is None
    assert as_v2 == {**DOSE, "payload": {**DOSE["payload"], "vaccinator_id": None}}
    assert v2.decode_many([v1_bytes, v2_bytes]) == [as_v2, DOSE]


def test_a_new_enum_symbol_reads_as_unknown_for_old_readers():
    newer = current_schema("DoseAdministered")
    vaccine = next(f for f in newer["fields"][-1]["type"]["fields"] if f["name"] == "vaccine")["type"]
    vaccine["symbols"].insert(-1, "corbevax")
    writer = Codec.with_known_schemas({900: newer}, schemas={"DoseAdministered": newer})
    data = writer.encode("DoseAdministered", {**DOSE, "payload": {**DOSE["payload"], "vaccine": "corbevax"}})
    reader = Codec.with_known_schemas({900: newer})
    assert reader.decode(data)["payload"]["vaccine"] == "unknown"


def test_unresolvable_writer_is_reported_per_message():
    stricter = current_schema("DoseAdministered")
    stricter["fields"][-1]["type"]["fields"].append({"name": "batch_expiry", "type": "string"})
    reader = Codec.with_known_schemas(KNOWN, schemas={"DoseAdministered": stricter})
    data = Codec.with_known_schemas(KNOWN).encode("DoseAdministered", DOSE)
    with pytest.raises(
        CodecError,
        match="^schema id 5: cannot resolve the writer schema to this reader.s vn.nhdp.events.DoseAdministered: .*batch_expiry has no default",
    ):
        reader.decode(data)


def test_schemas_override_must_name_the_right_record():
    with pytest.raises(ValueError, match="must be the record vn.nhdp.events.CheckedIn"):
        Codec(schemas={"CheckedIn": current_schema("DoseAdministered")})


# -- encode errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {**DOSE, "payload": {**DOSE["payload"], "vaccine": "corbevax"}},
            "cannot encode DoseAdministered: payload.vaccine: 'corbevax' is not a symbol of vn.nhdp.events.Vaccine",
        ),
        ({**DOSE, "occurred_at": "2021-08-10"}, "cannot encode DoseAdministered: occurred_at: expected long, got str"),
        (
            {**DOSE, "occurred_at": datetime(2021, 8, 10)},
            "cannot encode DoseAdministered: occurred_at: naive datetime, give a timezone-aware one",
        ),
        (
            {**DOSE, "payload": {"site_id": "S"}},
            "cannot encode DoseAdministered: payload.vaccine: missing (required, no default)",
        ),
        (
            {**DOSE, "payload": {**DOSE["payload"], "dose_number": 1 << 40}},
            "cannot encode DoseAdministered: payload.dose_number: 1099511627776 out of the int range",
        ),
        (
            {**DOSE, "subject_id": 5},
            "cannot encode DoseAdministered: subject_id: int value fits no branch of [null, string]",
        ),
        ({**DOSE, "event_type": "CheckedIn"}, "cannot encode DoseAdministered: the record's event_type is 'CheckedIn'"),
        ("not a record", "cannot encode DoseAdministered: record is of type str, not a dict"),
    ],
)
def test_encode_errors_name_the_field(codec: Codec, record: Any, message: str):
    with pytest.raises(CodecError) as e:
        codec.encode("DoseAdministered", record)
    assert str(e.value).startswith(message)
    with pytest.raises(CodecError) as e:
        codec.encode_many([("DoseAdministered", DOSE), ("DoseAdministered", record)])
    assert str(e.value).startswith("message 1: " + message) and e.value.index == 1


def test_encode_unknown_type(codec: Codec):
    with pytest.raises(CodecError, match="^unknown event type 'Nope'; expected one of HealthDeclarationSubmitted"):
        codec.encode("Nope", DOSE)
    with pytest.raises(CodecError, match="^message 0: unknown event type"):
        codec.encode_many([("Nope", DOSE)])
    with pytest.raises(CodecError, match=r"^message 1: not an \(event_type, record\) pair"):
        codec.encode_many([("DoseAdministered", DOSE), DOSE])  # type: ignore[list-item]


# -- an unreachable registry is not a bad message -------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_registry_raises_registry_error_not_codec_error():
    registry = RegistryClient(f"http://127.0.0.1:{_closed_port()}", retries=1, backoff_s=0.01, timeout=2)
    c = Codec(registry)
    msg = b"\x00\x00\x00\x00\x05" + b"\x00" * 30
    for call in (
        lambda: c.decode(msg),
        lambda: c.decode_many([msg]),
        lambda: c.decode_many_lenient([msg]),
        lambda: c.encode("DoseAdministered", DOSE),
        lambda: c.encode_many([("DoseAdministered", DOSE)]),
    ):
        with pytest.raises(RegistryError) as e:
            call()
        assert e.value.unreachable and e.value.status is None and not isinstance(e.value, CodecError)
    registry.close()


# -- the code generator on every Avro type ----------------------------------------------------

ALL_TYPES = {
    "type": "record",
    "name": "AllTypes",
    "namespace": "test",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "by", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {
            "name": "a",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "Item",
                    "fields": [{"name": "x", "type": "int"}, {"name": "e2", "type": "E"}],
                },
            },
        },
        {"name": "m", "type": {"type": "map", "values": ["null", "double", "string"]}},
        {"name": "u", "type": ["null", "long", "string", "F4", "Item"]},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "nested",
            "type": {"type": "array", "items": {"type": "map", "values": {"type": "array", "items": "string"}}},
        },
        {"name": "opt", "type": ["null", "int"], "default": None},
    ],
}
# Reordered, a field dropped, promotions, an enum with a new symbol, a new field with default.
ALL_TYPES_READER = {
    "type": "record",
    "name": "AllTypes",
    "namespace": "test",
    "fields": [
        {"name": "s", "type": "bytes"},
        {"name": "i", "type": "double"},
        {"name": "l", "type": ["null", "float"]},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["C", "B", "A", "Z"]}},
        {
            "name": "a",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "Item",
                    "fields": [{"name": "e2", "type": "E"}, {"name": "x", "type": "long"}],
                },
            },
        },
        {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
        {"name": "u", "type": ["null", "double", "string", "F4", "Item", "boolean"]},
        {"name": "added", "type": {"type": "array", "items": "int"}, "default": [1, 2]},
        {"name": "opt", "type": ["null", "long"], "default": None},
    ],
}

_text = st.text(st.characters(codec="utf-8"), max_size=70)
_item = st.fixed_dictionaries({"x": st.integers(-(1 << 31), (1 << 31) - 1), "e2": st.sampled_from("ABC")})
_all_types_values = st.fixed_dictionaries(
    {
        "n": st.none(),
        "b": st.booleans(),
        "i": st.integers(-(1 << 31), (1 << 31) - 1),
        "l": st.integers(-(1 << 63), (1 << 63) - 1),
        "f": st.floats(width=32, allow_nan=False),
        "d": st.floats(allow_nan=False),
        "by": st.binary(max_size=70),
        "s": _text,
        "fx": st.binary(min_size=4, max_size=4),
        "e": st.sampled_from("ABC"),
        "a": st.lists(_item, max_size=3),
        "m": st.dictionaries(_text, st.none() | st.floats(allow_nan=False) | _text, max_size=3),
        "u": st.none() | st.integers(-(1 << 63), (1 << 63) - 1) | _text | st.binary(min_size=4, max_size=4) | _item,
        "ts": st.integers(-62_135_596_800_000, 253_402_300_799_999),  # what datetime can hold
        "nested": st.lists(st.dictionaries(_text, st.lists(_text, max_size=2), max_size=2), max_size=2),
        "opt": st.none() | st.integers(-5, 5),
    }
)


_ALL = {
    "encode": compile_encoder(ALL_TYPES),
    "decode": compile_decoder(ALL_TYPES),
    "decode_logical": compile_decoder(ALL_TYPES, logical_types=True),
    "resolve": compile_decoder(ALL_TYPES, ALL_TYPES_READER),
    "fa_writer": fastavro.parse_schema(copy.deepcopy(ALL_TYPES)),
    "fa_raw": fastavro.parse_schema(_strip_logical(ALL_TYPES)),
    "fa_reader": fastavro.parse_schema(_strip_logical(ALL_TYPES_READER)),
}


@FAST
@given(_all_types_values)
def test_codegen_matches_fastavro_on_every_type(value: dict[str, Any]):
    out = bytearray()
    _ALL["encode"](value, out)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _ALL["fa_writer"], value)
    body = buf.getvalue()
    assert bytes(out) == body
    assert _ALL["decode"](body, 0) == fastavro.schemaless_reader(io.BytesIO(body), _ALL["fa_raw"])
    assert _ALL["decode_logical"](body, 0) == fastavro.schemaless_reader(io.BytesIO(body), _ALL["fa_writer"])
    resolved = _ALL["resolve"](body, 0)
    assert resolved == fastavro.schemaless_reader(io.BytesIO(body), _ALL["fa_raw"], _ALL["fa_reader"])
    assert list(resolved) == [f["name"] for f in ALL_TYPES_READER["fields"]]


def test_codegen_decodes_non_minimal_varints_like_fastavro():
    schema = {"type": "record", "name": "R", "fields": [{"name": "x", "type": "long"}]}
    body = b"\x84\x80\x80\x00"  # 2, padded with continuation bytes
    assert compile_decoder(schema)(body, 0) == _fastavro_read(schema, body) == {"x": 2}


def test_explain_names_the_first_problem():
    assert explain(ALL_TYPES, {"n": None}) == "b: missing (required, no default)"
    assert explain(current_schema("CheckedIn"), {**DOSE, "event_type": "CheckedIn", "payload": {"site_id": 3}}) == (
        "payload.site_id: expected string, got int"
    )
    assert (
        explain(current_schema("CheckedIn"), {**DOSE, "event_type": "CheckedIn", "payload": {"site_id": "S"}}) is None
    )


FOREIGN = {
    "type": "record",
    "name": "Invoice",
    "namespace": "other.team",
    "fields": [
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "note", "type": {"type": "string", "logicalType": "made-up"}},  # unknown: ignored
    ],
}


def test_foreign_schemas_are_refused_and_the_fallback_decoder_still_works():
    from decimal import Decimal

    from schemas.codec import _fastavro_decoder

    body = _fastavro_body(FOREIGN, {"amount": Decimal("12.34"), "note": "n"})
    msg = b"\x00\x00\x00\x01\xf4" + body  # id 500
    # Only the catalog's events are decoded: a foreign writer schema is never compiled.
    with pytest.raises(CodecError, match="^schema id 500: refused writer schema: it writes 'other.team.Invoice'"):
        Codec.with_known_schemas({500: FOREIGN}).decode(msg)
    # What a catalog schema the generator cannot handle would fall back to:
    assert _fastavro_decoder(FOREIGN, None, False)(msg, 5) == {"amount": (1234).to_bytes(2, "big"), "note": "n"}
    assert _fastavro_decoder(FOREIGN, None, True)(msg, 5) == {"amount": Decimal("12.34"), "note": "n"}
    with pytest.raises(CorruptData, match="trailing"):
        _fastavro_decoder(FOREIGN, None, False)(msg + b"\x00", 5)

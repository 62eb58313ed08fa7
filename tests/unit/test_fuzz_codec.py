"""Fuzzing without services: the codec and the validators answer any input with a value or a named error."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import catalog
from schemas.codec import Codec, CodecError
from schemas.models import validate_event
from streams.routing import Router
from tests.stack.test_fuzz import broken_events
from tests.strategies import avro_records

FAST = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
KNOWN = {i + 1: catalog.current_schema(t) for i, t in enumerate(catalog.EVENT_TYPES)}
CODEC = Codec.with_known_schemas(KNOWN)


@settings(FAST, max_examples=3000)
@given(st.binary(max_size=5).map(lambda h: b"\x00\x00\x00\x00" + h[:1]) | st.binary(max_size=300), st.binary())
def test_any_bytes_decode_to_a_record_or_a_codec_error(header, body):
    for data in (header + body, b"\x00\x00\x00\x00" + bytes([len(body) % 9]) + body):
        [result] = CODEC.decode_many_lenient([data])
        assert isinstance(result, (dict, CodecError))
        good, bad = Router(CODEC).split([data])
        assert len(good) + len(bad) == 1
        assert all(reason.split(":")[0] in ("undecodable", "invalid") for _, reason in bad)


@settings(FAST, max_examples=1000)
@given(avro_records(), st.integers(0, 10_000), st.integers(0, 255))
def test_a_valid_message_with_a_byte_changed_still_gets_an_answer(pair, where, value):
    data = bytearray(CODEC.encode(*pair))
    data[where % len(data)] = value
    good, bad = Router(CODEC).split([bytes(data)])
    assert len(good) + len(bad) == 1


@settings(FAST, max_examples=2000)
@given(broken_events())
def test_the_models_answer_any_json_with_named_errors(obj):
    event, errors = validate_event(obj)
    assert (event is None) == bool(errors)
    assert all(": " in e for e in errors), errors

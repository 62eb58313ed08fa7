"""The gateway's fast path agrees with the contract's validator (schemas.models).

It may decline an event (None: the full validator decides), but whatever it accepts
the validator accepts too, and it makes exactly the same Avro record."""

from __future__ import annotations

import copy
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from producers.pseudonym import Pseudonymiser, checked_edge_record, edge_record
from schemas.fastpath import PAYLOADS, fast_record
from schemas.models import PAYLOAD_MODELS, to_avro_record, validate_event
from tests.strategies import broken_events, events, invalid_events, subject_ids

SUBJECT = "ab" * 32


def _agrees(ev) -> bool:
    """Whether fast_record took ev; fails the test if it took it differently."""
    before = copy.deepcopy(ev)
    fast = fast_record(ev)
    assert ev == before, "the fast path must not change its input"
    if fast is None:
        return False
    validated, errors = validate_event(ev)
    assert not errors, f"the fast path accepted what the validator refuses: {errors}"
    record, citizen_id = fast
    assert citizen_id == validated.payload.get("citizen_id")
    subject = SUBJECT if citizen_id is not None else None
    assert {**record, "subject_id": subject} == to_avro_record(validated, subject)
    return True


def test_it_covers_every_payload_field():
    for event_type, model in PAYLOAD_MODELS.items():
        assert set(PAYLOADS[event_type]) == set(model.model_fields) - {"citizen_id"}, event_type


@settings(max_examples=600, deadline=None)
@given(events())
def test_valid_events_take_it_and_make_the_same_record(ev):
    assert _agrees(ev), f"declined a valid event in the usual spelling: {ev}"


@settings(max_examples=600, deadline=None)
@given(invalid_events())
def test_it_declines_every_invalid_event(pair):
    _, ev = pair
    assert fast_record(ev) is None
    assert validate_event(ev)[1]


@settings(max_examples=600, deadline=None)
@given(broken_events())
def test_anything_it_takes_the_validator_takes_the_same_way(ev):
    _agrees(ev)


@settings(max_examples=200, deadline=None)
@given(events(), st.sampled_from(["upper-uuid", "t-separator", "space-separator", "nanoseconds", "lower-z"]))
def test_other_spellings_are_declined_or_agree(ev, spelling):
    ev = copy.deepcopy(ev)
    ts = ev["occurred_at"]
    if spelling == "upper-uuid":
        ev["event_id"] = ev["event_id"].upper()
    elif spelling == "t-separator":
        ev["occurred_at"] = ts.replace("T", "t")
    elif spelling == "space-separator":
        ev["occurred_at"] = ts.replace("T", " ")
    elif spelling == "nanoseconds" and ts[19:20] == ".":
        ev["occurred_at"] = ts.replace(".", ".999999", 1)
    elif spelling == "lower-z":
        ev["occurred_at"] = ts.replace("Z", "z")
    _agrees(ev)


@settings(max_examples=100, deadline=None)
@given(events(), subject_ids)
def test_checked_edge_record_is_the_edge_record_either_way(ev, secret):
    ps = Pseudonymiser(secret)
    record, errors = checked_edge_record(ev, ps)
    validated, _ = validate_event(ev)
    assert not errors and record == edge_record(validated, ps)


def test_a_problem_is_named_by_the_validator():
    ev = {
        "event_id": str(uuid.uuid4()),
        "event_type": "DoseAdministered",
        "occurred_at": "2021-08-10T09:30:00+07:00",
        "province_code": "79",
        "source": "site-79-001",
        "payload": {
            "citizen_id": "079123456789",
            "site_id": "HCM-001",
            "vaccine": "astrazeneca",
            "lot_number": "AB\x00C",
            "dose_number": 1,
        },
    }
    assert fast_record(ev) is None
    record, errors = checked_edge_record(ev, Pseudonymiser("s" * 32))
    assert record is None
    assert errors == ["payload.lot_number: must not contain control or bidirectional-override characters (U+0000 at 2)"]

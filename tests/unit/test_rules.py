"""The rules with one home: identifiers (schemas.ids) and how an event counts (projections.counting)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections.counting import ADVERSE, ALLOCATION, DECLARATION, DOSE, REGISTRATION, figure_view, micros
from schemas.ids import is_subject_id, is_uuid, uuid_bytes


@given(st.uuids())
def test_every_uuid_in_either_case_is_its_canonical_text_and_bytes(u: uuid.UUID) -> None:
    for text in (str(u), str(u).upper()):
        assert uuid_bytes(text) == (str(u), u.bytes)
        assert is_uuid(text)


@given(st.text(max_size=40))
def test_anything_else_is_refused(text: str) -> None:
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        canonical = None
    if canonical is None or len(text) != 36:  # uuid.UUID also takes braces, urn: and undashed forms
        assert not is_uuid(text)
        with pytest.raises(ValueError, match="not a UUID"):
            uuid_bytes(text)


def test_whitespace_between_hex_pairs_is_not_a_uuid() -> None:
    assert not is_uuid("12345678-1234-1234-1234-1234567 9abc")
    assert not is_uuid(b"12345678-1234-1234-1234-123456789abc")


def test_subject_ids_are_64_lower_hex_digits() -> None:
    assert is_subject_id("a" * 64)
    assert not is_subject_id("A" * 64)
    assert not is_subject_id("a" * 63)
    assert not is_subject_id("079123456789")
    assert not is_subject_id(None)


def _event(event_type: str, payload: dict, **envelope) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "province_code": "79",
        "occurred_at": 1_624_000_000_123,
        "subject_id": "f" * 64,
        "payload": payload,
    } | envelope


@pytest.mark.parametrize(
    ("event", "kind", "flag", "amount", "vaccine", "number"),
    [
        (_event("DoseAdministered", {"dose_number": 2, "vaccine": "AZ", "site_id": "s"}), DOSE, 0, 0, "AZ", 2),
        (_event("HealthDeclarationSubmitted", {"symptoms": ["cough"]}), DECLARATION, 1, 0, "", 0),
        (_event("HealthDeclarationSubmitted", {"symptoms": []}), DECLARATION, 0, 0, "", 0),
        (_event("VaccinationRegistered", {}), REGISTRATION, 0, 0, "", 0),
        (_event("AdverseEventReported", {"severity": "serious"}), ADVERSE, 1, 0, "", 0),
        (_event("AdverseEventReported", {"severity": "mild"}), ADVERSE, 0, 0, "", 0),
        (
            _event("VaccineAllocated", {"doses": 5000, "vaccine": "PF", "allocation_id": "a", "recipient": "r"}),
            ALLOCATION,
            0,
            5000,
            "PF",
            0,
        ),
        (_event("CheckedIn", {"site_id": "s"}), 0, 0, 0, "", 0),
    ],
)
def test_what_each_event_contributes(event: dict, kind: int, flag: int, amount: int, vaccine: str, number: int) -> None:
    view = figure_view(event)
    assert view[0] == event["event_id"] and view[1] == uuid.UUID(event["event_id"]).bytes
    assert view[2] == kind and view[3] is None
    assert view[5] == "79" and view[6] == 1_624_000_000_123_000
    assert (view[8], view[9], view[10], view[11]) == (vaccine, number, flag, amount)


def test_a_void_names_its_target() -> None:
    target = uuid.uuid4()
    view = figure_view(_event("RecordVoided", {"voided_event_id": str(target).upper()}))
    assert view[2] == 0 and view[3] == str(target) and view[4] == target.bytes


@pytest.mark.parametrize(
    "event",
    [
        _event("DoseAdministered", {"dose_number": "2", "vaccine": "AZ", "site_id": "s"}),
        _event("DoseAdministered", {"dose_number": 1, "vaccine": "", "site_id": "s"}),
        _event("DoseAdministered", {"dose_number": 1, "vaccine": "AZ"}),
        _event("DoseAdministered", {"dose_number": 1, "vaccine": "AZ", "site_id": "s"}, subject_id=None),
        _event("VaccineAllocated", {"doses": 1.5, "vaccine": "PF", "allocation_id": "a", "recipient": "r"}),
        _event("VaccinationRegistered", {}, province_code=""),
        _event("VaccinationRegistered", {}, event_id="not-a-uuid"),
        _event("RecordVoided", {"voided_event_id": "x"}),
        _event("CheckedIn", {}, occurred_at=datetime(2021, 6, 19)),  # no time zone
    ],
)
def test_an_unreadable_event_raises_what_both_stores_catch(event: dict) -> None:
    with pytest.raises((KeyError, TypeError, ValueError, AttributeError)):
        figure_view(event)


def test_occurred_at_as_milliseconds_or_an_aware_datetime_is_the_same_instant() -> None:
    t = datetime(2021, 6, 19, 1, 2, 3, 123000, tzinfo=UTC)
    assert micros(int(t.timestamp() * 1000)) == micros(t) == int(t.timestamp()) * 1_000_000 + 123_000

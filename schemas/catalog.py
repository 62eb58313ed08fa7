"""The Avro event catalog: one self-contained record schema per event type.

The sources are the files in ``schemas/avro``: ``envelope.avsc`` holds the
fields every event shares and ``<Type>.avsc`` holds the payload record of one
type. The schema of type ``T`` is the record ``vn.nhdp.events.T`` made of the
envelope fields followed by a ``payload`` field of ``T``'s payload record.
Composition keeps each registered schema self-contained, so a stock Confluent
deserializer needs nothing but the schema id.

Every version ever released is frozen under ``schemas/released/<Type>/vN.avsc``.
CI (tests/unit/test_schemas.py) checks that the current schema equals the latest
released one and can read every released version (BACKWARD_TRANSITIVE).
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

NAMESPACE = "vn.nhdp.events"
TOPIC = "health.events"

AVRO_DIR = Path(__file__).resolve().parent / "avro"
RELEASED_DIR = Path(__file__).resolve().parent / "released"

EVENT_TYPES: tuple[str, ...] = (
    "HealthDeclarationSubmitted",
    "VaccinationRegistered",
    "AppointmentScheduled",
    "CheckedIn",
    "DoseAdministered",
    "AdverseEventReported",
    "VaccineAllocated",
    "RecordVoided",
)

# Types whose payload names a citizen; only these carry a subject_id.
CITIZEN_EVENT_TYPES: frozenset[str] = frozenset(EVENT_TYPES) - {"VaccineAllocated", "RecordVoided"}

_DOCS = {
    "HealthDeclarationSubmitted": "A citizen declared their health.",
    "VaccinationRegistered": "A citizen registered for vaccination.",
    "AppointmentScheduled": "A citizen received a site and time slot for a dose.",
    "CheckedIn": "A citizen's QR code was scanned at a site.",
    "DoseAdministered": "A vaccine dose was given to a citizen.",
    "AdverseEventReported": "An adverse event following immunisation was reported.",
    "VaccineAllocated": "Doses were allocated to a recipient.",
    "RecordVoided": "An earlier event was entered in error; it counts as if it never happened.",
}

_VERSION_FILE = re.compile(r"^v([1-9][0-9]*)\.avsc$")


class UnknownEventType(KeyError):
    """The name is not one of EVENT_TYPES."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _check(event_type: str) -> None:
    if event_type not in _DOCS:
        raise UnknownEventType(f"unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}")


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def record_name(event_type: str) -> str:
    """Full Avro name of the event's record, e.g. ``vn.nhdp.events.CheckedIn``."""
    _check(event_type)
    return f"{NAMESPACE}.{event_type}"


def event_type_of(full_name: str) -> str | None:
    """Inverse of record_name; None when the name is not one of ours."""
    prefix, _, name = full_name.rpartition(".")
    return name if prefix == NAMESPACE and name in _DOCS else None


def subject_for(event_type: str) -> str:
    """Registry subject (TopicRecordNameStrategy on ``health.events``).

    Province topics carry the same bytes, so they reuse these subjects and ids.
    """
    return f"{TOPIC}-{record_name(event_type)}"


@cache
def _composed(event_type: str) -> dict[str, Any]:
    _check(event_type)
    envelope = _load(AVRO_DIR / "envelope.avsc")
    payload = _load(AVRO_DIR / f"{event_type}.avsc")
    return {
        "type": "record",
        "name": event_type,
        "namespace": NAMESPACE,
        "doc": _DOCS[event_type],
        "fields": [*envelope["fields"], {"name": "payload", "type": payload}],
    }


def current_schema(event_type: str) -> dict[str, Any]:
    """The composed schema of the event type as a JSON-able dict (a fresh copy)."""
    return copy.deepcopy(_composed(event_type))


@cache
def parsed_schema(event_type: str) -> dict[str, Any]:
    """fastavro-parsed current schema. Cached and shared: do not mutate."""
    return fastavro.parse_schema(current_schema(event_type))


def released_schemas(event_type: str) -> list[tuple[int, dict[str, Any]]]:
    """Every released version of the type as ``(version, schema)``, oldest first."""
    _check(event_type)
    folder = RELEASED_DIR / event_type
    found = []
    for path in folder.glob("v*.avsc") if folder.is_dir() else ():
        m = _VERSION_FILE.match(path.name)
        if m:
            found.append((int(m.group(1)), _load(path)))
    return sorted(found, key=lambda vs: vs[0])


def canonical(schema: Any) -> str:
    """Canonical JSON text of a schema: sorted keys, no whitespace.

    Two schemas are the same registered schema iff their canonical texts are
    equal (the registry deduplicates on it). Docs and defaults are kept.
    """
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compatibility_problems(reader: dict[str, Any], writer: dict[str, Any]) -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader``; [] if it can.

    Uses the Apache ``avro`` package's ReaderWriterCompatibilityChecker (the
    Java rules). BACKWARD_TRANSITIVE for a new schema S means
    ``compatibility_problems(S, old) == []`` for every released ``old``.
    """

    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer))
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    # The checker reports sets of kinds, messages and locations that do not pair up.
    kinds = sorted({k.value for k in result.incompatibilities})
    where = sorted(loc for loc in result.locations if loc != "/") or ["/"]
    return [f"{kind}: {', '.join(sorted(result.messages))} (at {', '.join(where)})" for kind in kinds] or [
        "incompatible"
    ]

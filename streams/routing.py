"""Which messages the projections may apply: decode, then the semantic checks.

Shared by the stream worker (a failure goes to the DLQ) and the ClickHouse
sink's decoder processes (a failure is skipped: the worker dead-letters it).
Kept apart from streams.worker so that those processes need not import Faust.
"""

from __future__ import annotations

from typing import Any

from schemas.bounds import record_problem
from schemas.catalog import CITIZEN_EVENT_TYPES
from schemas.codec import Codec, CodecError
from schemas.ids import is_uuid
from schemas.reference import provinces


def semantic_error(event: dict[str, Any]) -> str | None:
    """Checks a decodable event must still pass; the gateway enforces them too.

    The same for every producer: an internal one that writes to Kafka directly
    gets its event dead-lettered here, never a partition stuck behind it."""
    et = event.get("event_type")
    event_id = event.get("event_id")
    # Avro types a uuid only as a string: check it here, before the event is
    # copied to a province topic, not first in the projector.
    if not isinstance(event_id, str) or not is_uuid(event_id):
        return f"event_id: not a UUID: {str(event_id)[:60]!r}"
    payload = event["payload"]
    for name in ("voided_event_id", "dose_event_id"):
        value = payload.get(name)
        if value is not None and not is_uuid(value):
            return f"payload.{name}: not a UUID: {value[:60]!r}"
    if event.get("province_code") not in _PROVINCES:
        return f"province_code: unknown province {event.get('province_code')!r}"
    if et in CITIZEN_EVENT_TYPES and not event.get("subject_id"):
        return f"subject_id: missing on a {et}"
    if et == "RecordVoided" and payload.get("voided_event_id") == event_id:
        return "payload.voided_event_id: an event cannot void itself"
    # Lengths, characters, ranges: what the stores cannot hold (schemas.bounds says why).
    return record_problem(event)


_PROVINCES = frozenset(provinces())  # run once per event by every worker and sink decoder


class Router:
    """Decide, per message, DLQ or projection; pure apart from the codec's schema cache."""

    def __init__(self, codec: Codec):
        self.codec = codec

    def split(self, values: list[bytes]) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
        good, bad = [], []
        for i, result in enumerate(self.codec.decode_many_lenient(values)):
            if isinstance(result, CodecError):
                bad.append((i, f"undecodable: {result}"))
                continue
            reason = semantic_error(result)
            if reason:
                bad.append((i, f"invalid: {reason}"))
            else:
                good.append((i, result))
        return good, bad

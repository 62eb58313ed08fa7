"""The bounds of every value an event may carry (DESIGN §2, "Bounds"), in one place.

Two callers check them: the gateway's and SDK's models (schemas.models, on the
JSON a producer posts) and the router (streams.routing, on every decoded record,
whoever produced it). So an event that slipped past the edge, produced straight
to Kafka, is dead-lettered with the same reason instead of reaching a store that
cannot hold it: PostgreSQL text refuses NUL, its bigint counters overflow,
ClickHouse's DateTime cannot hold 1900.

The checks on a decoded record run once per event in every worker and sink
decoder, so they are a few dict lookups and one regex search per string. They
never read the clock: a replay years later, or a sink behind the worker, must
refuse exactly the events the live worker refused. So their upper bounds on time
are fixed (LATEST); "not 5 minutes ahead", "this year" and "two years ahead" are
the edge's, which checks the event once, when it arrives.
"""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime
from typing import Any

from schemas.ids import is_subject_id

# C0 and C1 controls (NUL included), DEL, the bidirectional embeddings, overrides and
# isolates (text that reads differently than it sorts), and lone surrogates (not UTF-8).
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
TRACE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

IDENTIFIER_MAX = 128  # ids of sites, lots, appointments, allocations, vaccinators; free-text symptoms
TEXT_MAX = 500  # a void's reason
SOURCE_MAX = 64
TRACE_ID_MAX = 128
SYMPTOMS_MAX = 32  # entries of a symptom list
MAX_DOSES = 10_000_000  # one allocation: 100x the largest delivery of 2021; keeps sums far from overflow
DOSE_NUMBER = (1, 5)
BIRTH_YEAR_MIN = 1900
FUTURE_SKEW_S = 300  # occurred_at may run this far ahead of the server clock
SLOT_AHEAD_S = 2 * 366 * 86400  # an appointment is booked at most two years ahead
HCM_OFFSET_S = 7 * 3600  # Asia/Ho_Chi_Minh has no DST: "this year" is the year there
LATEST_MS = 4_102_444_800_000  # 2100-01-01T00:00Z: the router's fixed upper bound (ClickHouse DateTime ends in 2106)
LATEST_YEAR = 2100

# Per payload field name (the catalog uses each name with one meaning in every type).
_TEXT_LIMITS = {"reason": TEXT_MAX}
_LIST_LIMITS = {"symptoms": SYMPTOMS_MAX}
_TIMESTAMPS = ("slot_start", "slot_end")


@functools.cache
def epoch_ms() -> int:
    """The platform epoch (NHDP_PLATFORM_EPOCH, default 2020-01-01) in UTC milliseconds."""
    from infra.settings import get_settings  # the one home of settings; read once per process

    day = get_settings().platform_epoch
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1000


def epoch_text() -> str:
    return datetime.fromtimestamp(epoch_ms() / 1000, UTC).date().isoformat()


def this_year() -> int:
    return time.gmtime(time.time() + HCM_OFFSET_S).tm_year


def text_problem(value: str, limit: int) -> str | None:
    """Why this string may not be stored, or None."""
    if not 1 <= len(value) <= limit:
        return f"must be 1 to {limit} characters long, got {len(value)}"
    bad = _FORBIDDEN.search(value)
    if bad is not None:
        return (
            f"must not contain control or bidirectional-override characters (U+{ord(bad.group()):04X} at {bad.start()})"
        )
    return None


def _time_problem(ms: int, now_ms: int | None, ahead_s: int, too_far: str) -> str | None:
    """now_ms None: the router's clock-free check (up to LATEST_MS); else the edge's (now + ahead_s)."""
    if ms < epoch_ms():
        return f"is before the platform epoch {epoch_text()}"
    if now_ms is None:
        return "is after 2100" if ms >= LATEST_MS else None
    return too_far if ms > now_ms + ahead_s * 1000 else None


def occurred_at_problem(ms: int, now_ms: int | None = None) -> str | None:
    return _time_problem(ms, now_ms, FUTURE_SKEW_S, "is in the future (more than 5 minutes ahead of the server clock)")


def slot_problem(ms: int, now_ms: int | None = None) -> str | None:
    return _time_problem(ms, now_ms, SLOT_AHEAD_S, "is more than two years ahead")


def now_ms() -> int:
    return int(time.time() * 1000)


def int_problem(name: str, value: int, edge: bool = True) -> str | None:
    """Bounds of the payload's integers, by field name (edge: with "this year", which the router has not)."""
    if name == "doses":
        lo, hi = 1, MAX_DOSES
    elif name == "dose_number":
        lo, hi = DOSE_NUMBER
    elif name == "birth_year":
        lo, hi = BIRTH_YEAR_MIN, this_year() if edge else LATEST_YEAR
    else:
        return None
    if not lo <= value <= hi:
        return f"must be between {lo} and {hi}, got {value}"
    return None


def record_problem(event: dict[str, Any], now_ms: int | None = None) -> str | None:
    """The first bound a decoded Avro record breaks, as "field: reason"; None if it keeps them all.

    now_ms None (the router): only the clock-free bounds. The SDK passes the time."""
    occurred = event.get("occurred_at")
    if isinstance(occurred, int):  # datetimes (a logical-types codec) are the caller's to check
        problem = occurred_at_problem(occurred, now_ms)
        if problem:
            return f"occurred_at: {problem}"
    source = event.get("source")
    if isinstance(source, str):
        problem = text_problem(source, SOURCE_MAX)
        if problem:
            return f"source: {problem}"
    trace_id = event.get("trace_id")
    if trace_id is not None and not (isinstance(trace_id, str) and TRACE_ID.fullmatch(trace_id)):
        return f"trace_id: must be 1 to {TRACE_ID_MAX} characters of A-Z a-z 0-9 . _ : -"
    subject_id = event.get("subject_id")
    if subject_id is not None and not is_subject_id(subject_id):
        return "subject_id: must be 64 lower-case hex digits (an HMAC-SHA256 pseudonym)"
    payload = event.get("payload")
    if not isinstance(payload, dict):
        return None
    for name, value in payload.items():
        if isinstance(value, str):
            problem = text_problem(value, _TEXT_LIMITS.get(name, IDENTIFIER_MAX))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            problem = (
                slot_problem(value, now_ms) if name in _TIMESTAMPS else int_problem(name, value, now_ms is not None)
            )
        elif isinstance(value, list):
            problem = list_problem(name, value)
        else:
            continue
        if problem:
            return f"payload.{name}: {problem}"
    return None


def list_problem(name: str, items: list[Any]) -> str | None:
    limit = _LIST_LIMITS.get(name, SYMPTOMS_MAX)
    if len(items) > limit:
        return f"must have at most {limit} entries, got {len(items)}"
    for i, item in enumerate(items):
        if isinstance(item, str):
            problem = text_problem(item, IDENTIFIER_MAX)
            if problem:
                return f"{i}: {problem}"
    return None

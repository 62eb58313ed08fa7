"""Permanent or transient: the one rule for what a failed batch means (DESIGN §7).

A store can refuse a batch for two reasons. A dependency that is down, slow or
restarting (connection refused, timeout, deadlock, a server going away) will
accept the same batch later: the caller backs off and retries, and the
partition does not advance. A value the store cannot hold (a numeric overflow, a
date out of range, an invalid byte sequence) will be refused forever: the caller
isolates the event at fault by halving the batch, dead-letters it with the
store's reason, and applies the rest. Anything not known to be a data error
counts as transient, so a bug or an outage costs time, never events. And if more
than MAX_REJECTS events of one batch are refused, the cause is not in the events
(a schema out of step, a bug in shaping): the rest of the batch waits as for an
outage instead of being dead-lettered one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from projections.clickhouse.store import AnalyticsStoreError
from projections.postgres.projector import InvalidEvent

# ClickHouse error codes that name a value, not the server: the same rows fail every time.
CLICKHOUSE_DATA_ERRORS = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    }
)


def is_permanent(exc: BaseException) -> bool:
    """True when retrying the same batch can never succeed because of a value in it."""
    if isinstance(exc, InvalidEvent):
        return True
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):  # SQLSTATE classes 22 and 23
        return True
    if isinstance(exc, AnalyticsStoreError):
        return not exc.retryable and exc.code in CLICKHOUSE_DATA_ERRORS
    return False


def reason_of(exc: BaseException) -> str:
    """The DLQ reason for an event a store refused: the store's words, bounded."""
    if isinstance(exc, InvalidEvent):
        return f"invalid: {exc.reason}"
    text = " ".join(str(exc).split())
    return f"unstorable: {type(exc).__name__}: {text[:300]}"


Entry = tuple[str, int, int, Any]  # (topic, partition, offset, event or None)
MAX_REJECTS = 20


def apply_isolating(
    apply: Callable[[Sequence[Entry]], Any],
    batch: Sequence[Entry],
    reject: Callable[[Entry, str], None],
    wait: Callable[[BaseException], None],
) -> int:
    """apply(batch) until it is all applied; returns how many events were rejected.

    A permanent error halves the batch, in log order, until the event at fault
    is alone; reject(entry, reason) dead-letters it and it is applied as None,
    so its offset is still recorded. A transient error calls wait(exc), which
    sleeps (or raises to give up), and the same part is tried again. Each part
    commits on its own, in order, so a restart resumes after the last one.
    """
    pending = [list(batch)]  # a stack: the earlier half is always on top
    rejected = 0
    while pending:
        part = pending.pop()
        try:
            apply(part)
            continue
        except Exception as exc:
            live = [i for i, entry in enumerate(part) if entry[3] is not None]
            permanent = is_permanent(exc) and (isinstance(exc, InvalidEvent) or rejected < MAX_REJECTS)
            at = []
            if isinstance(exc, InvalidEvent):
                at = [i for i in live if (part[i][1], part[i][2]) == (exc.partition, exc.offset)]
            if permanent and not at and len(live) > 1:
                middle = live[len(live) // 2]
                pending += [part[middle:], part[:middle]]
                continue
            if permanent and not at:
                at = live
            if not at:  # a dependency, or nothing left to blame: the same part again, later
                wait(exc)
                pending.append(part)
                continue
            reject(part[at[0]], reason_of(exc))
            part[at[0]] = (*part[at[0]][:3], None)
            rejected += 1
            pending.append(part)
    return rejected

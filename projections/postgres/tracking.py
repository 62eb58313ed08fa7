"""The tracking record, read in one place: the last offset of each partition the projections applied.

`proj.tracking` is written only by the projector, in the transaction of the
batch it records (projections.postgres.projector). Everything that asks how
far the projections are (the worker's resume, replay's cut, the sink's
`verify`, the API's lag, tests and benchmarks) reads it through `applied`.
"""

from __future__ import annotations

from typing import Any

from infra.settings import Settings
from schemas.log import end_offsets
from schemas.topics import PROJECTOR_GROUP, TOPIC_DLQ, TOPIC_EVENTS

LAG_TOPICS = (TOPIC_EVENTS, TOPIC_DLQ)
_APPLIED_SQL = 'SELECT partition, "offset" FROM {ns}.tracking WHERE consumer_group = %s AND topic = %s'


def applied(
    conn: Any, namespace: str = "proj", group: str = PROJECTOR_GROUP, topic: str = TOPIC_EVENTS
) -> dict[int, int]:
    """{partition: last applied offset}; a partition with nothing applied is absent.

    `namespace` is a schema name the caller has checked (proj, replay_<name>)."""
    rows = conn.execute(_APPLIED_SQL.format(ns=namespace), (group, topic)).fetchall()
    return {p: o for p, o in rows}


def next_offsets(conn: Any, namespace: str = "proj", group: str = PROJECTOR_GROUP) -> dict[int, int]:
    """{partition: the next offset to apply}, as Kafka counts positions."""
    return {p: o + 1 for p, o in applied(conn, namespace, group).items()}


def consumer_lag(
    settings: Settings, conn: Any, namespace: str = "proj", group: str = PROJECTOR_GROUP
) -> tuple[dict[int, int], int, int]:
    """(lag per partition, messages applied, DLQ size): Kafka's end offsets against the tracking record."""
    done = applied(conn, namespace, group)  # before the ends, so that no lag comes out negative
    return lag_of(end_offsets(settings, LAG_TOPICS), done)


def lag_of(ends: dict[tuple[str, int], int], done: dict[int, int]) -> tuple[dict[int, int], int, int]:
    """consumer_lag's answer from the end offsets of LAG_TOPICS and the tracking record."""
    events = {p: off for (t, p), off in ends.items() if t == TOPIC_EVENTS}
    lag = {p: end - (done.get(p, -1) + 1) for p, end in events.items()}
    dlq = sum(off for (t, _), off in ends.items() if t == TOPIC_DLQ)
    return lag, sum(done.get(p, -1) + 1 for p in events), dlq

"""A batch of decoded events → the rows of events, event_index and voids, and the figure view; people points of a subject's doses."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from projections.clickhouse.schema import FULLY, NEVER_MS, PEOPLE
from projections.counting import READ_ERRORS, figure_view
from schemas.reference import provinces

log = logging.getLogger("nhdp.sink")

REGIONS = {code: p.region for code, p in provinces().items()}  # one map for the sink and its decoders

EVENT_COLUMNS = [
    "event_id",
    "event_type",
    "kind",
    "occurred_at",
    "occurred_ms",
    "province_code",
    "region",
    "source",
    "subject_id",
    "flag",
    "vaccine",
    "dose_number",
    "site_id",
    "lot_number",
    "severity",
    "doses",
    "recipient",
    "voided_event_id",
    "kafka_partition",
    "kafka_offset",
]


INDEX_COLUMNS = [
    "event_id",
    "kind",
    "occurred_ms",
    "province_code",
    "subject_id",
    "vaccine",
    "dose_number",
    "flag",
    "amount",
]


VOID_COLUMNS = ["target_id", "void_id", "occurred_ms", "province_code"]


SUBJECT_COLUMNS = [
    "subject_id",
    "version",
    "dose_ids",
    "dose_ms",
    "dose_province",
    "dose_janssen",
    "dose_void_ms",
    "ever_ms",
    "ever_kind",
    "ever_province",
    "ever_delta",
]


POINT_COLUMNS = [
    "hour",
    "key_id",
    "kind",
    "t_ms",
    "province_code",
    "delta",
    "vaccine",
    "dose_number",
    "flag",
    "amount",
    "live",
    "version",
]


class Fact(NamedTuple):
    """The figure view of a counted event (projections.counting.figure_view)."""

    kind: int
    t_ms: int
    province: str
    subject: str | None
    vaccine: str
    dose_number: int
    flag: int
    amount: int


_PEOPLE_FULLY = tuple(sorted([PEOPLE, FULLY]))  # a subject's `ever` kinds of one time, in the order sorted() gives


# A point's identity and content: (t_ms, kind, province, delta); subjects only have these.
Point = tuple[int, int, str, int]


def timeline(doses: Mapping[str, Sequence]) -> set[Point]:
    """The people points of one subject, from its doses {event_id: (t_ms, province, janssen, void_ms)}.

    A dose counts at T iff t < T and not void < T, i.e. on T in (t, void]. The
    state at T is (province of the earliest counted dose by (t, event_id),
    fully = at least 2 counted doses or a counted janssen); it changes only
    right after a dose time or a void time c, so a point at c applies to every
    T > c, which is how queries read it (t_ms < cut).
    """
    if all(d[3] >= NEVER_MS for d in doses.values()):
        # Nothing voided (nearly every subject): counted from the earliest dose on, in its
        # province; fully from the second dose or the first janssen, whichever comes first.
        ordered = sorted(doses.items(), key=lambda kv: (kv[1][0], kv[0]))
        if not ordered:
            return set()
        t0, province = ordered[0][1][0], ordered[0][1][1]
        points = {(t0, PEOPLE, province, 1)}
        fully = [d[0] for _, d in ordered if d[2]]
        if len(ordered) >= 2:
            fully.append(ordered[1][1][0])
        if fully:
            points.add((min(fully), FULLY, province, 1))
        return points
    times = sorted({d[0] for d in doses.values()} | {d[3] for d in doses.values() if d[3] < NEVER_MS})
    points = set()
    prev_p: str | None = None
    prev_f: str | None = None
    ordered = sorted(doses.items(), key=lambda kv: (kv[1][0], kv[0]))
    for c in times:
        alive = [d for _, d in ordered if d[0] <= c < d[3]]
        if alive:
            province = alive[0][1]
            fully = province if (len(alive) >= 2 or any(d[2] for d in alive)) else None
        else:
            province = fully = None
        if province != prev_p:
            if prev_p is not None:
                points.add((c, PEOPLE, prev_p, -1))
            if province is not None:
                points.add((c, PEOPLE, province, 1))
            prev_p = province
        if fully != prev_f:
            if prev_f is not None:
                points.add((c, FULLY, prev_f, -1))
            if fully is not None:
                points.add((c, FULLY, fully, 1))
            prev_f = fully
    return points


class Shaped(tuple):
    """(event_rows, index_rows, void_rows, facts, batch_voids), plus `skipped`."""

    skipped: int = 0


def shape(messages: Sequence[tuple[int, int, Mapping[str, Any]]], regions: Mapping[str, str]) -> Shaped:
    """One pass over a batch: the rows of events, event_index and voids, and the figure view.

    The figure view (kind, flag, amount, which events are readable at all) is
    projections.counting's figure_view, the rule the PostgreSQL projector reads
    by too. An event it cannot read (the projector's InvalidEvent: the worker
    dead-letters it) is skipped. A repeated event_id keeps its first copy.
    """
    event_rows: list[tuple] = []
    index_rows: list[tuple] = []
    void_rows: list[tuple] = []
    facts: dict[str, tuple] = {}  # event_id -> the fields of a Fact
    batch_voids: dict[str, tuple[str, int]] = {}
    seen: set[str] = set()
    skipped = 0
    add_event, add_index = event_rows.append, index_rows.append
    view = figure_view
    for partition, offset, ev in messages:
        try:
            event_id, raw_id, kind, voided, raw_target, province, t_us, subject, vaccine, number, flag, amount = view(
                ev
            )
            t_ms = t_us // 1000
            p = ev["payload"]
        except READ_ERRORS as exc:
            log.warning(
                "skipping partition %s offset %s: %s: %s (the worker dead-letters it)",
                partition,
                offset,
                type(exc).__name__,
                exc,
            )
            skipped += 1
            continue
        if event_id in seen:
            continue
        seen.add(event_id)
        if kind:
            facts[event_id] = (kind, t_ms, province, subject or None, vaccine, number, flag, amount)  # a Fact
            add_index((raw_id, kind, t_ms, province, subject, vaccine, number, flag, amount))
        elif voided:
            batch_voids[event_id] = (voided, t_ms)
            void_rows.append((raw_target, raw_id, t_ms, province))
        else:
            vaccine, number = p.get("vaccine") or "", p.get("dose_number") or 0
        add_event(
            (
                raw_id,
                ev["event_type"],
                kind,
                t_ms // 1000,
                t_ms % 1000,
                province,
                regions.get(province, ""),
                ev.get("source") or "",
                subject,
                flag,
                vaccine,
                number,
                p.get("site_id") or "",
                p.get("lot_number") or "",
                p.get("severity") or "",
                amount,
                p.get("recipient") or "",
                voided or "",
                partition,
                offset,
            )
        )
    out = Shaped((event_rows, index_rows, void_rows, facts, batch_voids))
    out.skipped = skipped
    return out

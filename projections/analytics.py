"""ClickHouse analytics: the tables (versioned migrations) and every query on them.

    store = open_store(settings.analytics_url())
    migrate(store)                                   # idempotent; `nhdp up` and the sink both run it
    analytics = Analytics(store)
    analytics.national_summary(as_of="2021-08-10T12:00:00+07:00")
    analytics.doses(group_by="province,day", from_="2021-08-01", to="2021-08-30")

The same DDL and SQL run on Debian's ClickHouse 18.16 and on chDB 26 (see
projections/analytics_store.py for the dialect both accept). Writes come from
one process only, the sink (projections/sink.py); this module only reads,
apart from `refresh_rollups`, which the sink calls.

Tables
------
events         every event of the log, one row per event_id (ReplacingMergeTree on
               (hour, event_type, province_code, event_id): a re-delivered copy
               collapses on merge, and every read goes through FINAL or counts
               distinct event_ids, so unmerged copies never count twice). Time
               is `occurred_at` DateTime('UTC') + `occurred_ms` (the Avro
               timestamp's milliseconds), `hour` (UTC) is the bucket of
               everything below, `day` is the local day in Asia/Ho_Chi_Minh.
               `kind`, `flag` and `doses` are the figure view of the event,
               read as the PostgreSQL projector's `_prepare` reads it
               (projections.sink.shape; a test holds the two to each other).
               `hour`, `day` and `subject_key` are MATERIALIZED by the server. No citizen_id, name or other
               direct identifier: only subject_id (and `subject_key`, its
               sipHash128, for fast distinct counts). Event ids are stored as
               the UUID's 16 bytes (FixedString(16), UUIDStringToNum): they
               sort like the canonical text, unlike 18.16's UUID type, and
               the driver encodes them 6x faster than UUID columns.
voids          RecordVoided as (target_id, void_id, occurred_ms), keyed by target.
event_index    the figure view of every counted fact keyed by event_id, so that a
               void can find its target without scanning `events`.
subjects       per subject: its doses (time, id, province, janssen, earliest void)
               and every timeline point ever written for it (see below).
points         figure contributions that are not the +1 of a fact at its own time:
               * a retraction: -1 for a voided fact at r = max(occurred, earliest
                 void), keyed by the target's event_id;
               * people_vaccinated (kind 6) and people_fully_vaccinated (kind 7):
                 +1/-1 in a province at the instants a subject's state changes.
               A point is an identity (hour, key_id, kind, t_ms, province, delta)
               with `live` 1 or 0 (tombstone); the latest `version` wins.
figures_hourly / figures_daily
               rollups: per (bucket, province, kind, vaccine, dose_number) the
               sums n, nflag, amount of events (+1 each) and live points (delta).
doses_daily    rollup for the doses endpoint: per local day and grouping (a bitmask of
               province, vaccine, dose number; '' / 0 where not grouped) the valid doses
               and distinct people.
sink_batches   the version of every batch whose writes all completed.
sink_owners    every sink that started writing this database; the latest one is the
               writer, and an older one stops at its next batch (a fence).
hour_marks     per UTC hour: the version at which its data last changed (mark 0,
               "dirty") and the version its rollups were last recomputed at
               (mark 1, "clean"; mark 2 for doses_daily).
schema_migrations  the versions applied.

How as_of=T is answered exactly (DESIGN §4)
-------------------------------------------
A fact e counts at T iff occurred(e) < T and no void of e occurred before T.
With v = its earliest void and r = max(occurred(e), v):

    counts(e, T) = [occurred(e) < T] - [r < T]

so every figure is a sum of +1 at a fact's own time (the `events` row) and -1
at r (its retraction point). A subject's people_vaccinated province and
fully-vaccinated state are step functions of T; the sink writes the steps as
points, so people(T, P) = sum of the subject points with t < T. Every figure,
as of any T, is then  sum over rows with t < T  of one uniform row shape:

    daily rollups    for UTC days that end at or before T and hold no dirty hour
  + hourly rollups   for the other clean hours that end at or before T
  + events + points  (FINAL, t < T) for dirty hours and the hour T falls in.

T without as_of is +infinity (T = NEVER_MS). No figure depends on arrival
order: duplicates collapse by key, a void that arrives before its target is
found by the target (and the other way round), and nothing reads the clock.

Why the rollups can be trusted: they are correctable, not incremental
----------------------------------------------------------------------
A materialized view (or a sink adding +1s) over a ReplacingMergeTree counts a
re-delivered row again, and a void that arrives after its target has been
rolled up would have to subtract something already summed. So no rollup here
is ever incremented. A rollup row is a *cache of a pure function*: the sums
over the deduplicated events and live points of its hour (FINAL), recomputed
as a whole (`refresh_rollups`) and written with a higher version, vanished
keys as zeros. It is trusted only for hours whose last recompute is newer
than their last change:

1. the sink marks an hour dirty (hour_marks, its batch's version) *before*
   it writes the batch's rows of that hour, so no row can be in ClickHouse
   without its hour being dirty;
2. a recompute reads after those writes and marks the hour clean with a
   later version; the daily rollup of a day is recomputed from its hourly
   rows in the same round, and used only while none of the day's hours is dirty;
3. a query answers dirty hours from `events` + `points` directly (FINAL).

So a crash, a re-delivery or a lagging recompute makes a query slower, never
wrong, and a recompute can be repeated at any time (replay rebuilds with it).

Points are correctable the same way: every point write is an overwrite of an
identity (latest version wins), never an increment. A retraction for target e
is written live at r and as a tombstone at max(occurred(e), v) for every other
void v ever seen, which covers every r written before. A subject's points are
recomputed from the subject's doses; the `subjects` row is written *before*
the points and lists every point ever written for the subject, and points
not in the new timeline are tombstoned, so no point outlives a crash.

The analytics endpoints
-----------------------
* doses(group_by, from, to, province): valid doses (no void at all, as in
  PostgreSQL's valid_doses) grouped by any of province, day (local), vaccine,
  dose_number, with `doses` = distinct event_ids and `people` = distinct
  subjects (subject_key, a 128-bit hash of subject_id). A distinct count does
  not add up across buckets, so figures_* cannot answer it, and they hold a
  void at the void's time, not at the dose's day. Grouped by day it comes
  from doses_daily, which keeps every grouping of each local day separately
  (so no distinct count is ever added up), with the same dirty/clean marks as
  the figure rollups (mark 2), and a void marks its target dose's hour dirty.
  Stale days (today, while doses arrive) are answered from `events`. Not
  grouped by day, or filtered to several provinces without grouping by
  province, people must be distinct across days or provinces: that is read
  from `events`, and its cost grows with the doses in the range.
* coverage(by=province|region, as_of): people_(fully_)vaccinated against the
  2019 population, each row ranked (1 = highest) and compared with the
  national figure in percentage points.

Rules for SQL that must hold on both engines (besides analytics_store's):
never PREWHERE with FINAL (it filters before deduplication); WHERE after FINAL
is correct on both; no JOIN (26.x wants aliases, 18.16 wants strictness): use
IN subqueries; IN lists go in chunks (18.16's max_query_size is 256 KiB).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from projections import read_models
from projections.analytics_store import AnalyticsStore, AnalyticsStoreError, open_store
from schemas.reference import provinces, regions

UTC = UTC
HCM = timezone(timedelta(hours=7))  # Asia/Ho_Chi_Minh: UTC+7 all year, no DST since 1975

# Kinds: 1-5 are the projector's event codes (projections.projector.ETYPES).
DECLARATION, REGISTRATION, DOSE, ADVERSE, ALLOCATION, PEOPLE, FULLY = 1, 2, 3, 4, 5, 6, 7
COUNTED_KINDS = (DECLARATION, REGISTRATION, DOSE, ADVERSE, ALLOCATION)

NEVER_MS = 1 << 62  # "no cut-off" and "never voided": later than any event time
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
IN_CHUNK = 1000  # ids per IN list: 18.16 refuses queries over 256 KiB

GROUP_BY = ("province", "day", "vaccine", "dose_number")
COVERAGE_BY = ("province", "region")
_GROUP_COLUMN = {"province": "province_code", "day": "day", "vaccine": "vaccine", "dose_number": "dose_number"}


class ParameterError(ValueError):
    """A request parameter is wrong; `param` names it and the message says what is allowed."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


# -- migrations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events, voids, event index, subjects, points, rollups, hour marks",
        (
            """
            CREATE TABLE IF NOT EXISTS events (
                event_id FixedString(16),
                event_type String,
                kind UInt8,
                occurred_at DateTime('UTC'),
                occurred_ms UInt16,
                hour DateTime('UTC') MATERIALIZED toStartOfHour(occurred_at),
                day Date MATERIALIZED toDate(occurred_at, 'Asia/Ho_Chi_Minh'),
                province_code String,
                region String,
                source String,
                subject_id String,
                subject_key FixedString(16) MATERIALIZED sipHash128(subject_id),
                flag UInt8,
                vaccine String,
                dose_number UInt8,
                site_id String,
                lot_number String,
                severity String,
                has_symptoms UInt8 MATERIALIZED if(kind = 1, flag, 0),
                doses Int64,
                recipient String,
                voided_event_id String,
                kafka_partition UInt16,
                kafka_offset UInt64
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(hour)
            ORDER BY (hour, event_type, province_code, event_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS voids (
                target_id FixedString(16),
                void_id FixedString(16),
                occurred_ms Int64,
                province_code String
            ) ENGINE = ReplacingMergeTree
            ORDER BY (target_id, void_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS event_index (
                event_id FixedString(16),
                kind UInt8,
                occurred_ms Int64,
                province_code String,
                subject_id String,
                vaccine String,
                dose_number UInt8,
                flag UInt8,
                amount Int64
            ) ENGINE = ReplacingMergeTree
            ORDER BY event_id
            SETTINGS index_granularity = 1024
            """,
            """
            CREATE TABLE IF NOT EXISTS subjects (
                subject_id String,
                version UInt64,
                dose_ids Array(String),
                dose_ms Array(Int64),
                dose_province Array(String),
                dose_janssen Array(UInt8),
                dose_void_ms Array(Int64),
                ever_ms Array(Int64),
                ever_kind Array(UInt8),
                ever_province Array(String),
                ever_delta Array(Int8)
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY subject_id
            SETTINGS index_granularity = 64
            """,
            """
            CREATE TABLE IF NOT EXISTS points (
                hour DateTime('UTC'),
                key_id String,
                kind UInt8,
                t_ms Int64,
                province_code String,
                delta Int8,
                vaccine String,
                dose_number UInt8,
                flag UInt8,
                amount Int64,
                live UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            PARTITION BY toYYYYMM(hour)
            ORDER BY (hour, key_id, kind, t_ms, province_code, delta)
            """,
            """
            CREATE TABLE IF NOT EXISTS figures_hourly (
                hour DateTime('UTC'),
                province_code String,
                kind UInt8,
                vaccine String,
                dose_number UInt8,
                n Int64,
                nflag Int64,
                amount Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            PARTITION BY toYYYYMM(hour)
            ORDER BY (hour, province_code, kind, vaccine, dose_number)
            """,
            """
            CREATE TABLE IF NOT EXISTS figures_daily (
                day DateTime('UTC'),
                province_code String,
                kind UInt8,
                vaccine String,
                dose_number UInt8,
                n Int64,
                nflag Int64,
                amount Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (day, province_code, kind, vaccine, dose_number)
            """,
            """
            CREATE TABLE IF NOT EXISTS sink_owners (
                instance String,
                started UInt64
            ) ENGINE = ReplacingMergeTree
            ORDER BY instance
            """,
            """
            CREATE TABLE IF NOT EXISTS sink_batches (
                version UInt64,
                messages UInt32,
                completed_at DateTime('UTC')
            ) ENGINE = ReplacingMergeTree
            ORDER BY version
            """,
            """
            CREATE TABLE IF NOT EXISTS hour_marks (
                hour DateTime('UTC'),
                mark UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (hour, mark)
            """,
        ),
    ),
    Migration(
        2,
        "doses_daily: valid doses and people per local day, for every grouping of province, vaccine, dose number",
        (
            """
            CREATE TABLE IF NOT EXISTS doses_daily (
                day Date,
                grouping UInt8,
                province_code String,
                vaccine String,
                dose_number UInt8,
                doses UInt64,
                people UInt64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (day, grouping, province_code, vaccine, dose_number)
            """,
        ),
    ),
)

MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    name String,
    applied_at DateTime('UTC')
) ENGINE = ReplacingMergeTree
ORDER BY version
"""


def applied_versions(store: AnalyticsStore) -> set[int]:
    store.execute(MIGRATIONS_DDL)
    return {int(v) for (v,) in store.execute("SELECT DISTINCT version FROM schema_migrations")}


def migrate(store: AnalyticsStore, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations not yet recorded, in order; returns the versions applied now.

    Every statement is CREATE … IF NOT EXISTS, so a migration interrupted half
    way, or run by two processes at once, is simply run again; the version is
    recorded only after all its statements succeeded.
    """
    done = applied_versions(store)
    now = []
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in done:
            continue
        for statement in m.statements:
            store.execute(statement)
        store.insert(
            "schema_migrations",
            ["version", "name", "applied_at"],
            [(m.version, m.name, int(datetime.now(UTC).timestamp()))],
        )
        now.append(m.version)
    return now


def ensure_schema(url: str) -> list[int]:
    """Open the store at url, create its database if needed, migrate, close (used by `nhdp up`)."""
    store = open_store(url, purpose="nhdp migrate")
    try:
        return migrate(store)
    finally:
        store.close()


# -- time ----------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_as_of(value: str | datetime | None) -> datetime | None:
    """RFC 3339 with an offset; '+' that a query string turned into a space is accepted."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        text = str(value).strip().replace(" ", "+")
        if text.endswith(("z", "Z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ParameterError(
                "as_of",
                f"{value!r} is not an RFC 3339 time; use e.g. 2021-08-10T12:00:00+07:00 or 2021-08-10T05:00:00Z",
            ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ParameterError("as_of", f"{value!r} has no UTC offset; add one, e.g. 2021-08-10T12:00:00+07:00")
    return parsed


def cut_ms(as_of: datetime | None) -> int:
    """Integer c with: an event at t milliseconds counts iff t < c (t < T for integer t)."""
    if as_of is None:
        return NEVER_MS
    us = (as_of - _EPOCH) // timedelta(microseconds=1)
    return -((-us) // 1000)


def parse_day(param: str, value: str | date | None) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ParameterError(param, f"{value!r} is not a date; use YYYY-MM-DD (a day in Asia/Ho_Chi_Minh)") from None


def chunks(items: Sequence, size: int = IN_CHUNK) -> Iterable[tuple]:
    for i in range(0, len(items), size):
        yield tuple(items[i : i + size])


# -- rollups -----------------------------------------------------------------------------------

DIRTY_HOURS_SQL = """
SELECT hour FROM hour_marks
GROUP BY hour
HAVING maxIf(version, mark = 0) > maxIf(version, mark = 1)
ORDER BY hour
"""


def dirty_hours(store: AnalyticsStore) -> list[int]:
    """Hours (epoch seconds) whose data changed after their rollups were last recomputed."""
    return [int(h.timestamp()) for (h,) in store.execute(DIRTY_HOURS_SQL)]


# The rows of one hour, in the one shape every figure query sums. Voids and
# appointments/check-ins have kind 0 and count nothing.
_EVENT_ROWS = """
SELECT hour, province_code, kind, vaccine, dose_number, toInt64(1) AS r_n, toInt64(flag) AS r_flag, doses AS r_amount
FROM events FINAL WHERE hour IN %(hours)s AND kind > 0
"""
_POINT_ROWS = """
SELECT hour, province_code, kind, vaccine, dose_number, toInt64(delta) AS r_n, toInt64(delta) * flag AS r_flag,
       toInt64(delta) * amount AS r_amount
FROM points FINAL WHERE hour IN %(hours)s AND live = 1
"""

REFRESH_HOURLY_SQL = f"""
INSERT INTO figures_hourly (hour, province_code, kind, vaccine, dose_number, n, nflag, amount, version)
SELECT hour, province_code, kind, vaccine, dose_number, sum(r_n), sum(r_flag), sum(r_amount), %(version)s
FROM (
    {_EVENT_ROWS}
    UNION ALL
    {_POINT_ROWS}
    UNION ALL
    SELECT hour, province_code, kind, vaccine, dose_number, toInt64(0), toInt64(0), toInt64(0)
    FROM figures_hourly FINAL WHERE hour IN %(hours)s
)
GROUP BY hour, province_code, kind, vaccine, dose_number
"""

REFRESH_DAILY_SQL = """
INSERT INTO figures_daily (day, province_code, kind, vaccine, dose_number, n, nflag, amount, version)
SELECT bucket, province_code, kind, vaccine, dose_number, sum(r_n), sum(r_flag), sum(r_amount), %(version)s
FROM (
    SELECT toStartOfDay(hour, 'UTC') AS bucket, province_code, kind, vaccine, dose_number,
           n AS r_n, nflag AS r_flag, amount AS r_amount
    FROM figures_hourly FINAL WHERE toStartOfDay(hour, 'UTC') IN %(days)s
    UNION ALL
    SELECT day AS bucket, province_code, kind, vaccine, dose_number, toInt64(0), toInt64(0), toInt64(0)
    FROM figures_daily FINAL WHERE day IN %(days)s
)
GROUP BY bucket, province_code, kind, vaccine, dose_number
"""


def _dt(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def refresh_rollups(store: AnalyticsStore, version: int, hours: Sequence[int] | None = None, limit: int = 240) -> int:
    """Recompute the rollups of dirty hours (at most `limit`, oldest first); returns how many.

    `version` must be greater than every version used to mark data dirty so
    far (the sink's batch counter). Safe to run at any time, any number of times.
    """
    todo = sorted(dirty_hours(store) if hours is None else hours)[:limit]
    if not todo:
        return 0
    for part in chunks(todo, 200):
        store.execute(REFRESH_HOURLY_SQL, {"hours": tuple(_dt(h) for h in part), "version": version})
    days = sorted({h - h % 86400 for h in todo})
    for part in chunks(days, 100):
        store.execute(REFRESH_DAILY_SQL, {"days": tuple(_dt(d) for d in part), "version": version})
    store.insert("hour_marks", ["hour", "mark", "version"], [(h, 1, version) for h in todo])
    return len(todo)


# doses_daily: per local day and grouping g (bit 1 province, 2 vaccine, 4 dose
# number; a column outside g is '' or 0), the valid doses and distinct people.
# Recomputed whole per day like the figure rollups, and trusted for a day only
# while none of its hours has changed since (mark 2 newer than mark 0). A void
# marks its target's hour dirty too (projections/sink.py), because a voided
# dose leaves its own day's answer, not the void's.
_GROUPINGS = "arrayJoin([0, 1, 2, 3, 4, 5, 6, 7])"
REFRESH_DOSES_SQL = f"""
INSERT INTO doses_daily (day, grouping, province_code, vaccine, dose_number, doses, people, version)
SELECT d, g, gp, gv, gn, sum(n_doses), sum(n_people), %(version)s
FROM (
    SELECT day AS d, {_GROUPINGS} AS g, if(bitAnd(g, 1) = 1, province_code, '') AS gp,
           if(bitAnd(g, 2) = 2, vaccine, '') AS gv, toUInt8(if(bitAnd(g, 4) = 4, dose_number, 0)) AS gn,
           toUInt64(uniqExact(event_id)) AS n_doses, toUInt64(uniqExact(subject_key)) AS n_people
    FROM events
    WHERE hour IN %(hours)s AND kind = 3 AND event_id NOT IN (SELECT target_id FROM voids)
    GROUP BY d, g, gp, gv, gn
    UNION ALL
    SELECT day, grouping, province_code, vaccine, dose_number, toUInt64(0), toUInt64(0)
    FROM doses_daily FINAL WHERE day IN %(days)s
)
GROUP BY d, g, gp, gv, gn
"""

DIRTY_DOSE_HOURS_SQL = """
SELECT hour FROM hour_marks
GROUP BY hour
HAVING maxIf(version, mark = 0) > maxIf(version, mark = 2)
ORDER BY hour
"""


def local_day(hour_s: int) -> date:
    return datetime.fromtimestamp(hour_s, HCM).date()


def day_hours(day: date) -> list[int]:
    """The 24 UTC hours (epoch seconds) of a local day."""
    start = int(datetime.combine(day, datetime.min.time(), HCM).timestamp())
    return [start + 3600 * i for i in range(24)]


def dirty_dose_days(store: AnalyticsStore) -> dict[date, list[int]]:
    """Local days whose doses_daily rows are stale, with their changed hours."""
    out: dict[date, list[int]] = {}
    for (h,) in store.execute(DIRTY_DOSE_HOURS_SQL):
        hour = int(h.timestamp())
        out.setdefault(local_day(hour), []).append(hour)
    return out


def refresh_doses(store: AnalyticsStore, version: int, limit: int = 31) -> int:
    """Recompute doses_daily for stale local days (at most `limit`, oldest first); returns how many.
    `version` as for refresh_rollups; safe to repeat at any time."""
    todo = sorted(dirty_dose_days(store).items())[:limit]
    for day, changed in todo:
        store.execute(
            REFRESH_DOSES_SQL, {"hours": tuple(_dt(h) for h in day_hours(day)), "days": (day,), "version": version}
        )
        store.insert("hour_marks", ["hour", "mark", "version"], [(h, 2, version) for h in changed])
    return len(todo)


# -- figures -------------------------------------------------------------------------------------

# Every branch selects on the leading sort-key column (day or hour) with plain
# comparisons and IN lists, so each reads only its own ranges of the table.
FIGURE_ROWS_SQL = """
SELECT province_code, kind, vaccine, dose_number, sum(r_n), sum(r_flag), sum(r_amount)
FROM (
    SELECT province_code, kind, vaccine, dose_number, n AS r_n, nflag AS r_flag, amount AS r_amount
    FROM figures_daily FINAL
    WHERE day < %(cut_day)s AND day NOT IN %(dirty_days)s {pf}
    UNION ALL
    SELECT province_code, kind, vaccine, dose_number, n AS r_n, nflag AS r_flag, amount AS r_amount
    FROM figures_hourly FINAL
    WHERE ((hour >= %(cut_day)s AND hour < %(cut_hour)s) OR hour IN %(clean_in_dirty_days)s)
      AND hour NOT IN %(dirty)s {pf}
    UNION ALL
    SELECT province_code, kind, vaccine, dose_number, toInt64(1) AS r_n, toInt64(flag) AS r_flag, doses AS r_amount
    FROM events FINAL
    WHERE hour IN %(raw)s AND kind > 0 AND toInt64(toUInt32(occurred_at)) * 1000 + occurred_ms < %(cut)s {pf}
    UNION ALL
    SELECT province_code, kind, vaccine, dose_number, toInt64(delta) AS r_n, toInt64(delta) * flag AS r_flag,
           toInt64(delta) * amount AS r_amount
    FROM points FINAL
    WHERE hour IN %(raw)s AND live = 1 AND t_ms < %(cut)s {pf}
)
GROUP BY province_code, kind, vaccine, dose_number
"""

_FAR = 4_000_000_000  # 2096-10-02, seconds: a bucket bound later than any event (DateTime ends in 2106)


def figure_rows(store: AnalyticsStore, cut: int = NEVER_MS, provinces_: Sequence[str] | None = None) -> list[tuple]:
    """(province, kind, vaccine, dose_number, n, nflag, amount) summed over everything before cut (ms).

    Daily rollups for whole UTC days before the cut's day without a dirty
    hour; hourly rollups for the clean hours of the cut's day before its hour
    and of the days that have a dirty hour; events and points for the dirty
    hours and the hour the cut falls in.
    """
    dirty = [h for h in dirty_hours(store) if h * 1000 < cut]
    cut_hour = min(cut // HOUR_MS * 3600, _FAR)  # hours before it end at or before the cut
    cut_day = cut_hour - cut_hour % 86400 if cut < NEVER_MS else _FAR
    dirty_set = set(dirty)
    dirty_days = sorted({h - h % 86400 for h in dirty if h < cut_day})
    clean_in_dirty_days = [d + k * 3600 for d in dirty_days for k in range(24) if d + k * 3600 not in dirty_set]
    partial = {cut_hour} if cut < NEVER_MS and cut % HOUR_MS else set()  # the hour the cut falls in
    raw = sorted(dirty_set | partial)
    params: dict[str, Any] = {
        "cut": cut,
        "cut_day": _dt(cut_day),
        "cut_hour": _dt(cut_hour),
        "dirty": tuple(_dt(h) for h in dirty),
        "dirty_days": tuple(_dt(d) for d in dirty_days),
        "clean_in_dirty_days": tuple(_dt(h) for h in clean_in_dirty_days),
        "raw": tuple(_dt(h) for h in raw),
    }
    pf = ""
    if provinces_ is not None:
        pf = "AND province_code IN %(provinces)s"
        params["provinces"] = tuple(provinces_)
    return store.execute(FIGURE_ROWS_SQL.format(pf=pf), params)


def figure_values(rows: Iterable[tuple]) -> dict[str, dict[tuple[str, str], int]]:
    """{province: {(figure, key): value}} as read_models' counters hold them (DESIGN §4 names)."""
    out: dict[str, dict[tuple[str, str], int]] = {}

    def add(values, figure, key, v):
        if v:
            values[(figure, key)] = values.get((figure, key), 0) + int(v)

    for province, kind, vaccine, dose_number, n, nflag, amount in rows:
        values = out.setdefault(province, {})
        if kind == DECLARATION:
            add(values, "declarations", "", n)
            add(values, "declarations_with_symptoms", "", nflag)
        elif kind == REGISTRATION:
            add(values, "registrations", "", n)
        elif kind == DOSE:
            add(values, "doses_administered", "", n)
            add(values, "doses_by_number", str(dose_number), n)
            add(values, "doses_by_vaccine", vaccine, n)
        elif kind == ADVERSE:
            add(values, "adverse_events", "", n)
            add(values, "serious_adverse_events", "", nflag)
        elif kind == ALLOCATION:
            add(values, "doses_allocated", "", amount)
        elif kind == PEOPLE:
            add(values, "people_vaccinated", "", n)
        elif kind == FULLY:
            add(values, "people_fully_vaccinated", "", n)
    return out


def _populations() -> dict[str, int]:
    return {code: p.population for code, p in provinces().items()}


# -- the service: what the API (directly, or through the sink in chDB mode) calls --------------


class StorePool:
    """Up to `size` stores on one URL, each used by one thread at a time."""

    def __init__(self, url: str, size: int = 4, purpose: str | None = None):
        self.url, self.size, self.purpose = url, size, purpose
        self._idle: list[AnalyticsStore] = []
        self._all: list[AnalyticsStore] = []
        self._cond = threading.Condition()

    def acquire(self) -> AnalyticsStore:
        with self._cond:
            while not self._idle and len(self._all) >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._all.append(None)  # reserve a slot while connecting
        try:
            store = open_store(self.url, purpose=self.purpose)
        except BaseException:
            with self._cond:
                self._all.remove(None)
                self._cond.notify()
            raise
        with self._cond:
            self._all[self._all.index(None)] = store
        return store

    def release(self, store: AnalyticsStore, broken: bool = False) -> None:
        with self._cond:
            if broken:
                self._all.remove(store)
                try:
                    store.close()
                except Exception:
                    pass
            else:
                self._idle.append(store)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            for store in self._all:
                if store is not None:
                    store.close()
            self._all.clear()
            self._idle.clear()


class Analytics:
    """Every analytics answer, from one ClickHouse store (or a StorePool).

    Arguments are plain JSON values (strings, None) and so are the answers, so
    that the same calls can be forwarded over HTTP to the process that owns a
    chDB folder (projections.sink serves them; RemoteAnalytics sends them).
    Bad arguments raise ParameterError naming the parameter and what is allowed.
    """

    def __init__(self, store: AnalyticsStore | StorePool):
        self._source = store

    def _run(self, fn, *args):
        if isinstance(self._source, StorePool):
            store = self._source.acquire()
            broken = False
            try:
                return fn(store, *args)
            except AnalyticsStoreError as exc:
                broken = bool(exc.retryable)
                raise
            finally:
                self._source.release(store, broken)
        return fn(self._source, *args)

    # -- summaries (DESIGN §4), the shapes of projections.read_models ------------------
    def _values(self, as_of: str | None, only: Sequence[str] | None = None):
        cut = cut_ms(parse_as_of(as_of))
        return figure_values(self._run(figure_rows, cut, only))

    def national_summary(self, as_of: str | None = None) -> dict[str, Any]:
        by_province = self._values(as_of)
        pops = _populations()
        total: dict[tuple[str, str], int] = {}
        for values in by_province.values():
            for k, v in values.items():
                total[k] = total.get(k, 0) + v
        population = sum(pops.values())
        return {"population": population, **read_models._summary(total, population)}

    def province_summary(self, code: str, as_of: str | None = None) -> dict[str, Any]:
        if code not in provinces():
            raise ParameterError(
                "code", f"unknown province code {code!r}; codes are the 63 two-digit 2008 codes, e.g. 01, 79"
            )
        values = self._values(as_of, (code,)).get(code, {})
        return read_models._province_dict(code, values, _populations())

    def all_provinces(self, as_of: str | None = None) -> list[dict[str, Any]]:
        by_province = self._values(as_of)
        pops = _populations()
        return [read_models._province_dict(code, by_province.get(code, {}), pops) for code in sorted(pops)]

    # -- doses grouped ----------------------------------------------------------------------
    def doses(
        self, group_by: str | None = None, from_: str | None = None, to: str | None = None, province: str | None = None
    ) -> dict[str, Any]:
        keys = _parse_group_by(group_by)
        first, last = parse_day("from", from_), parse_day("to", to)
        if first and last and first > last:
            raise ParameterError("from", f"{first} is after to={last}")
        codes = _parse_provinces(province)
        cols = [_GROUP_COLUMN[k] for k in keys]
        # Grouped by day, a day's answer is one doses_daily row per group, as long as the
        # province filter is one province or the province is grouped (else people would
        # have to be distinct across several provinces' rows).
        by_day = "day" in keys and (codes is None or len(codes) == 1 or "province" in keys)
        rows = self._run(lambda store: self._doses_rows(store, keys, cols, first, last, codes, by_day))
        out_rows = []
        for row in rows:
            item: dict[str, Any] = {}
            for k, v in zip(keys, row):
                item[k] = v.isoformat() if k == "day" else v
            item["doses"], item["people"] = int(row[-2]), int(row[-1])
            if cols or item["doses"]:
                out_rows.append(item)
        return {
            "group_by": list(keys),
            "from": first.isoformat() if first else None,
            "to": last.isoformat() if last else None,
            "province": list(codes) if codes is not None else None,
            "rows": out_rows,
        }

    @staticmethod
    def _doses_rows(
        store: AnalyticsStore,
        keys: list[str],
        cols: list[str],
        first: date | None,
        last: date | None,
        codes: list[str] | None,
        by_day: bool,
        stale_days: Iterable[date] | None = None,
    ) -> list[tuple]:
        """(group columns..., doses, people) in group order: clean days from doses_daily,
        the rest (or everything, when not by_day) from `events`. `stale_days`: treat
        these days as stale as well (tests take both paths with it)."""
        stale: list[date] = []
        rollup: list[tuple] = []
        if by_day:
            stale = sorted(
                {
                    d
                    for d in [*dirty_dose_days(store), *(stale_days or ())]
                    if (not first or d >= first) and (not last or d <= last)
                }
            )
            g = (
                (1 if "province" in keys or codes else 0)
                | (2 if "vaccine" in keys else 0)
                | (4 if "dose_number" in keys else 0)
            )
            where = ["grouping = %(g)s", "doses > 0"]
            params: dict[str, Any] = {"g": g}
            if first:
                where.append("day >= %(from)s")
                params["from"] = first
            if last:
                where.append("day <= %(to)s")
                params["to"] = last
            if stale:
                where.append("day NOT IN %(stale)s")
                params["stale"] = tuple(stale)
            if codes is not None:
                where.append("province_code IN %(provinces)s")
                params["provinces"] = tuple(codes)
            rollup = store.execute(
                f"SELECT {', '.join(cols + ['doses', 'people'])} FROM doses_daily FINAL WHERE {' AND '.join(where)}",
                params,
            )
            if not stale:
                return sorted(rollup)
        where = ["kind = 3", "event_id NOT IN (SELECT target_id FROM voids)"]
        params = {}
        if first:
            # day is local (UTC+7): the day starts at 17:00 UTC the day before
            where += ["hour >= %(from_hour)s", "day >= %(from)s"]
            params["from"], params["from_hour"] = first, datetime.combine(first, datetime.min.time(), HCM)
        if last:
            nxt = last + timedelta(days=1)
            where += ["hour < %(to_hour)s", "day <= %(to)s"]
            params["to"], params["to_hour"] = last, datetime.combine(nxt, datetime.min.time(), HCM)
        if stale:
            # the hour bounds let the sort key skip everything between
            where += ["hour >= %(stale_from)s", "hour < %(stale_to)s", "day IN %(stale)s"]
            params["stale"] = tuple(stale)
            params["stale_from"] = _dt(day_hours(min(stale))[0])
            params["stale_to"] = _dt(day_hours(max(stale))[-1] + 3600)
        if codes is not None:
            where.append("province_code IN %(provinces)s")
            params["provinces"] = tuple(codes)
        select = ", ".join(cols + ["uniqExact(event_id)", "uniqExact(subject_key)"])
        sql = f"SELECT {select} FROM events WHERE {' AND '.join(where)}"
        if cols:
            sql += f" GROUP BY {', '.join(cols)} ORDER BY {', '.join(cols)}"
        raw = store.execute(sql, params)
        return sorted(rollup + raw) if rollup else raw

    # -- coverage ----------------------------------------------------------------------------
    def coverage(self, by: str | None = "province", as_of: str | None = None) -> dict[str, Any]:
        by = (by or "province").strip()
        if by not in COVERAGE_BY:
            raise ParameterError("by", f"{by!r} is not allowed; use one of: {', '.join(COVERAGE_BY)}")
        by_province = self._values(as_of)
        refs = provinces()
        people: dict[str, list[int]] = {}
        for code, ref in refs.items():
            values = by_province.get(code, {})
            group = code if by == "province" else ref.region
            acc = people.setdefault(group, [0, 0, 0])
            acc[0] += values.get(("people_vaccinated", ""), 0)
            acc[1] += values.get(("people_fully_vaccinated", ""), 0)
            acc[2] += ref.population
        nat_people = sum(a[0] for a in people.values())
        nat_fully = sum(a[1] for a in people.values())
        nat_pop = sum(a[2] for a in people.values())
        national = {
            "population": nat_pop,
            "people_vaccinated": nat_people,
            "people_fully_vaccinated": nat_fully,
            "coverage_pct": read_models._pct(nat_people, nat_pop),
            "full_coverage_pct": read_models._pct(nat_fully, nat_pop),
        }
        rows = []
        for group, (p, f, pop) in people.items():
            row: dict[str, Any] = {}
            if by == "province":
                row.update(province_code=group, name=refs[group].name_vi, region=refs[group].region)
            else:
                row.update(region=group, provinces=sorted(c for c, r in refs.items() if r.region == group))
            cov, full = read_models._pct(p, pop), read_models._pct(f, pop)
            row.update(
                population=pop,
                people_vaccinated=p,
                people_fully_vaccinated=f,
                coverage_pct=cov,
                full_coverage_pct=full,
                vs_national_pp=round(cov - national["coverage_pct"], 6),
                full_vs_national_pp=round(full - national["full_coverage_pct"], 6),
                above_national=cov > national["coverage_pct"],
            )
            rows.append(row)
        # rank 1 = highest coverage; ties share a rank; then by code/name for a stable order
        rows.sort(key=lambda r: (-r["coverage_pct"], r.get("province_code") or r["region"]))
        for i, row in enumerate(rows):
            row["rank"] = rows[i - 1]["rank"] if i and row["coverage_pct"] == rows[i - 1]["coverage_pct"] else i + 1
        full_order = sorted(rows, key=lambda r: -r["full_coverage_pct"])
        for i, row in enumerate(full_order):
            prev = full_order[i - 1] if i else None
            row["full_rank"] = (
                prev["full_rank"] if prev and prev["full_coverage_pct"] == row["full_coverage_pct"] else i + 1
            )
        return {"by": by, "as_of": as_of, "national": national, "rows": rows}

    # -- state, for operators and for verify ------------------------------------------------------
    def status(self) -> dict[str, Any]:
        def q(store):
            counts = dict(
                store.execute("SELECT 'events', count() FROM events UNION ALL SELECT 'voids', count() FROM voids")
            )
            return {
                "engine": store.engine,
                "migrations": sorted(applied_versions(store)),
                "dirty_hours": len(dirty_hours(store)),
                "event_rows": int(counts.get("events", 0)),
                "void_rows": int(counts.get("voids", 0)),
            }

        return self._run(q)


def _parse_group_by(group_by: str | Sequence[str] | None) -> list[str]:
    if group_by is None or group_by == "":
        return []
    items = group_by.split(",") if isinstance(group_by, str) else list(group_by)
    keys = []
    for item in (i.strip() for i in items):
        if item not in GROUP_BY:
            raise ParameterError(
                "group_by", f"{item!r} is not allowed; use a comma-separated subset of: {', '.join(GROUP_BY)}"
            )
        if item not in keys:
            keys.append(item)
    return keys


def _parse_provinces(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    codes = [i.strip() for i in items if i.strip()]
    bad = [c for c in codes if c not in provinces()]
    if bad:
        raise ParameterError(
            "province",
            f"unknown province code(s) {', '.join(map(repr, bad))}; use the two-digit 2008 codes, e.g. 01,79",
        )
    return sorted(set(codes))


class AnalyticsUnavailable(RuntimeError):
    """The analytics store cannot be asked right now (down, or its owner is not running)."""


class RemoteAnalytics:
    """The Analytics calls, forwarded over HTTP to the process that owns a chDB folder."""

    METHODS = ("national_summary", "province_summary", "all_provinces", "doses", "coverage", "status")

    def __init__(self, url_source, timeout_s: float = 60.0):
        # url_source: the base URL, or a callable returning it (read when called: the owner may restart)
        self._url_source = url_source
        self.timeout_s = timeout_s

    def _url(self) -> str:
        url = self._url_source() if callable(self._url_source) else self._url_source
        if not url:
            raise AnalyticsUnavailable(
                "the ClickHouse sink, which owns the chDB folder and answers analytics, is not running"
            )
        return url

    def call(self, method: str, **kwargs: Any) -> Any:
        import httpx

        if method not in self.METHODS:
            raise AttributeError(method)
        try:
            reply = httpx.post(f"{self._url()}/call/{method}", json=kwargs, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise AnalyticsUnavailable(f"the ClickHouse sink does not answer ({type(exc).__name__}: {exc})") from exc
        body = reply.json()
        if reply.status_code == 400:
            raise ParameterError(body.get("param", "request"), body["error"].split(": ", 1)[-1])
        if reply.status_code != 200:
            raise AnalyticsUnavailable(body.get("error", f"HTTP {reply.status_code}"))
        return body

    def __getattr__(self, name: str):
        if name in self.METHODS:
            return lambda *args, **kwargs: self.call(name, **_positional(name, args), **kwargs)
        raise AttributeError(name)


def _positional(method: str, args: tuple) -> dict[str, Any]:
    names = {
        "province_summary": ("code", "as_of"),
        "doses": ("group_by", "from_", "to", "province"),
        "coverage": ("by", "as_of"),
    }.get(method, ("as_of",))
    return dict(zip(names, args))


def sink_url_path(settings) -> Path:
    """Where the sink process writes the URL of its query endpoint (chDB mode)."""
    return settings.run_dir / "sink.url"


def analytics_for(settings, *, pool_size: int = 4) -> Analytics | RemoteAnalytics:
    """How a process other than the sink reaches the analytics: directly (server), or via the sink (chDB)."""
    url = settings.analytics_url()
    if url.startswith("chdb:"):
        path = sink_url_path(settings)

        def read_url() -> str | None:
            try:
                return path.read_text().strip() or None
            except FileNotFoundError:
                return None

        return RemoteAnalytics(read_url)
    return Analytics(StorePool(url, size=pool_size, purpose="nhdp api"))


# -- agreement with PostgreSQL --------------------------------------------------------------------

_COMPARED = [f for f in read_models.FIGURES]


def compare_summaries(label: str, postgres: Mapping[str, Any], clickhouse: Mapping[str, Any]) -> list[str]:
    """One line per figure (or key of a keyed figure) that differs."""
    out = []
    for figure in _COMPARED:
        a, b = postgres.get(figure), clickhouse.get(figure)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            for key in sorted(set(a) | set(b), key=lambda k: (len(k), k)):
                if a.get(key, 0) != b.get(key, 0):
                    out.append(f"{label} {figure}[{key}]: postgres={a.get(key, 0)} clickhouse={b.get(key, 0)}")
        elif isinstance(a, float) or isinstance(b, float):
            if not math.isclose(a or 0.0, b or 0.0, rel_tol=0, abs_tol=1e-9):
                out.append(f"{label} {figure}: postgres={a} clickhouse={b}")
        elif a != b:
            out.append(f"{label} {figure}: postgres={a} clickhouse={b}")
    return out


def diff_with_postgres(analytics, conn, namespace: str = "proj") -> list[str]:
    """Every figure from ClickHouse (no as_of) against the PostgreSQL projections, per province and nationally."""
    out = []
    pg_all = {p["province_code"]: p for p in read_models.all_provinces(conn, namespace)}
    ch_all = {p["province_code"]: p for p in analytics.all_provinces()}
    for code in sorted(set(pg_all) | set(ch_all)):
        out += compare_summaries(f"province {code}", pg_all.get(code, {}), ch_all.get(code, {}))
    out += compare_summaries("national", read_models.national_summary(conn, namespace), analytics.national_summary())
    return out


def region_of(code: str) -> str:
    return provinces()[code].region


__all__ = [
    "Analytics",
    "AnalyticsUnavailable",
    "COVERAGE_BY",
    "GROUP_BY",
    "MIGRATIONS",
    "NEVER_MS",
    "ParameterError",
    "RemoteAnalytics",
    "StorePool",
    "analytics_for",
    "compare_summaries",
    "cut_ms",
    "diff_with_postgres",
    "dirty_hours",
    "ensure_schema",
    "figure_rows",
    "figure_values",
    "migrate",
    "parse_as_of",
    "refresh_rollups",
    "regions",
]

"""The rollups: caches of FINAL sums per hour and per local day, recomputed whole for dirty hours."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from projections.clickhouse.schema import _dt, day_hours, local_day
from projections.clickhouse.store import AnalyticsStore, chunks

DIRTY_HOURS_SQL = """
SELECT hour FROM hour_marks
GROUP BY hour
HAVING maxIf(version, mark = 0) > maxIf(version, mark = 1) {through}
ORDER BY hour
"""

# A recompute at version v leaves an hour changed by a later batch dirty whatever it reads: such an
# hour (a batch being written beside it) is skipped, and a loop of recomputes always ends.
_THROUGH = "AND maxIf(version, mark = 0) <= %(through)s"


def dirty_hours(store: AnalyticsStore, through: int | None = None) -> list[int]:
    """Hours (epoch seconds) whose data changed after their rollups were last recomputed;
    `through`: only those whose last change a recompute at that version can mark clean."""
    sql = DIRTY_HOURS_SQL.format(through="" if through is None else _THROUGH)
    return [int(h.timestamp()) for (h,) in store.execute(sql, None if through is None else {"through": through})]


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


def refresh_rollups(store: AnalyticsStore, version: int, hours: Sequence[int] | None = None, limit: int = 240) -> int:
    """Recompute the rollups of dirty hours (at most `limit`, oldest first); returns how many.

    `version`: every batch at or below it is wholly written (Sink.refresh_version); an hour
    changed by a later one is left dirty. Safe to run at any time, any number of times.
    """
    todo = sorted(dirty_hours(store, through=version) if hours is None else hours)[:limit]
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
# marks its target's hour dirty too (writer.py), because a voided
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
HAVING maxIf(version, mark = 0) > maxIf(version, mark = 2) {through}
ORDER BY hour
"""


def dirty_dose_days(store: AnalyticsStore, through: int | None = None) -> dict[date, list[int]]:
    """Local days whose doses_daily rows are stale, with their changed hours (`through` as for dirty_hours)."""
    out: dict[date, list[int]] = {}
    sql = DIRTY_DOSE_HOURS_SQL.format(through="" if through is None else _THROUGH)
    for (h,) in store.execute(sql, None if through is None else {"through": through}):
        hour = int(h.timestamp())
        out.setdefault(local_day(hour), []).append(hour)
    return out


# One recomputation reads the doses of several stale days at once (a lull after a backfill
# or a replay leaves dozens, most with few doses: one query each was most of the sink's
# ClickHouse time after such a lull), but at most this many doses unless one day alone has
# more: uniqExact keeps every id of a group in memory, for each of the 8 groupings.
DOSES_PER_REFRESH = 200_000


_DOSES_PER_DAY_SQL = "SELECT day, count() FROM events WHERE hour IN %(hours)s AND kind = 3 GROUP BY day"


def packed(days: Sequence[tuple[date, list[int]]], doses: dict[date, int], budget: int) -> list[list]:
    """Consecutive runs of `days` whose doses add up to at most `budget` (a day over it alone)."""
    groups: list[list] = []
    total = budget + 1
    for day in days:
        n = doses.get(day[0], 0)
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(day)
        total += n
    return groups


def refresh_doses(store: AnalyticsStore, version: int, limit: int = 31) -> int:
    """Recompute doses_daily for stale local days (at most `limit`, oldest first); returns how many.
    `version` as for refresh_rollups; safe to repeat at any time."""
    todo = sorted(dirty_dose_days(store, through=version).items())[:limit]
    if not todo:
        return 0
    every_hour = tuple(_dt(h) for day, _ in todo for h in day_hours(day))
    doses = {day: int(n) for day, n in store.execute(_DOSES_PER_DAY_SQL, {"hours": every_hour})}
    for group in packed(todo, doses, DOSES_PER_REFRESH):
        days = tuple(day for day, _ in group)
        store.execute(
            REFRESH_DOSES_SQL,
            {"hours": tuple(_dt(h) for day in days for h in day_hours(day)), "days": days, "version": version},
        )
        store.insert(
            "hour_marks", ["hour", "mark", "version"], [(h, 2, version) for _, changed in group for h in changed]
        )
    return len(todo)

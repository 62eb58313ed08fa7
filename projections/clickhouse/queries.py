"""Every analytics answer (DESIGN §4, §5), from one store or a pool: summaries as_of T, doses, coverage."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from projections.clickhouse.connect import StorePool
from projections.clickhouse.rollups import dirty_dose_days, dirty_hours
from projections.clickhouse.schema import FULLY, HCM, HOUR_MS, NEVER_MS, PEOPLE, _dt, applied_versions, day_hours
from projections.clickhouse.store import AnalyticsStore, AnalyticsStoreError
from projections.counting import ADVERSE, ALLOCATION, DECLARATION, DOSE, REGISTRATION
from projections.postgres import read_models
from schemas.reference import (
    DEFAULT_SCHEME,
    UnknownScheme,
    fold,
    provinces,
    scheme_of,
    unit_of,
    units,
    unknown_unit,
)

GROUP_BY = ("province", "day", "vaccine", "dose_number")


COVERAGE_BY = ("province", "region")


_GROUP_COLUMN = {"province": "province_code", "day": "day", "vaccine": "vaccine", "dose_number": "dose_number"}


class ParameterError(ValueError):
    """A request parameter is wrong; `param` names it and the message says what is allowed."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


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


class Analytics:
    """Every analytics answer, from one ClickHouse store (or a StorePool).

    Arguments are plain JSON values (strings, None) and so are the answers, so
    that the same calls can be forwarded over HTTP to the process that owns a
    chDB folder (projections.clickhouse.remote serves them in the sink, RemoteAnalytics sends them).
    Bad arguments raise ParameterError naming the parameter and what is allowed.
    """

    def __init__(self, store: AnalyticsStore | StorePool, limits: Mapping[str, int] | None = None):
        # limits: ClickHouse settings every SELECT of these calls runs with (the API's
        # max_execution_time and max_rows_to_read); none for verify and replay, which read everything.
        self._source = store
        self._settings = " SETTINGS " + ", ".join(f"{k} = {int(v)}" for k, v in limits.items()) if limits else ""

    def _run(self, fn, *args):
        if isinstance(self._source, StorePool):
            store = self._source.acquire()
            broken = False
            try:
                return fn(self._limited(store), *args)
            except AnalyticsStoreError as exc:
                broken = bool(exc.retryable)
                raise
            finally:
                self._source.release(store, broken)
        return fn(self._limited(self._source), *args)

    def _limited(self, store: AnalyticsStore) -> AnalyticsStore:
        return _WithSettings(store, self._settings) if self._settings else store

    # -- summaries (DESIGN §4), the shapes of projections.postgres.read_models ------------------
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

    def province_summary(self, code: str, as_of: str | None = None, scheme: str | None = None) -> dict[str, Any]:
        scheme = _scheme(scheme)
        unit = units(scheme).get(code)
        if unit is None:
            raise ParameterError("code", unknown_unit(code, scheme))
        values = fold(self._values(as_of, unit.parts), scheme).get(code, {})
        return read_models._province_dict(code, values, _populations(), scheme)

    def all_provinces(self, as_of: str | None = None, scheme: str | None = None) -> list[dict[str, Any]]:
        scheme = _scheme(scheme)
        by_unit = fold(self._values(as_of), scheme)
        pops = _populations()
        return [read_models._province_dict(code, by_unit.get(code, {}), pops, scheme) for code in units(scheme)]

    # -- doses grouped ----------------------------------------------------------------------
    def doses(
        self,
        group_by: str | None = None,
        from_: str | None = None,
        to: str | None = None,
        province: str | None = None,
        scheme: str | None = None,
        as_of: str | None = None,
    ) -> dict[str, Any]:
        scheme = _scheme(scheme)
        cut = cut_ms(parse_as_of(as_of))
        keys = _parse_group_by(group_by)
        first, last = parse_day("from", from_), parse_day("to", to)
        if first and last and first > last:
            raise ParameterError("from", f"{first} is after to={last}")
        codes = _parse_provinces(province, scheme)
        cols = [_GROUP_COLUMN[k] for k in keys]
        parts = codes
        if scheme != DEFAULT_SCHEME:
            # Events keep their 2008 codes: filter on a unit's parts and group by the unit, in
            # ClickHouse, so that people are distinct across the parts (not a sum of them).
            merged = units(scheme)
            parts = None if codes is None else sorted(p for c in codes for p in merged[c].parts)
            if "province" in keys:
                into = unit_of(scheme)
                cols[keys.index("province")] = _transform(
                    "province_code", sorted(into), [into[o] for o in sorted(into)]
                )
        # Grouped by day, a day's answer is one doses_daily row per group, as long as the
        # province filter is one province or the province is grouped (else people would
        # have to be distinct across several provinces' rows), and the groups are 2008's.
        # As of T (doses and voids that occurred before it, DESIGN §4), from `events` only.
        by_day = (
            "day" in keys
            and cut == NEVER_MS
            and (
                (scheme == DEFAULT_SCHEME and (codes is None or len(codes) == 1 or "province" in keys))
                or (scheme != DEFAULT_SCHEME and codes is None and "province" not in keys)
            )
        )
        rows = self._run(lambda store: self._doses_rows(store, keys, cols, first, last, parts, by_day, cut=cut))
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
            "scheme": scheme,
            "as_of": as_of,
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
        cut: int = NEVER_MS,
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
        if cut < NEVER_MS:
            where[1] = "event_id NOT IN (SELECT target_id FROM voids WHERE occurred_ms < %(cut)s)"
            where += ["hour < %(cut_hour)s", "toInt64(toUInt32(occurred_at)) * 1000 + occurred_ms < %(cut)s"]
            params["cut"], params["cut_hour"] = cut, _dt(min(cut // HOUR_MS * 3600 + 3600, _FAR))
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
    def coverage(
        self, by: str | None = "province", as_of: str | None = None, scheme: str | None = None
    ) -> dict[str, Any]:
        scheme = _scheme(scheme)
        by = (by or "province").strip()
        if by not in COVERAGE_BY:
            raise ParameterError("by", f"{by!r} is not allowed; use one of: {', '.join(COVERAGE_BY)}")
        if by == "region" and scheme != DEFAULT_SCHEME:
            raise ParameterError(
                "by", "regions are groups of the 2008 units (seven 2025 units span two); use scheme=2008 with by=region"
            )
        by_province = fold(self._values(as_of), scheme)
        refs = units(scheme)
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
        return {"by": by, "as_of": as_of, "scheme": scheme, "national": national, "rows": rows}

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


_SELECT = re.compile(r"^\s*(?:SELECT|WITH)\b", re.I)


class _WithSettings:
    """A store whose SELECTs end in a SETTINGS clause. Both engines take the clause at
    the end of a query, and apply it to its subqueries and UNION branches as well."""

    def __init__(self, store: AnalyticsStore, clause: str):
        self._store, self._clause, self.engine = store, clause, store.engine

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        if _SELECT.match(sql):
            sql = sql.rstrip().rstrip(";") + self._clause
        return self._store.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


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


def _parse_provinces(value: str | Sequence[str] | None, scheme: str = DEFAULT_SCHEME) -> list[str] | None:
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    codes = [i.strip() for i in items if i.strip()]
    bad = [c for c in codes if c not in units(scheme)]
    if bad:
        raise ParameterError("province", unknown_unit(", ".join(map(repr, bad)), scheme, quoted=True))
    return sorted(set(codes))


def _scheme(value: str | None) -> str:
    try:
        return scheme_of(value)
    except UnknownScheme as exc:
        raise ParameterError("scheme", str(exc)) from None


def _transform(column: str, old: Sequence[str], new: Sequence[str]) -> str:
    """A ClickHouse expression mapping column's values (codes: two digits, safe to inline)."""
    assert all(re.fullmatch(r"\d\d", c) for c in [*old, *new])
    return f"transform({column}, [{', '.join(repr(c) for c in old)}], [{', '.join(repr(c) for c in new)}], {column})"


def region_of(code: str) -> str:
    return provinces()[code].region

"""Queries over the PostgreSQL projections (projections.postgres.projector) for the API.

Every summary is read from the `counters` table (one small query over at most
a few thousand rows), never by aggregating events, so the national summary
stays fast under many concurrent clients. Figures are named as in DESIGN §4.

`populations` maps province code to its 2019 population; None means the
reference data (schemas.reference). coverage_pct and full_coverage_pct are
computed here, at read time, rounded to 6 decimals.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from schemas.figures import FIGURES, KEYED_FIGURES, SCALAR_FIGURES
from schemas.reference import DEFAULT_SCHEME, fold, provinces, units


def _ns(namespace: str) -> sql.Identifier:
    return sql.Identifier(namespace)


def _populations(populations: Mapping[str, int] | None) -> dict[str, int]:
    if populations is None:
        return {code: p.population for code, p in provinces().items()}
    return dict(populations)


def _pct(part: int, whole: int | None) -> float:
    return round(part / whole * 100, 6) if whole else 0.0


def _summary(values: Mapping[tuple[str, str], int], population: int | None) -> dict[str, Any]:
    """Figures from {(figure, key): value}."""
    out: dict[str, Any] = {f: int(values.get((f, ""), 0)) for f in SCALAR_FIGURES}
    for f in KEYED_FIGURES:
        keyed = {k: int(v) for (fig, k), v in values.items() if fig == f and v}
        order = (lambda k: (len(k), k)) if f == "doses_by_number" else (lambda k: k)
        out[f] = {k: keyed[k] for k in sorted(keyed, key=order)}
    out["coverage_pct"] = _pct(out["people_vaccinated"], population)
    out["full_coverage_pct"] = _pct(out["people_fully_vaccinated"], population)
    out["doses_remaining"] = out["doses_allocated"] - out["doses_administered"]
    return {f: out[f] for f in FIGURES}


def _province_dict(
    code: str, values: Mapping[tuple[str, str], int], pops: Mapping[str, int], scheme: str = DEFAULT_SCHEME
) -> dict[str, Any]:
    """One unit's summary; its population is the sum of its 2008 parts' (pops is per 2008 code)."""
    unit = units(scheme).get(code)
    if unit is None:
        population = pops.get(code)
    else:
        population = sum(pops.get(part, provinces()[part].population) for part in unit.parts)
    return {
        "province_code": code,
        "name": unit.name_vi if unit else code,
        "population": population,
        **_summary(values, population),
    }


def national_summary(
    conn: psycopg.Connection, namespace: str = "proj", populations: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Every figure for the nation (the sum over provinces), plus its population."""
    pops = _populations(populations)
    rows = conn.execute(
        sql.SQL("SELECT figure, key, sum(value)::bigint FROM {}.counters GROUP BY figure, key").format(_ns(namespace))
    ).fetchall()
    population = sum(pops.values())
    return {"population": population, **_summary({(f, k): v for f, k, v in rows}, population)}


def province_summary(
    conn: psycopg.Connection,
    namespace: str,
    code: str,
    populations: Mapping[str, int] | None = None,
    scheme: str = DEFAULT_SCHEME,
) -> dict[str, Any] | None:
    """Every figure for one unit of `scheme` (the sum of its 2008 parts); None for a code that is none."""
    pops = _populations(populations)
    unit = units(scheme).get(code)
    if unit is None and (scheme != DEFAULT_SCHEME or code not in pops):
        return None
    parts = list(unit.parts) if unit else [code]
    rows = conn.execute(
        sql.SQL(
            "SELECT figure, key, sum(value)::bigint FROM {}.counters WHERE province = ANY(%s) GROUP BY figure, key"
        ).format(_ns(namespace)),
        (parts,),
    ).fetchall()
    return _province_dict(code, {(f, k): v for f, k, v in rows}, pops, scheme)


def all_provinces(
    conn: psycopg.Connection,
    namespace: str = "proj",
    populations: Mapping[str, int] | None = None,
    scheme: str = DEFAULT_SCHEME,
) -> list[dict[str, Any]]:
    """The summary of every unit of `scheme` (all of them, zeros where nothing happened), by code."""
    pops = _populations(populations)
    by_province: dict[str, dict[tuple[str, str], int]] = {}
    rows = conn.execute(
        sql.SQL("SELECT province, figure, key, value FROM {}.counters WHERE value <> 0").format(_ns(namespace))
    ).fetchall()
    for province, figure, key, value in rows:
        by_province.setdefault(province, {})[(figure, key)] = value
    by_unit = fold(by_province, scheme)
    codes = sorted(set(units(scheme)) | (set(pops) if scheme == DEFAULT_SCHEME else set()))
    return [_province_dict(code, by_unit.get(code, {}), pops, scheme) for code in codes]


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


_RECORD_SQL = """
SELECT 'dose', event_id, occurred_at, province, site_id, vaccine, dose_number, lot, NULL, NULL::timestamptz,
       NULL::timestamptz, voided_by IS NOT NULL
FROM {ns}.events WHERE subject_id = %(s)s AND etype = 3
UNION ALL
SELECT CASE WHEN flag THEN 'serious' ELSE 'adverse' END, event_id, occurred_at, province, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, false
FROM {ns}.events WHERE subject_id = %(s)s AND etype = 4 AND voided_by IS NULL
UNION ALL
SELECT CASE WHEN v.kind = 1 THEN 'appointment' ELSE 'check-in' END, v.event_id, v.occurred_at, v.province,
       v.site_id, NULL, v.dose_number, NULL, v.appointment_id, v.slot_start, v.slot_end, false
FROM {ns}.visits v LEFT JOIN {ns}.events x ON x.event_id = v.event_id
WHERE v.subject_id = %(s)s AND x.voided_by IS NULL
ORDER BY 3, 2
"""


def citizen_record(conn: psycopg.Connection, namespace: str, subject_id: str) -> dict[str, Any] | None:
    """One subject's valid doses, appointments, check-ins and adverse events, each by (time, event_id);
    None if nothing of theirs was ever seen. Voided items are left out (voided doses are counted)."""
    rows = conn.execute(sql.SQL(_RECORD_SQL).format(ns=_ns(namespace)), {"s": subject_id}).fetchall()
    if not rows:
        return None
    # One statement, one snapshot: the state is derived here from the same rows
    # (it equals the subjects row, which is the same function of them).
    by_kind: dict[str, list[tuple]] = {}
    for r in rows:
        by_kind.setdefault(r[0], []).append(r)
    all_doses = by_kind.get("dose", [])
    doses = [r for r in all_doses if not r[11]]
    first = doses[0] if doses else None
    fully = len(doses) >= 2 or any(d[5] == "janssen" for d in doses)
    return {
        "subject_id": subject_id,
        "doses": [
            {
                "event_id": str(r[1]),
                "occurred_at": _iso(r[2]),
                "province_code": r[3],
                "vaccine": r[5],
                "dose_number": r[6],
                "site_id": r[4],
                "lot_number": r[7],
            }
            for r in doses
        ],
        "valid_doses": len(doses),
        "voided_doses": len(all_doses) - len(doses),
        "vaccinated": bool(doses),
        "fully_vaccinated": fully,
        # where people_vaccinated counts this subject: the earliest valid dose's province
        "counted_in_province": first[3] if first else None,
        "earliest_dose_event_id": str(first[1]) if first else None,
        "appointments": [
            {
                "event_id": str(r[1]),
                "appointment_id": r[8],
                "site_id": r[4],
                "province_code": r[3],
                "slot_start": _iso(r[9]),
                "slot_end": _iso(r[10]),
                "dose_number": r[6],
            }
            for r in by_kind.get("appointment", [])
        ],
        "check_ins": [
            {
                "event_id": str(r[1]),
                "occurred_at": _iso(r[2]),
                "site_id": r[4],
                "province_code": r[3],
                "appointment_id": r[8],
            }
            for r in by_kind.get("check-in", [])
        ],
        "adverse_events": len(by_kind.get("adverse", [])) + len(by_kind.get("serious", [])),
        "serious_adverse_events": [
            {"event_id": str(r[1]), "occurred_at": _iso(r[2]), "province_code": r[3]}
            for r in by_kind.get("serious", [])
        ],
    }


def record_provinces(record: Mapping[str, Any]) -> set[str]:
    """The provinces where anything of the record happened: a province reads the records it has a part in."""
    return {
        item["province_code"]
        for part in ("doses", "appointments", "check_ins", "serious_adverse_events")
        for item in record[part]
    }


# -- comparing two namespaces (nhdp replay --verify) ------------------------------

_COUNTER_DIFF = """
SELECT coalesce(a.province, b.province), coalesce(a.figure, b.figure), coalesce(a.key, b.key),
       coalesce(a.value, 0), coalesce(b.value, 0)
FROM {a}.counters a FULL JOIN {b}.counters b USING (province, figure, key)
WHERE coalesce(a.value, 0) <> coalesce(b.value, 0)
ORDER BY 1, 2, 3
"""

# A subject row with no valid dose is the same state as no row at all (whether
# a row exists depends on arrival order). prev_* are not state.
_SUBJECT_STATE = ("province", "first_at", "first_dose", "valid_doses", "janssen", "fully")
_SUBJECT_DIFF = """
SELECT coalesce(a.subject_id, b.subject_id), {a_cols}, {b_cols}
FROM {a}.subjects a FULL JOIN {b}.subjects b USING (subject_id)
WHERE ({a_cols}) IS DISTINCT FROM ({b_cols})
ORDER BY 1
LIMIT %(limit)s
"""


def _subject_cols(alias: str) -> sql.Composable:
    cols = [sql.SQL(f"{alias}.") + sql.Identifier(c) for c in _SUBJECT_STATE]
    cols[3] = sql.SQL("coalesce({}, 0)").format(cols[3])
    cols[4] = sql.SQL("coalesce({}, false)").format(cols[4])
    cols[5] = sql.SQL("coalesce({}, false)").format(cols[5])
    return sql.SQL(", ").join(cols)


# Arrived facts, their content and whether they are voided. A placeholder
# (a void whose target never came) has no figures, so it is not compared.
_EVENT_COLUMNS = (
    "etype",
    "province",
    "occurred_at",
    "subject_id",
    "vaccine",
    "dose_number",
    "site_id",
    "flag",
    "amount",
    "allocation_id",
    "recipient",
    "lot",
)
_EVENT_DIFF = """
SELECT coalesce(a.event_id, b.event_id), {a_cols}, a.voided_by IS NOT NULL, {b_cols}, b.voided_by IS NOT NULL
FROM (SELECT * FROM {a}.events WHERE etype IS NOT NULL) a
FULL JOIN (SELECT * FROM {b}.events WHERE etype IS NOT NULL) b USING (event_id)
WHERE ({a_cols}, a.voided_by IS NOT NULL) IS DISTINCT FROM ({b_cols}, b.voided_by IS NOT NULL)
ORDER BY 1
LIMIT %(limit)s
"""


# Appointments and check-ins: each one's content (a void of one shows in the events diff, as its placeholder).
_VISIT_COLUMNS = (
    "kind",
    "subject_id",
    "province",
    "site_id",
    "appointment_id",
    "occurred_at",
    "slot_start",
    "slot_end",
    "dose_number",
)
_VISIT_DIFF = """
SELECT coalesce(a.event_id, b.event_id), {a_cols}, {b_cols}
FROM {a}.visits a FULL JOIN {b}.visits b USING (event_id)
WHERE ({a_cols}) IS DISTINCT FROM ({b_cols})
ORDER BY 1
LIMIT %(limit)s
"""


def _figure_name(figure: str, key: str) -> str:
    return f"{figure}[{key}]" if key else figure


def diff_namespaces(conn: psycopg.Connection, a: str, b: str, limit: int = 1000) -> list[str]:
    """Differences between the projections of namespaces a and b, one line each.

    Compares every counter (per province and figure), every subject's dose
    state, every stored fact (content and voided or not) and every visit. Offsets are not
    compared: a replay runs under its own consumer group. At most `limit`
    lines per kind of row.
    """
    ids = {"a": _ns(a), "b": _ns(b)}
    out: list[str] = []
    rows = conn.execute(sql.SQL(_COUNTER_DIFF).format(**ids)).fetchall()
    national: dict[str, list[int]] = {}
    for province, figure, key, va, vb in rows[:limit]:
        out.append(f"province {province} {_figure_name(figure, key)}: {a}={va} {b}={vb}")
    for province, figure, key, va, vb in rows:
        n = national.setdefault(_figure_name(figure, key), [0, 0])
        n[0] += va
        n[1] += vb
    for name, (va, vb) in sorted(national.items()):
        if va != vb:
            out.append(f"national {name}: {a}={va} {b}={vb}")

    q = sql.SQL(_SUBJECT_DIFF).format(a_cols=_subject_cols("a"), b_cols=_subject_cols("b"), **ids)
    n = len(_SUBJECT_STATE)
    for sid, *vals in conn.execute(q, {"limit": limit}).fetchall():
        sa, sb = vals[:n], vals[n:]
        parts = [f"{name}: {a}={x} {b}={y}" for name, x, y in zip(_SUBJECT_STATE, sa, sb) if x != y]
        out.append(f"subject {sid} " + "; ".join(parts))

    cols_a = sql.SQL(", ").join(sql.SQL("a.") + sql.Identifier(c) for c in _EVENT_COLUMNS)
    cols_b = sql.SQL(", ").join(sql.SQL("b.") + sql.Identifier(c) for c in _EVENT_COLUMNS)
    q = sql.SQL(_EVENT_DIFF).format(a_cols=cols_a, b_cols=cols_b, **ids)
    n = len(_EVENT_COLUMNS) + 1
    for eid, *vals in conn.execute(q, {"limit": limit}).fetchall():
        ea, eb = vals[:n], vals[n:]
        if ea[0] is None or eb[0] is None:
            missing = a if ea[0] is None else b
            out.append(f"event {eid}: missing in {missing}")
            continue
        parts = [f"{name}: {a}={x} {b}={y}" for name, x, y in zip((*_EVENT_COLUMNS, "voided"), ea, eb) if x != y]
        out.append(f"event {eid} " + "; ".join(parts))

    cols_a = sql.SQL(", ").join(sql.SQL("a.") + sql.Identifier(c) for c in _VISIT_COLUMNS)
    cols_b = sql.SQL(", ").join(sql.SQL("b.") + sql.Identifier(c) for c in _VISIT_COLUMNS)
    n = len(_VISIT_COLUMNS)
    for eid, *vals in conn.execute(sql.SQL(_VISIT_DIFF).format(a_cols=cols_a, b_cols=cols_b, **ids), {"limit": limit}):
        va, vb = vals[:n], vals[n:]
        if va[0] is None or vb[0] is None:
            out.append(f"visit {eid}: missing in {a if va[0] is None else b}")
        else:
            parts = [f"{name}: {a}={x} {b}={y}" for name, x, y in zip(_VISIT_COLUMNS, va, vb) if x != y]
            out.append(f"visit {eid} " + "; ".join(parts))
    return out

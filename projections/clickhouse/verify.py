"""Agreement of the ClickHouse figures with the PostgreSQL projections, figure by figure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from projections.postgres import read_models

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

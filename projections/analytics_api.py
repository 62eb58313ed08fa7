"""HTTP endpoints answered from ClickHouse (DESIGN §5): as_of summaries and analytics.

    GET /v1/national/summary?as_of=T           (projections/api.py hands as_of requests here)
    GET /v1/provinces/{code}/summary?as_of=T
    GET /v1/provinces?as_of=T
    GET /v1/analytics/doses?group_by=province,day,vaccine,dose_number&from=2021-08-01&to=2021-08-30&province=79,01
    GET /v1/analytics/coverage?by=province|region[&as_of=T]

Without as_of the summaries stay on the PostgreSQL counters (live, cheapest);
with as_of they come from ClickHouse with DESIGN §4's semantics, in the same
shape. Which ClickHouse: the server directly, or, when the analytics store
is embedded chDB, the sink process that owns the folder, over HTTP
(projections.clickhouse.remote.analytics_for). A bad parameter is a 400 that names it
and the allowed values; ClickHouse (or the chDB owner) unreachable is a 503.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import ORJSONResponse
from starlette.concurrency import run_in_threadpool

from projections.clickhouse.queries import ParameterError
from projections.clickhouse.remote import AnalyticsUnavailable, analytics_for
from projections.clickhouse.store import AnalyticsStoreError

router = APIRouter(tags=["analytics"])
_lock = threading.Lock()


def _error(status: int, message: str) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status)


def _analytics(request: Request):
    state = request.app.state
    found = getattr(state, "analytics", None)
    if found is None:
        with _lock:
            found = getattr(state, "analytics", None)
            if found is None:
                found = state.analytics = analytics_for(state.queries.settings)
    return found


async def call(request: Request, method: str, **kwargs: Any):
    """Run one Analytics call off the event loop; errors become 400 or 503 with the reason."""
    try:
        return await run_in_threadpool(getattr(_analytics(request), method), **kwargs)
    except ParameterError as exc:
        return _error(400, str(exc))
    except (AnalyticsUnavailable, AnalyticsStoreError) as exc:
        return _error(503, f"analytics store unavailable: {exc}"[:2000])


@router.get("/v1/analytics/doses", summary="Valid doses and distinct people, grouped (ClickHouse)")
async def doses(
    request: Request,
    group_by: str | None = Query(None, description="comma-separated subset of province, day, vaccine, dose_number"),
    from_: str | None = Query(None, alias="from", description="first local day (Asia/Ho_Chi_Minh), YYYY-MM-DD"),
    to: str | None = Query(None, description="last local day, inclusive, YYYY-MM-DD"),
    province: str | None = Query(None, description="comma-separated province codes"),
):
    return await call(request, "doses", group_by=group_by, from_=from_, to=to, province=province)


@router.get("/v1/analytics/coverage", summary="Coverage against 2019 population, ranked against the nation")
async def coverage(
    request: Request,
    by: str = Query("province", description="province or region"),
    as_of: str | None = Query(None, description="RFC 3339; events before it"),
):
    return await call(request, "coverage", by=by, as_of=as_of)

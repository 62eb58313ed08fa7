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

Bounded: the calls run on threads of their own (an anyio CapacityLimiter, not the
default one the gateway's publishes use), wait at most NHDP_ANALYTICS_WAIT_S for one
of the NHDP_ANALYTICS_CONNECTIONS connections (then 503 + Retry-After), and each
SELECT runs with max_execution_time (then 504) and max_rows_to_read (then 422). In
chDB mode the sink process runs the queries and only the HTTP call's timeout applies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import ORJSONResponse

from infra.settings import Settings
from projections.clickhouse.connect import PoolBusy, StorePool
from projections.clickhouse.queries import Analytics, ParameterError
from projections.clickhouse.remote import AnalyticsUnavailable, RemoteAnalytics, analytics_for
from projections.clickhouse.store import AnalyticsStoreError
from schemas.access import Right
from schemas.api_auth import Authenticated, forbidden
from schemas.reference import DEFAULT_SCHEME, UnknownScheme, scheme_of

router = APIRouter(tags=["analytics"])
_lock = threading.Lock()

RETRY_AFTER_S = 1
SCHEME = Query(
    None,
    description="provincial units: 2008 (the default, the 63 codes events carry) or 2025 (the 34 units of "
    "Resolution 202/2025/QH15; people counted once per unit, in the unit of their earliest dose)",
)
WAIT = Query(
    None,
    ge=0,
    le=30,
    description="read-your-writes: seconds to wait until the analytics store holds every event the log held "
    "when the request arrived (503 if it does not in time)",
)
TIMEOUT_EXCEEDED, TOO_SLOW, TOO_MANY_ROWS = 159, 160, 158  # ClickHouse's error codes


def _error(status: int, message: str) -> ORJSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return ORJSONResponse({"error": message}, status_code=status, headers=headers)


def checked_scheme(who, value: str | None) -> str | ORJSONResponse:
    """The request's scheme of provincial units, or its 400 answer; 403 for a province principal asking
    for 2025's, which add other provinces' figures to its own 2008 unit's."""
    try:
        scheme = scheme_of(value)
    except UnknownScheme as exc:
        return _error(400, f"scheme: {exc}")
    if scheme != DEFAULT_SCHEME and not who.has(Right.READ_ALL):
        raise forbidden(who, Right.READ_ALL, f"figures in the {scheme} units, which combine several 2008 provinces")
    return scheme


def open_analytics(settings: Settings, cls: type[Analytics] = Analytics) -> Analytics | RemoteAnalytics:
    """The API's analytics: a bounded pool with per-query limits (server), or the chDB owner over HTTP."""
    url = settings.analytics_url()
    if url.startswith("chdb:"):
        return analytics_for(settings)
    pool = StorePool(
        url,
        size=settings.analytics_connections,
        purpose="nhdp api",
        wait_s=settings.analytics_wait_s,
        password=settings.analytics_password(),
    )
    return cls(pool, limits=query_limits(settings))


def query_limits(settings: Settings) -> dict[str, int]:
    return {
        "max_execution_time": settings.analytics_max_execution_s,
        "max_rows_to_read": settings.analytics_max_rows_to_read,
    }


def _analytics(request: Request):
    state = request.app.state
    found = getattr(state, "analytics", None)
    if found is None:
        with _lock:
            found = getattr(state, "analytics", None)
            if found is None:
                found = state.analytics = open_analytics(state.queries.settings)
    return found


def _threads(request: Request) -> CapacityLimiter:
    """The analytics calls' own thread tokens: however slow ClickHouse is, they never
    take the default limiter's, which the gateway's publishes and the live queries use."""
    state = request.app.state
    found = getattr(state, "analytics_threads", None)
    if found is None:  # made on the event loop's thread, so never twice
        found = state.analytics_threads = CapacityLimiter(state.queries.settings.api_analytics_concurrency)
    return found


async def call(
    request: Request,
    method: str,
    *,
    wait: float | None = None,
    shape: Callable[[Any], Any] | None = None,
    **kwargs: Any,
):
    """Run one Analytics call off the event loop; errors become 400, 422, 503 or 504 with the reason.

    The answer carries its freshness (projections.freshness): the sink's positions, read
    before the query, so the answer reflects at least them; with wait, only once they
    reach the log's end as of the request."""
    settings: Settings = request.app.state.queries.settings
    freshness = request.app.state.queries.freshness
    fn = getattr(_analytics(request), method)
    try:
        if wait:
            try:
                positions = await to_thread.run_sync(lambda: freshness.wait_for_sink(wait), limiter=_threads(request))
            except Exception as exc:  # Kafka cannot say where the log ends or where the sink is
                return _error(503, f"cannot tell whether the analytics store is caught up: {exc}"[:500])
            if positions is None:
                return _error(503, f"the analytics store has not caught up with the log within {wait:g} s; retry later")
        else:
            positions = None

        def answer(positions=positions):  # one thread hop; the headers too may ask Kafka
            if positions is None:  # read before the query: the answer reflects at least these
                positions = freshness.recent_sink_positions()
            result = fn(**kwargs)
            if shape is not None:
                result = shape(result)
            return result, freshness.headers("analytics", positions) if positions is not None else {}

        result, headers = await to_thread.run_sync(answer, limiter=_threads(request))
        return ORJSONResponse(result, headers=headers)
    except ParameterError as exc:
        return _error(400, str(exc))
    except PoolBusy as exc:
        return _error(503, f"analytics is busy: {exc}; retry after {RETRY_AFTER_S} s")
    except AnalyticsStoreError as exc:
        if exc.code in (TIMEOUT_EXCEEDED, TOO_SLOW):
            return _error(
                504,
                f"the analytics query ran over its time limit of {settings.analytics_max_execution_s} s "
                "(NHDP_ANALYTICS_MAX_EXECUTION_S); narrow it (from, to, province) or try again later",
            )
        if exc.code == TOO_MANY_ROWS:
            return _error(
                422,
                f"the analytics query would read more than {settings.analytics_max_rows_to_read:,} rows "
                "(NHDP_ANALYTICS_MAX_ROWS_TO_READ); narrow it (from, to, province)",
            )
        return _error(503, f"analytics store unavailable: {exc}"[:2000])
    except AnalyticsUnavailable as exc:
        return _error(503, f"analytics store unavailable: {exc}"[:2000])


@router.get("/v1/analytics/doses", summary="Valid doses and distinct people, grouped (ClickHouse)")
async def doses(
    request: Request,
    who: Authenticated,
    group_by: str | None = Query(None, description="comma-separated subset of province, day, vaccine, dose_number"),
    from_: str | None = Query(None, alias="from", description="first local day (Asia/Ho_Chi_Minh), YYYY-MM-DD"),
    to: str | None = Query(None, description="last local day, inclusive, YYYY-MM-DD"),
    province: str | None = Query(None, description="comma-separated province codes (of the scheme)"),
    wait: float | None = WAIT,
    scheme: str | None = SCHEME,
    as_of: str | None = Query(None, description="RFC 3339; doses and voids that occurred before it"),
):
    if isinstance(scheme := checked_scheme(who, scheme), ORJSONResponse):
        return scheme
    if not who.has(Right.READ_ALL):
        if not who.has(Right.READ_PROVINCE):
            raise forbidden(who, Right.READ_ALL, "analytics")
        if province not in (None, who.province):
            raise forbidden(who, Right.READ_ALL, f"analytics of provinces other than {who.province}")
        province = who.province  # filtered to its own
    return await call(
        request,
        "doses",
        wait=wait,
        group_by=group_by,
        from_=from_,
        to=to,
        province=province,
        scheme=scheme,
        as_of=as_of,
    )


@router.get("/v1/analytics/coverage", summary="Coverage against 2019 population, ranked against the nation")
async def coverage(
    request: Request,
    who: Authenticated,
    by: str = Query("province", description="province or region"),
    as_of: str | None = Query(None, description="RFC 3339; events before it"),
    wait: float | None = WAIT,
    scheme: str | None = SCHEME,
):
    shape = None
    if isinstance(scheme := checked_scheme(who, scheme), ORJSONResponse):
        return scheme
    if not who.has(Right.READ_ALL):
        if not who.has(Right.READ_PROVINCE):
            raise forbidden(who, Right.READ_ALL, "analytics")
        if by != "province":
            raise forbidden(who, Right.READ_ALL, f"coverage by {by}")

        def shape(answer: dict[str, Any], code: str = who.province or "") -> dict[str, Any]:
            # its own row, ranked against the nation as before; the national aggregate stays
            return answer | {"rows": [r for r in answer["rows"] if r.get("province_code") == code]}

    return await call(request, "coverage", wait=wait, shape=shape, by=by, as_of=as_of, scheme=scheme)

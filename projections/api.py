"""The query endpoints of DESIGN §5 over the PostgreSQL projections (nhdp.app composes them with the gateway).

Live summaries read the PostgreSQL counters (one small query each); the
citizen record reads the per-subject state. Errors are JSON with a message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from infra.kafka import metadata_ok
from infra.settings import Settings
from projections import analytics_api
from projections.freshness import Freshness
from projections.postgres import read_models
from projections.postgres.tracking import LAG_TOPICS, applied, lag_of, next_offsets
from schemas.access import Right
from schemas.api_auth import Authenticated, forbidden, require
from schemas.ids import is_subject_id
from schemas.log import GroupPositions, LogEnds
from schemas.log import lag as log_lag
from schemas.reference import provinces, units, unknown_unit
from schemas.topics import ANALYTICS_GROUP, TOPIC_EVENTS

NAMESPACE = "proj"


LAG = Gauge("nhdp_consumer_lag", "Messages of health.events not yet applied to the projections", ["partition"])
APPLIED = Gauge("nhdp_events_processed", "Messages of health.events applied to the projections (tracking record)")
DLQ = Gauge("nhdp_dlq_messages", "Messages on health.events.dlq")
SINK_LAG = Gauge("nhdp_sink_lag", "Messages of health.events not yet committed by the ClickHouse sink", ["partition"])


def _error(status: int, message: str) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status)


class Queries:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = ConnectionPool(
            settings.postgres_url, min_size=2, max_size=20, open=True, check=ConnectionPool.check_connection
        )
        self.populations = {code: p.population for code, p in provinces().items()}
        self.live = Coalescer()
        self.log_ends = LogEnds(settings)
        self.sink_positions = GroupPositions(settings, ANALYTICS_GROUP)
        self.freshness = Freshness(
            lambda: {p: o for (_, p), o in self.log_ends((TOPIC_EVENTS,)).items()}, self.sink_positions
        )
        self._lag: asyncio.Future | None = None

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.pool.connection() as conn:
            return fn(conn, NAMESPACE, *args)

    def run_fresh(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, str]]:
        """fn's answer and its freshness headers: the tracking record is read first, so the
        figures reflect at least those positions."""
        with self.pool.connection() as conn:
            positions = next_offsets(conn, NAMESPACE)
            result = fn(conn, NAMESPACE, *args)
        return result, self.freshness.headers("projections", positions)

    def lag(self) -> tuple[dict[int, int], int, int, dict[int, int]]:
        """(lag per partition, messages applied, DLQ size, the sink's lag per partition), as
        tracking.consumer_lag counts them, from long-lived Kafka clients rather than new ones per scrape."""
        with self.pool.connection() as conn:
            done = applied(conn, NAMESPACE)
        sink = self.freshness.sink_positions()  # both before the ends: no lag comes out negative
        ends = self.log_ends(LAG_TOPICS)
        lag, applied_count, dlq = lag_of(ends, done)
        sink_lag = log_lag({p: off for (t, p), off in ends.items() if t == TOPIC_EVENTS}, sink)
        return lag, applied_count, dlq, sink_lag

    def backlog(self) -> tuple[int, int]:
        """(events the projections have not applied, events the sink has not written): back-pressure."""
        lag, _applied, _dlq, sink_lag = self.lag()
        return sum(lag.values()), sum(sink_lag.values())

    async def shared_lag(self) -> tuple[dict[int, int], int, int, dict[int, int]]:
        """lag() with one computation in flight: scrapes that arrive meanwhile share it, so
        a slow Kafka holds one thread, not one per scrape."""
        if self._lag is None or self._lag.done():
            self._lag = asyncio.ensure_future(run_in_threadpool(self.lag))
        return await asyncio.shield(self._lag)

    def close(self) -> None:
        self.sink_positions.close()
        self.log_ends.close()
        self.pool.close()


class Coalescer:
    """One query in flight per summary; requests that arrive meanwhile share its answer.

    Under 50 concurrent dashboards the summary's cost was the thread hop, the pool
    checkout and serialising the dict, once per request (~1 ms). Here it is paid
    once per in-flight query and the JSON bytes are shared. An answer is never
    older than the query that produced it started: at most one query (~1 ms)
    before the request arrived. Nothing is cached after the query ends."""

    def __init__(self) -> None:
        self._inflight: dict[tuple, asyncio.Task] = {}

    async def get(self, key: tuple, compute) -> Response:
        task = self._inflight.get(key)
        if task is None:
            # A task of its own, so a requester that disconnects cancels only its own wait.
            task = asyncio.ensure_future(run_in_threadpool(lambda: _dumped(*compute())))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._inflight.pop(key) if self._inflight.get(key) is done else None)
        body, headers = await asyncio.shield(task)
        return Response(body, media_type="application/json", headers=headers)


def _dumped(result: Any, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return orjson.dumps(result), headers


router = APIRouter(tags=["queries"])
ReadAll = Annotated[Any, Depends(require(Right.READ_ALL))]


def q(request: Request) -> Queries:
    return request.app.state.queries


@router.get("/v1/national/summary", summary="Every figure of DESIGN §4 for the nation", response_model=dict[str, Any])
async def national(
    request: Request,
    who: ReadAll,
    as_of: str | None = None,
    wait: float | None = analytics_api.WAIT,
    scheme: str | None = analytics_api.SCHEME,
):
    if isinstance(
        checked := analytics_api.checked_scheme(who, scheme), Response
    ):  # the nation is the same under either
        return checked
    if as_of is not None:
        return await analytics_api.call(request, "national_summary", wait=wait, as_of=as_of)
    queries = q(request)
    return await q(request).live.get(
        ("national",), lambda: queries.run_fresh(read_models.national_summary, queries.populations)
    )


@router.get(
    "/v1/provinces", summary="The summaries of every province (63, or 34 with scheme=2025)", response_model=list[dict]
)
async def all_provinces(
    request: Request,
    who: ReadAll,
    as_of: str | None = None,
    wait: float | None = analytics_api.WAIT,
    scheme: str | None = analytics_api.SCHEME,
):
    if isinstance(checked := analytics_api.checked_scheme(who, scheme), Response):
        return checked
    if as_of is not None:
        return await analytics_api.call(request, "all_provinces", wait=wait, as_of=as_of, scheme=checked)
    queries = q(request)
    return await q(request).live.get(
        ("provinces", checked),
        lambda: queries.run_fresh(read_models.all_provinces, queries.populations, checked),
    )


@router.get("/v1/provinces/{code}/summary", summary="Every figure of DESIGN §4 for one province")
async def province(
    code: str,
    request: Request,
    who: Authenticated,
    as_of: str | None = None,
    wait: float | None = analytics_api.WAIT,
    scheme: str | None = analytics_api.SCHEME,
):
    if not who.may_read_province(code):
        raise forbidden(who, Right.READ_ALL, f"province {code}'s summary")
    if isinstance(checked := analytics_api.checked_scheme(who, scheme), Response):
        return checked
    if code not in units(checked):
        return _error(404, unknown_unit(code, checked))
    if as_of is not None:
        return await analytics_api.call(request, "province_summary", wait=wait, code=code, as_of=as_of, scheme=checked)
    queries = q(request)
    return await q(request).live.get(
        ("province", code, checked),
        lambda: queries.run_fresh(read_models.province_summary, code, queries.populations, checked),
    )


@router.get(
    "/v1/citizens/{subject_id}/record", summary="One subject's valid doses, appointments, check-ins and adverse events"
)
async def citizen(subject_id: str, request: Request, who: Authenticated):
    if not who.has(Right.READ_ALL) and not who.has(Right.READ_PROVINCE):
        raise forbidden(who, Right.READ_ALL, "a citizen's record")
    if not is_subject_id(subject_id):
        return _error(400, "subject_id: must be the 64-hex-digit pseudonymous id, never a national id")
    record = await run_in_threadpool(q(request).run, read_models.citizen_record, subject_id)
    if not who.has(Right.READ_ALL) and (record is None or who.province not in read_models.record_provinces(record)):
        # the same answer whether the subject has no record or one elsewhere: nothing leaks
        raise forbidden(who, Right.READ_ALL, f"the record of a subject with nothing in province {who.province}")
    if record is None:
        return _error(404, f"nothing recorded for subject {subject_id}")
    return record


@router.get("/healthz", summary="Liveness of each dependency")
async def healthz(request: Request):
    checks: dict[str, str] = {}

    def pg():
        with q(request).pool.connection() as conn:
            conn.execute("SELECT 1")

    def kafka():
        metadata_ok(q(request).settings)

    def registry():
        httpx.get(f"{q(request).settings.registry_url}/healthz", timeout=2).raise_for_status()  # open: no credentials

    for name, fn in (("postgres", pg), ("kafka", kafka), ("registry", registry)):
        try:
            await run_in_threadpool(fn)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"down: {type(exc).__name__}: {exc}"[:300]
    ok = all(v == "ok" for v in checks.values())
    return ORJSONResponse({"status": "ok" if ok else "degraded", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
async def metrics(request: Request, _: Annotated[Any, Depends(require(Right.METRICS))]):
    try:
        lag, done, dlq, sink_lag = await q(request).shared_lag()
        for partition, value in lag.items():
            LAG.labels(str(partition)).set(value)
        for partition, value in sink_lag.items():
            SINK_LAG.labels(str(partition)).set(value)
        APPLIED.set(done)
        DLQ.set(dlq)
    except Exception:
        pass
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

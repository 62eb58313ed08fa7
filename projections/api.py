"""The HTTP API: the gateway (POST /v1/events) plus the query endpoints of DESIGN §5.

Live summaries read the PostgreSQL counters (one small query each); the
citizen record reads the per-subject state. Errors are JSON with a message.
"""

from __future__ import annotations

import asyncio
import gc
import re
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nhdp.settings import Settings
from producers.gateway import Gateway
from producers.gateway import router as gateway_router
from projections import analytics_api, read_models
from schemas.reference import provinces
from streams.worker import consumer_lag

NAMESPACE = "proj"
SUBJECT_ID = re.compile(r"^[0-9a-f]{64}$")

LAG = Gauge("nhdp_consumer_lag", "Messages of health.events not yet applied to the projections", ["partition"])
APPLIED = Gauge("nhdp_events_processed", "Messages of health.events applied to the projections (tracking record)")
DLQ = Gauge("nhdp_dlq_messages", "Messages on health.events.dlq")


def _error(status: int, message: str) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status)


class Queries:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = ConnectionPool(settings.postgres_url, min_size=2, max_size=20, open=True)
        self.populations = {code: p.population for code, p in provinces().items()}

    def run(self, fn, *args):
        with self.pool.connection() as conn:
            return fn(conn, NAMESPACE, *args)

    def lag(self) -> tuple[dict[int, int], int, int]:
        with self.pool.connection() as conn:
            return consumer_lag(self.settings, conn)

    def close(self) -> None:
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
            task = asyncio.ensure_future(run_in_threadpool(lambda: orjson.dumps(compute())))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._inflight.pop(key) if self._inflight.get(key) is done else None)
        return Response(await asyncio.shield(task), media_type="application/json")


def create_app(settings: Settings, *, with_gateway: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.queries = Queries(settings)
        if with_gateway:
            app.state.gateway = Gateway(settings)
        # The start-up objects (FastAPI routes, pydantic models, the codec) are
        # permanent: left out of every collection, full collections stop pausing
        # the answers of everyone waiting.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            app.state.queries.close()
            if with_gateway:
                app.state.gateway.close()

    app = FastAPI(
        title="NHDP API",
        description="Gateway for producers and live figures for the national technology center and provinces.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    if with_gateway:
        app.include_router(gateway_router)
    app.include_router(analytics_api.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, f"no such path: {request.method} {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return _error(400, "; ".join(parts))

    def q(request: Request) -> Queries:
        return request.app.state.queries

    live = Coalescer()

    @app.get("/v1/national/summary", summary="Every figure of DESIGN §4 for the nation", response_model=dict[str, Any])
    async def national(request: Request, as_of: str | None = None):
        if as_of is not None:
            return await analytics_api.call(request, "national_summary", as_of=as_of)
        queries = q(request)
        return await live.get(("national",), lambda: queries.run(read_models.national_summary, queries.populations))

    @app.get("/v1/provinces", summary="The summaries of all 63 provinces", response_model=list[dict[str, Any]])
    async def all_provinces(request: Request, as_of: str | None = None):
        if as_of is not None:
            return await analytics_api.call(request, "all_provinces", as_of=as_of)
        queries = q(request)
        return await live.get(("provinces",), lambda: queries.run(read_models.all_provinces, queries.populations))

    @app.get("/v1/provinces/{code}/summary", summary="Every figure of DESIGN §4 for one province")
    async def province(code: str, request: Request, as_of: str | None = None):
        if code not in provinces():
            return _error(404, f"unknown province code {code!r}; codes are the 63 two-digit 2008 codes, e.g. 01, 79")
        if as_of is not None:
            return await analytics_api.call(request, "province_summary", code=code, as_of=as_of)
        queries = q(request)
        return await live.get(
            ("province", code), lambda: queries.run(read_models.province_summary, code, queries.populations)
        )

    @app.get("/v1/citizens/{subject_id}/record", summary="One subject's valid doses, for check-in at a site")
    async def citizen(subject_id: str, request: Request):
        if not SUBJECT_ID.match(subject_id):
            return _error(400, "subject_id: must be the 64-hex-digit pseudonymous id, never a national id")
        record = await run_in_threadpool(q(request).run, read_models.citizen_record, subject_id)
        if record is None:
            return _error(404, f"no doses recorded for subject {subject_id}")
        return record

    @app.get("/healthz", summary="Liveness of each dependency")
    async def healthz(request: Request):
        checks: dict[str, str] = {}

        def pg():
            with q(request).pool.connection() as conn:
                conn.execute("SELECT 1")

        def kafka():
            from infra.kafka import metadata_ok

            metadata_ok(settings.kafka_bootstrap_servers)

        def registry():
            import httpx

            httpx.get(f"{settings.registry_url}/subjects", timeout=2).raise_for_status()

        for name, fn in (("postgres", pg), ("kafka", kafka), ("registry", registry)):
            try:
                await run_in_threadpool(fn)
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"down: {type(exc).__name__}: {exc}"[:300]
        ok = all(v == "ok" for v in checks.values())
        return ORJSONResponse({"status": "ok" if ok else "degraded", "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics(request: Request):
        try:
            lag, applied, dlq = await run_in_threadpool(q(request).lag)
            for partition, value in lag.items():
                LAG.labels(str(partition)).set(value)
            APPLIED.set(applied)
            DLQ.set(dlq)
        except Exception:
            pass
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app

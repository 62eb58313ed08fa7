"""The API process's app: the gateway (producers) and the queries (projections) behind one port.

`nhdp api` serves it with uvicorn; `nhdp up` starts that. The parts stay in
their own layers; only their composition (state, error shapes, start-up, which
requests share which lane) is here.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra.process import COLLECT_EVERY_S
from infra.settings import Settings
from producers.gateway import Gateway
from producers.gateway import router as gateway_router
from producers.healthbook import router as healthbook_router
from projections import analytics_api, dashboard
from projections.api import Queries
from projections.api import router as query_router
from projections.backpressure import Backlog
from projections.health_records import HealthRecords
from schemas import access_log, api_auth
from schemas.access_log import AccessLog, AccessLogMiddleware
from schemas.api_auth import AccessDenied, Gatekeeper
from schemas.signing_keys import KeyRing

RETRY_AFTER_S = 1


def _error(status: int, message: str) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status)


def lane_of(scope: dict[str, Any]) -> str:
    """ingest: POST /v1/events; analytics: what ClickHouse answers (/v1/analytics/*, and any
    request with as_of); general: the rest (live summaries, citizen records, health, metrics)."""
    path: str = scope["path"]
    if path.startswith("/v1/events"):
        return "ingest"
    if path.startswith("/v1/analytics"):
        return "analytics"
    query = scope.get("query_string") or b""
    if b"as_of" in query and any(k == "as_of" for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)):
        return "analytics"
    return "general"


class Lanes:
    """A cap on the requests in progress in each lane; one more is answered 503 with
    Retry-After at once, before its body is read, instead of queueing.

    Pure ASGI around the whole app. The counters need no lock: they change only on
    the event loop's thread, with no await between the check and the increment. So
    slow analytics fill their own lane and are refused there, while ingest keeps its
    own (and analytics run on their own threads too: projections.analytics_api)."""

    def __init__(self, app, limits: dict[str, int], classify: Callable[[dict[str, Any]], str] = lane_of):
        self.app, self.limits, self.classify = app, dict(limits), classify
        self.active = dict.fromkeys(self.limits, 0)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lane = self.classify(scope)
        if self.active[lane] >= self.limits[lane]:
            body = orjson.dumps(
                {
                    "error": f"too many {lane} requests in progress (at most {self.limits[lane]}); "
                    f"retry after {RETRY_AFTER_S} s"
                }
            )
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.active[lane] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active[lane] -= 1


async def _collect_cycles() -> None:
    while True:
        await asyncio.sleep(COLLECT_EVERY_S)
        gc.collect()


def create_app(settings: Settings, *, with_gateway: bool = True, analytics: Any = None) -> FastAPI:
    """`analytics`: an Analytics object to answer from instead of the one opened from the
    settings on first use (a test's private API with slow calls)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.gatekeeper = Gatekeeper(settings)
        app.state.access_log = AccessLog(settings.postgres_url)
        app.state.queries = Queries(settings)
        if with_gateway:  # back-pressure is the gateway's: a queries-only API measures no backlog
            app.state.backlog = Backlog(
                app.state.queries.backlog, settings.gateway_max_backlog, settings.gateway_pace_backlog
            )
            app.state.gateway = Gateway(settings, refusal=app.state.backlog.refusal, pace=app.state.backlog.pace)
            app.state.keyring = KeyRing(settings.postgres_url, settings.secrets)
            app.state.health_records = HealthRecords(app.state.queries)
        # The start-up objects (FastAPI routes, pydantic models, the codec) are
        # permanent: left out of every collection, full collections stop pausing
        # the answers of everyone waiting. Then the collector runs on a schedule
        # (infra.process.COLLECT_EVERY_S), not after every 700 allocations: a request's
        # thousand events outlived the young collections that rescanned them.
        gc.collect()
        gc.freeze()
        collecting = gc.isenabled()
        gc.disable()
        collector = asyncio.create_task(_collect_cycles())
        try:
            yield
        finally:
            collector.cancel()
            if collecting:
                gc.enable()
            if with_gateway:
                app.state.backlog.close()  # before the queries whose clients it uses
                app.state.gateway.close()
            app.state.queries.close()
            app.state.gatekeeper.close()
            app.state.access_log.close()

    app = FastAPI(
        title="NHDP API",
        description="Gateway for producers and live figures for the national technology center and provinces.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    if analytics is not None:
        app.state.analytics = analytics
    app.add_middleware(
        Lanes,
        limits={
            "ingest": settings.api_ingest_concurrency,
            "analytics": settings.api_analytics_concurrency,
            "general": settings.api_general_concurrency,
        },
    )
    app.add_middleware(AccessLogMiddleware)  # added last, so outermost: a request refused for its lane is logged too
    if with_gateway:
        app.include_router(gateway_router)
        app.include_router(healthbook_router)
    app.include_router(analytics_api.router)
    app.include_router(api_auth.router)
    app.include_router(access_log.router)
    dashboard.mount(app)

    @app.exception_handler(AccessDenied)
    async def denied(request: Request, exc: AccessDenied):
        return ORJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, f"no such path: {request.method} {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return _error(400, "; ".join(parts))

    app.include_router(query_router)
    return app


def create_app_from_env() -> FastAPI:
    """The app of one of several API processes (`nhdp api` with NHDP_API_PROCESSES > 1)."""
    from infra.settings import get_settings

    return create_app(get_settings())

"""The API process's app: the gateway (producers) and the queries (projections) behind one port.

`nhdp api` serves it with uvicorn; `nhdp up` starts that. The parts stay in
their own layers; only their composition (state, error shapes, start-up) is here.
"""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra.settings import Settings
from producers.gateway import Gateway
from producers.gateway import router as gateway_router
from projections import analytics_api
from projections.api import Queries
from projections.api import router as query_router


def _error(status: int, message: str) -> ORJSONResponse:
    return ORJSONResponse({"error": message}, status_code=status)


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

    app.include_router(query_router)
    return app

"""The access log: who asked the API for what, and what they were answered. Auditors read it.

Every request to /v1/* and /metrics is logged, refused ones too (401, 403):
the second it arrived in, the token's subject, role and id, method, path,
query, status, client address, and how many such requests that second. The
count is what keeps logging cheap when dashboards poll: 50 clients asking for
the national summary 3,000 times a second are a few rows a second, not 3,000
(writing one row per request cost the summary ~15% of its throughput). Rows
are counted in memory and written by one thread with COPY every half second,
so logging costs a request a dict update, not a round trip. If PostgreSQL is
down the buffer holds up to BUFFER_MAX rows and is written when it is back;
beyond that the oldest are dropped and counted
(nhdp_access_log_dropped_total), never silently, as is a batch PostgreSQL
refuses for its data (text is cleaned of NUL first, so that should not happen).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, Query, Request
from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool

from schemas.access import Caller, Right
from schemas.api_auth import require

log = logging.getLogger("nhdp.access_log")

FLUSH_S = 0.5
BUFFER_MAX = 200_000
LOGGED_PREFIXES = ("/v1/", "/metrics")

DROPPED = Counter("nhdp_access_log_dropped_total", "Requests left out of the access log: PostgreSQL down too long")

DDL = """
CREATE SCHEMA IF NOT EXISTS access;
CREATE TABLE IF NOT EXISTS access.log (
    at       timestamptz NOT NULL,
    name     text,            -- the token's subject; NULL: no valid token
    role     text,
    token_id uuid,
    method   text NOT NULL,
    path     text NOT NULL,
    query    text NOT NULL,
    status   smallint NOT NULL,
    client   text,
    count    integer NOT NULL DEFAULT 1  -- such requests in the second starting at `at`
);
CREATE INDEX IF NOT EXISTS log_at ON access.log (at);
"""
COLUMNS = ("at", "name", "role", "token_id", "method", "path", "query", "status", "client", "count")


class AccessLog:
    def __init__(self, postgres_url: str):
        self._url = postgres_url
        self._rows: dict[tuple, int] = {}  # (second, name, …, client) -> requests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(DDL)
        self._thread = threading.Thread(target=self._run, name="nhdp-access-log", daemon=True)
        self._thread.start()

    def add(self, key: tuple) -> None:
        """key: (epoch second, name, role, token id, method, path, query, status, client)."""
        with self._lock:
            self._rows[key] = self._rows.get(key, 0) + 1
            if len(self._rows) > BUFFER_MAX:
                oldest = next(iter(self._rows))
                DROPPED.inc(self._rows.pop(oldest))

    def _run(self) -> None:
        conn = None
        while True:
            stopping = self._stop.wait(FLUSH_S)
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self._url, autocommit=True)
                self.flush(conn)
            except psycopg.Error as exc:  # the rows stay in the buffer for the next attempt
                log.warning("access log not written yet: %s", exc)
                conn = None
            if stopping:
                break
        if conn is not None:
            conn.close()

    def flush(self, conn: psycopg.Connection) -> None:
        with self._lock:
            rows, self._rows = self._rows, {}
        if not rows:
            return
        try:
            with conn.cursor() as cur, cur.copy(f"COPY access.log ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for (second, *rest), count in rows.items():
                    copy.write_row((datetime.fromtimestamp(second, UTC), *rest, count))
        except psycopg.DataError as exc:  # a row PostgreSQL cannot hold would block every later one
            log.error("access log: %d rows not storable, dropped: %s", len(rows), exc)
            DROPPED.inc(sum(rows.values()))
        except BaseException:
            with self._lock:  # back, merged with what arrived meanwhile
                for key, count in rows.items():
                    self._rows[key] = self._rows.get(key, 0) + count
            raise

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _text(value: str) -> str:
    """What PostgreSQL text can hold (no NUL: a path may carry %00), bounded."""
    return value[:2000].replace("\x00", "\\x00")


class AccessLogMiddleware:
    """Pure ASGI: one row per logged request, with the caller the auth dependency found (if any)."""

    def __init__(self, app, access_log: AccessLog | None = None):
        self.app, self.access_log = app, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(LOGGED_PREFIXES):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            sink = self.access_log or getattr(scope.get("app").state, "access_log", None)
            if sink is not None:
                who: Caller | None = state.get("caller")
                client = scope.get("client")
                sink.add(
                    (
                        int(time.time()),
                        who.name if who else None,
                        who.label if who else None,
                        who.token_id or None if who else None,
                        scope["method"],
                        _text(scope["path"]),
                        _text((scope.get("query_string") or b"").decode("latin-1")),
                        status,
                        client[0] if client else None,
                    )
                )


router = APIRouter(tags=["access"])


@router.get("/v1/access-log", summary="Who asked for what, newest first (auditor, admin)")
async def access_log(
    request: Request,
    _: Annotated[Caller, Depends(require(Right.AUDIT))],
    since: Annotated[datetime | None, Query(description="only requests at or after this time")] = None,
    name: Annotated[str | None, Query(description="only this token subject's requests")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[dict[str, Any]]:
    def run() -> list[dict[str, Any]]:
        with psycopg.connect(request.app.state.settings.postgres_url, autocommit=True) as conn:
            request.app.state.access_log.flush(conn)  # what was just asked is in the answer
            rows = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM access.log "
                "WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s) AND (%(name)s::text IS NULL OR name = %(name)s) "
                "ORDER BY at DESC LIMIT %(limit)s",
                {"since": since, "name": name, "limit": limit},
            ).fetchall()
        return [
            dict(zip(COLUMNS, (r[0].isoformat(), *r[1:3], str(r[3]) if r[3] else None, *r[4:]), strict=True))
            for r in rows
        ]

    return await run_in_threadpool(run)

"""Analytics across processes: in chDB mode the sink owns the folder and answers the calls of every other process over loopback HTTP.

Loopback is reachable by every local user, so each call carries a shared secret
(`Authorization: Bearer`, the secret store's `sink-queries`, 0600): only
processes of the user that runs the stack can read it, and so ask.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from projections.clickhouse.connect import StorePool
from projections.clickhouse.queries import Analytics, ParameterError

log = logging.getLogger("nhdp.analytics")


class AnalyticsUnavailable(RuntimeError):
    """The analytics store cannot be asked right now (down, or its owner is not running)."""


class RemoteAnalytics:
    """The Analytics calls, forwarded over HTTP to the process that owns a chDB folder."""

    METHODS = ("national_summary", "province_summary", "all_provinces", "doses", "coverage", "status")

    def __init__(self, url_source, secret: str, timeout_s: float = 60.0):
        # url_source: the base URL, or a callable returning it (read when called: the owner may restart)
        self._url_source = url_source
        self._headers = {"Authorization": f"Bearer {secret}"}
        self.timeout_s = timeout_s

    def _url(self) -> str:
        url = self._url_source() if callable(self._url_source) else self._url_source
        if not url:
            raise AnalyticsUnavailable(
                "the ClickHouse sink, which owns the chDB folder and answers analytics, is not running"
            )
        return url

    def call(self, method: str, **kwargs: Any) -> Any:
        if method not in self.METHODS:
            raise AttributeError(method)
        try:
            reply = httpx.post(
                f"{self._url()}/call/{method}", json=kwargs, headers=self._headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            raise AnalyticsUnavailable(f"the ClickHouse sink does not answer ({type(exc).__name__}: {exc})") from exc
        body = reply.json()
        if reply.status_code == 401:
            raise AnalyticsUnavailable(f"the ClickHouse sink refused this process's secret: {body.get('error')}")
        if reply.status_code == 400:
            raise ParameterError(body.get("param", "request"), body["error"].split(": ", 1)[-1])
        if reply.status_code != 200:
            raise AnalyticsUnavailable(body.get("error", f"HTTP {reply.status_code}"))
        return body

    def __getattr__(self, name: str):
        if name in self.METHODS:
            return lambda *args, **kwargs: self.call(name, **_positional(name, args), **kwargs)
        raise AttributeError(name)


def _positional(method: str, args: tuple) -> dict[str, Any]:
    names = {
        "province_summary": ("code", "as_of"),
        "doses": ("group_by", "from_", "to", "province"),
        "coverage": ("by", "as_of"),
    }.get(method, ("as_of",))
    return dict(zip(names, args))


SECRET_NAME = "sink-queries"


def sink_secret(settings) -> str:
    """The secret every call to the sink's query endpoint carries (chDB mode)."""
    return settings.secrets.get(SECRET_NAME)


def sink_url_path(settings) -> Path:
    """Where the sink process writes the URL of its query endpoint (chDB mode)."""
    return settings.run_dir / "sink.url"


def analytics_for(settings, *, pool_size: int = 4) -> Analytics | RemoteAnalytics:
    """How a process other than the sink reaches the analytics: directly (server), or via the sink (chDB)."""
    url = settings.analytics_url()
    if url.startswith("chdb:"):
        path = sink_url_path(settings)

        def read_url() -> str | None:
            try:
                return path.read_text().strip() or None
            except FileNotFoundError:
                return None

        return RemoteAnalytics(read_url, sink_secret(settings))
    return Analytics(StorePool(url, size=pool_size, purpose="nhdp api", password=settings.analytics_password()))


def serve_queries(analytics: Analytics, secret: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """POST /call/<method> with JSON kwargs and `Authorization: Bearer <secret>` → the Analytics answer
    as JSON (401 without the secret); GET /healthz, open.

    Started by the sink when it owns a chDB folder: no other process may open
    the folder, so the API (and `nhdp verify-analytics`) ask here instead.
    """

    expected = f"Bearer {secret}".encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the API logs requests
            pass

        def _send(self, status: int, body: Any) -> None:
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/healthz":
                self._send(200, {"status": "ok", "pid": os.getpid()})
            else:
                self._send(404, {"error": f"no such path: GET {self.path}"})

        def do_POST(self):
            given = self.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                self._send(
                    401, {"error": "this endpoint needs Authorization: Bearer <the stack's sink-queries secret>"}
                )
                return
            name = self.path.removeprefix("/call/")
            if not self.path.startswith("/call/") or name not in RemoteAnalytics.METHODS:
                self._send(404, {"error": f"no such call: {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                kwargs = orjson.loads(self.rfile.read(length) or b"{}")
                self._send(200, getattr(analytics, name)(**kwargs))
            except ParameterError as exc:
                self._send(400, {"error": str(exc), "param": exc.param})
            except TypeError as exc:
                self._send(400, {"error": f"request: {exc}", "param": "request"})
            except Exception as exc:
                log.exception("analytics call %s failed", name)
                self._send(503, {"error": f"{type(exc).__name__}: {exc}"[:2000]})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="nhdp-sink-http", daemon=True).start()
    return server

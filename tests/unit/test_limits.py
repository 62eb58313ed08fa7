"""Bounded resources, the parts that need no service: lanes, the body readers, the
x-trace-id check, the analytics pool's bounded wait and its query settings.

Against the real stack (413s, 503s, 504s, the ingest latency under 200 slow analytics
calls) they are tested in tests/stack/test_limits.py.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from starlette.requests import Request

from nhdp.app import Lanes, lane_of
from producers.gateway import BodyTooLarge, read_body, trace_id_problem
from projections.clickhouse.connect import PoolBusy, StorePool
from projections.clickhouse.queries import Analytics
from schemas.registry.app import BodyLimit

MIB = 1024 * 1024


def scope(path: str = "/", query: bytes = b"", method: str = "GET", headers: dict[str, str] | None = None) -> dict:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


def body_messages(chunks: list[bytes]):
    """An ASGI receive that hands out chunks, counting how many were taken."""
    taken = []

    async def receive():
        i = len(taken)
        taken.append(i)
        if i >= len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    return receive, taken


class Sent:
    """An ASGI send that keeps the answer."""

    def __init__(self):
        self.status, self.headers, self.body = None, {}, b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            self.body += message.get("body", b"")


# -- lanes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "lane"),
    [
        ("/v1/events", b"", "ingest"),
        ("/v1/analytics/doses", b"group_by=day", "analytics"),
        ("/v1/analytics/coverage", b"", "analytics"),
        ("/v1/national/summary", b"as_of=2021-08-10T00:00:00Z", "analytics"),
        ("/v1/provinces", b"x=1&as_of=", "analytics"),
        ("/v1/national/summary", b"", "general"),
        ("/v1/national/summary", b"not_as_of=1", "general"),
        ("/v1/citizens/ab/record", b"", "general"),
        ("/metrics", b"", "general"),
    ],
)
def test_each_request_has_its_lane(path, query, lane):
    assert lane_of(scope(path, query)) == lane


def test_a_full_lane_answers_503_at_once_and_the_others_still_run():
    async def main():
        release = asyncio.Event()
        running = []

        async def app(scope_, receive, send):
            running.append(scope_["path"])
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        lanes = Lanes(app, {"ingest": 2, "analytics": 3, "general": 1})
        noop = body_messages([])[0]
        held = [asyncio.create_task(lanes(scope("/v1/analytics/doses"), noop, Sent())) for _ in range(3)]
        await asyncio.sleep(0)
        assert lanes.active == {"ingest": 0, "analytics": 3, "general": 0}

        refused = Sent()
        started = time.perf_counter()
        await lanes(scope("/v1/national/summary", b"as_of=2021-08-10T00:00:00Z"), noop, refused)
        assert time.perf_counter() - started < 0.1, "a full lane must refuse at once, not wait"
        assert refused.status == 503 and refused.headers["retry-after"] == "1"
        assert orjson.loads(refused.body) == {
            "error": "too many analytics requests in progress (at most 3); retry after 1 s"
        }

        # Ingest has a lane of its own: the full analytics lane does not hold it.
        ingest = [asyncio.create_task(lanes(scope("/v1/events", method="POST"), noop, Sent())) for _ in range(2)]
        await asyncio.sleep(0)
        assert lanes.active["ingest"] == 2 and running.count("/v1/events") == 2
        release.set()
        await asyncio.gather(*held, *ingest)
        assert lanes.active == {"ingest": 0, "analytics": 0, "general": 0}

        async def failing(scope_, receive, send):
            raise RuntimeError("boom")

        lanes = Lanes(failing, {"ingest": 1, "analytics": 1, "general": 1})
        with pytest.raises(RuntimeError):
            await lanes(scope("/metrics"), noop, Sent())
        assert lanes.active["general"] == 0, "a failed request must give its place back"

    asyncio.run(main())


# -- the gateway's body and trace id -------------------------------------------------------------------


def test_read_body_refuses_from_content_length_without_reading():
    receive, taken = body_messages([b"x" * 100])
    request = Request(scope("/v1/events", method="POST", headers={"content-length": str(2 * MIB)}), receive)
    with pytest.raises(BodyTooLarge, match=r"^body is 2,097,152 bytes; the limit is 1,048,576$"):
        asyncio.run(read_body(request, MIB))
    assert taken == []


def test_read_body_stops_at_the_limit_while_a_chunked_body_arrives():
    chunks = [b"x" * (256 * 1024)] * 64  # 16 MiB, never declared
    receive, taken = body_messages(chunks)
    request = Request(scope("/v1/events", method="POST"), receive)
    with pytest.raises(BodyTooLarge, match=r"^body is over 1,048,576 bytes, the limit$"):
        asyncio.run(read_body(request, MIB))
    assert len(taken) == 5, "read past the limit"

    receive, _ = body_messages([b"[1,", b"2]"])
    assert asyncio.run(read_body(Request(scope("/v1/events", method="POST"), receive), MIB)) == b"[1,2]"
    receive, _ = body_messages([b"x" * MIB])
    assert len(asyncio.run(read_body(Request(scope("/v1/events", method="POST"), receive), MIB))) == MIB


@pytest.mark.parametrize("value", [None, "a", "trace-0f3a.b_c:d", "x" * 128, "00000000-0000-4000-8000-000000000000"])
def test_a_trace_id_token_is_taken(value):
    assert trace_id_problem(value) is None


@pytest.mark.parametrize("value", ["", "x" * 129, "has space", "tab\t", 'quote"', "ümlaut", "a/b", "nl\n"])
def test_anything_else_in_x_trace_id_is_refused_naming_the_header(value):
    assert trace_id_problem(value) == "x-trace-id: must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"


# -- the registry's body limit -----------------------------------------------------------------------


def _registry_call(headers: dict[str, str], chunks: list[bytes]):
    seen = []

    async def app(scope_, receive, send):
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    receive, taken = body_messages(chunks)
    sent = Sent()
    asyncio.run(
        BodyLimit(app, max_bytes=MIB)(scope("/subjects/s/versions", method="POST", headers=headers), receive, sent)
    )
    return sent, taken, seen


def test_registry_refuses_a_large_body_declared_or_arriving():
    sent, taken, _ = _registry_call({"content-length": str(MIB + 1)}, [b"x"])
    assert (sent.status, taken) == (413, [])
    assert sent.headers["content-type"] == "application/vnd.schemaregistry.v1+json"
    assert orjson.loads(sent.body) == {
        "error_code": 413,
        "message": "Request body too large: body is 1,048,577 bytes; the limit is 1,048,576",
    }

    sent, taken, seen = _registry_call({}, [b"x" * (300 * 1024)] * 20)
    assert sent.status == 413 and len(taken) == 4 and len(seen) == 3
    assert orjson.loads(sent.body)["message"] == (
        "Request body too large: body is over 1,048,576 bytes; the limit is 1,048,576"
    )

    sent, _, seen = _registry_call({}, [b"x" * 1000, b"y" * 1000])
    assert sent.status == 200 and seen == [1000, 1000]


# -- the analytics pool and its query settings ---------------------------------------------------------


def test_the_pool_gives_up_after_its_wait():
    pool = StorePool("clickhouse://127.0.0.1:1/none", size=1, wait_s=0.3)
    pool._all.append(None)  # the one slot taken, as while another thread connects
    started = time.perf_counter()
    with pytest.raises(PoolBusy, match=r"all 1 ClickHouse connections stayed busy for 0.3 s") as caught:
        pool.acquire()
    assert 0.3 <= time.perf_counter() - started < 2
    assert caught.value.retryable


class Recording:
    engine = "clickhouse"

    def __init__(self):
        self.sql = []

    def execute(self, sql, params=None):
        self.sql.append(sql)
        return []


def test_analytics_selects_carry_the_limits_and_nothing_else_does():
    store = Recording()
    analytics = Analytics(store, limits={"max_execution_time": 10, "max_rows_to_read": 2_000_000_000})
    analytics.doses(group_by="province")
    analytics._run(lambda s: s.execute("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = Memory"))
    analytics._run(lambda s: s.execute("  with 1 AS a SELECT a;\n"))
    *selects, create, with_ = store.sql
    assert selects and all(
        s.endswith(" SETTINGS max_execution_time = 10, max_rows_to_read = 2000000000") for s in selects
    )
    assert "SETTINGS" not in create
    assert with_ == "  with 1 AS a SELECT a SETTINGS max_execution_time = 10, max_rows_to_read = 2000000000"

    plain = Recording()
    Analytics(plain).doses(group_by="province")
    assert plain.sql and not any("SETTINGS" in s for s in plain.sql), "verify and replay read without limits"

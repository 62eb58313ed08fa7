"""Bounded resources against the real stack (issue 14 part 4, DESIGN §5): bodies over the
limit refused while they arrive, a bad x-trace-id, an event too large for Kafka rejected
by index, lanes that answer 503 + Retry-After when full, ClickHouse queries stopped at
their limits, /metrics on one Kafka client, and ingest latency under 200 slow analytics.

The session stack's API and registry answer the body and trace-id tests. The rest need
an API with other settings or slow analytics calls: a private API process (PRIVATE_API)
on the session stack's services, the same app `nhdp api` serves, whose doses calls first
hold their ClickHouse connection in `SELECT sleep(…)`: slow the way a heavy query is,
without taking the CPU a 2-core machine needs for the measurement.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from infra.settings import CHECKOUT, Settings
from nhdp.stack import free_ports
from tests.helpers import SOURCE, api, bearer, citizen_id, post, registry_auth, token, valid_event

pytestmark = pytest.mark.stack

MIB = 1024 * 1024
SLEEP_S = 2.5

PRIVATE_API = f"""
import uvicorn

from infra.settings import get_settings
from nhdp.app import create_app
from projections import analytics_api
from projections.clickhouse.queries import Analytics


class Slow(Analytics):
    def doses(self, *args, **kwargs):
        self._run(lambda store: store.execute("SELECT sleep({SLEEP_S})"))
        return super().doses(*args, **kwargs)


settings = get_settings()
app = create_app(settings, analytics=analytics_api.open_analytics(settings, Slow))
uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level="warning", access_log=False,
            loop="uvloop", http="httptools")
"""

# 200 clients, each with one GET /v1/analytics/doses in flight at a time; after a 503 it
# waits what Retry-After says (jittered), as a well-behaved client does. Raw asyncio
# streams: httpx would cost the machine more CPU than the API spends refusing them.
LOAD = r"""
import asyncio, json, random, sys, time

HOST, PORT, CLIENTS, TOKEN = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.stdin.readline().strip()
REQUEST = f"GET /v1/analytics/doses?group_by=province HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
stats = {"200": 0, "503": 0, "other": 0, "max_in_flight": 0}
in_flight = 0


async def client(stop, started):
    global in_flight
    reader = writer = None
    first = True
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, PORT)
            writer.write(REQUEST)
            in_flight += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], in_flight)
            if first:
                first = False
                started.append(1)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            await reader.readexactly(int(headers.get("content-length", 0)))
            in_flight -= 1
            status = lines[0].split()[1]
            stats[status if status in stats else "other"] += 1
            if headers.get("connection") == "close":
                writer.close()
                writer = None
            if status == "503":
                delay = float(headers.get("retry-after", 1)) * random.uniform(0.5, 1.5)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        except (OSError, asyncio.IncompleteReadError):
            in_flight -= 1
            stats["other"] += 1
            writer = None
            await asyncio.sleep(0.5)


async def main():
    stop, started = asyncio.Event(), []
    tasks = [asyncio.create_task(client(stop, started)) for _ in range(CLIENTS)]
    while len(started) < CLIENTS:
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    stop.set()
    await asyncio.wait(tasks, timeout=SLEEP)
    print(json.dumps(stats), flush=True)


SLEEP = 10
asyncio.run(main())
"""


@contextmanager
def private_api(settings: Settings, tmp: Path, **overrides) -> Iterator[str]:
    """PRIVATE_API on the session stack's services, with NHDP_<NAME> overrides; its base URL."""
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")}
    env |= settings.as_env() | {"NHDP_API_PORT": str(port)}
    env |= {f"NHDP_{k.upper()}": str(v) for k, v in overrides.items()}
    log_path = tmp / f"private-api-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", PRIVATE_API], env=env, cwd=CHECKOUT, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the private API exited: {log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the private API did not start: {log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def slow_api(stack_settings, tmp_path_factory) -> Iterator[str]:
    """Default limits; each doses call sleeps SLEEP_S in ClickHouse first."""
    with private_api(stack_settings, tmp_path_factory.mktemp("slow")) as url:
        yield url


@pytest.fixture(scope="module")
def tight_api(stack_settings, tmp_path_factory) -> Iterator[str]:
    """Limits low enough to reach: 1 s per query, 1 row read, 2,560-byte Kafka requests."""
    with private_api(
        stack_settings,
        tmp_path_factory.mktemp("tight"),
        analytics_max_execution_s=1,
        analytics_max_rows_to_read=1,
        kafka_max_message_bytes=2560,
    ) as url:
        yield url


# -- bodies -------------------------------------------------------------------------------------------


def stream_body(host: str, port: int, head: bytes, total: int, chunked: bool = True) -> tuple[int, dict, bytes, int]:
    """Send head, then up to `total` body bytes, until the server answers; (status, headers, body, bytes sent).

    Non-blocking, so the answer is read as soon as it comes, even while the server no
    longer reads what is sent."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(head)
    sock.setblocking(False)
    piece = b"x" * (64 * 1024)
    frame = (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
    sent, pending, data = 0, b"", b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            want_write = sent < total or pending
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 1.0)
            if readable:
                try:
                    more = sock.recv(65536)
                except ConnectionResetError:
                    more = b""
                data += more
                if b"\r\n\r\n" in data or not more:
                    break
            elif writable:
                if not pending:
                    pending = frame
                    sent += len(piece)
                try:
                    pending = pending[sock.send(pending) :]
                except (BrokenPipeError, ConnectionResetError):
                    break
        sock.setblocking(True)
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            more = sock.recv(65536)
            if not more:
                break
            body += more
        return int(lines[0].split()[1]), headers, body, sent
    finally:
        sock.close()


def test_a_body_over_the_limit_is_refused_without_being_read(stack_settings, log):
    limit = stack_settings.max_body_bytes
    assert limit == 8 * MIB
    host, port = stack_settings.api_host, stack_settings.api_port
    before = log.ends()

    auth = b"Authorization: Bearer %s\r\n" % token(stack_settings, "producer", source=SOURCE).encode()
    # Declared: refused from the headers, and not one byte of the body is waited for.
    started = time.perf_counter()
    status, headers, body, _ = stream_body(
        host,
        port,
        b"POST /v1/events HTTP/1.1\r\nHost: nhdp\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
        % (auth, 100 * MIB),
        0,
    )
    assert (status, headers["connection"]) == (413, "close")
    assert orjson.loads(body) == {"error": "body is 104,857,600 bytes; the limit is 8,388,608"}
    assert time.perf_counter() - started < 5

    # Chunked, 256 MiB on offer: the answer comes once the limit is passed, and the
    # connection closes, so the client is stopped long before it has sent it all.
    status, headers, body, sent = stream_body(
        host,
        port,
        b"POST /v1/events HTTP/1.1\r\nHost: nhdp\r\nContent-Type: application/json\r\n"
        b"%sTransfer-Encoding: chunked\r\n\r\n" % auth,
        256 * MIB,
    )
    assert (status, headers["connection"]) == (413, "close")
    assert orjson.loads(body) == {"error": "body is over 8,388,608 bytes, the limit"}
    assert limit < sent < 4 * limit, f"{sent:,} bytes went out before the answer"
    assert log.ends() == before

    # The gateway still takes a body just under the limit.
    padding = b" " * (limit - 2 - 1000)
    resp = post(stack_settings, None, raw=b"[" + padding + b"]")
    assert resp.status_code == 200 and resp.json()["accepted"] == 0


def test_the_registry_refuses_a_large_body(stack_settings):
    host, port = stack_settings.registry_host, stack_settings.registry_port
    limit = stack_settings.registry_max_body_bytes
    assert limit == MIB
    schema = orjson.dumps(
        {"schema": orjson.dumps({"type": "record", "name": "Big", "doc": "x" * (2 * MIB), "fields": []}).decode()}
    )
    resp = httpx.post(
        f"{stack_settings.registry_url}/subjects/limits-test-value/versions",
        content=schema,
        headers={"content-type": "application/vnd.schemaregistry.v1+json"},
        timeout=30,
        auth=registry_auth(stack_settings),
    )
    assert resp.status_code == 413
    assert resp.headers["content-type"] == "application/vnd.schemaregistry.v1+json"
    assert resp.json() == {
        "error_code": 413,
        "message": f"Request body too large: body is {len(schema):,} bytes; the limit is 1,048,576",
    }

    # Authenticated: a request without credentials is refused (401) before its body is read.
    basic = b"Authorization: Basic " + base64.b64encode(f"admin:{stack_settings.password}".encode()) + b"\r\n"
    status, headers, body, sent = stream_body(
        host,
        port,
        b"POST /subjects/limits-test-value/versions HTTP/1.1\r\nHost: registry\r\n"
        b"Content-Type: application/vnd.schemaregistry.v1+json\r\nTransfer-Encoding: chunked\r\n" + basic + b"\r\n",
        256 * MIB,
    )
    assert status == 413 and sent < 64 * MIB
    assert (
        orjson.loads(body)["message"] == "Request body too large: body is over 1,048,576 bytes; the limit is 1,048,576"
    )
    # A route's own read (not the fast path's) is cut off the same way.
    status, _, body, sent = stream_body(
        host,
        port,
        b"PUT /config/limits-test-value HTTP/1.1\r\nHost: registry\r\n"
        b"Content-Type: application/vnd.schemaregistry.v1+json\r\nTransfer-Encoding: chunked\r\n" + basic + b"\r\n",
        256 * MIB,
    )
    assert status == 413 and sent < 64 * MIB
    assert orjson.loads(body)["error_code"] == 413

    # Nothing registered, and the registry still answers.
    subjects = httpx.get(f"{stack_settings.registry_url}/subjects", timeout=30, auth=registry_auth(stack_settings))
    assert subjects.status_code == 200 and "limits-test-value" not in subjects.json()


# -- the gateway's per-request and per-event bounds --------------------------------------------------------


@pytest.mark.parametrize("trace_id", ["", "x" * 129, "has space", "semi;colon", "<script>"])
def test_a_bad_x_trace_id_is_refused_naming_the_header(stack_settings, log, trace_id):
    before = log.ends()
    resp = post(stack_settings, [valid_event()], headers={"x-trace-id": trace_id})
    assert resp.status_code == 400
    assert resp.json() == {"error": "x-trace-id: must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"}
    assert log.ends() == before


def test_a_good_x_trace_id_is_carried(stack_settings, log, codec):
    before = log.ends()
    trace = "req-" + "a" * 60 + ":1.2_3"
    resp = post(stack_settings, [valid_event()], headers={"x-trace-id": trace})
    assert resp.status_code == 200 and resp.json()["accepted"] == 1
    (message,) = log.read(before)
    assert dict(message.headers)["trace_id"] == trace.encode()
    assert codec.decode_many([message.value])[0]["trace_id"] == trace


def test_an_event_too_large_for_kafka_is_rejected_by_index_never_503(stack_settings, tight_api, log):
    small = valid_event()
    big = valid_event("AdverseEventReported", symptoms=[f"{i:02d}" + "s" * 126 for i in range(32)])
    before = log.ends()
    for attempt in range(2):  # the same answer again: a permanent rejection, not a reservation left behind
        resp = httpx.post(
            f"{tight_api}/v1/events",
            content=orjson.dumps([big, small]),
            headers=bearer(stack_settings, "producer", source=SOURCE),
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert (answer["accepted"], answer["duplicates"]) == ((1, 0) if attempt == 0 else (0, 1))
        (rejected,) = answer["rejected"]
        assert (rejected["index"], rejected["event_id"]) == (0, big["event_id"])
        (error,) = rejected["errors"]
        assert error.startswith("event: too large for one Kafka message (") and "at most 2,048 fit one request" in error
    messages = log.read(before)
    assert len(messages) == 1 and small["event_id"].encode() in messages[0].value


# -- ClickHouse's limits ---------------------------------------------------------------------------------


def test_queries_over_their_limits_are_clear_errors_not_500(stack_settings, tight_api):
    # Rows in ClickHouse first: an empty table is under any limit.
    with api(stack_settings, timeout=60) as client:
        doses = lambda: sum(r["doses"] for r in client.get("/v1/analytics/doses").json()["rows"])  # noqa: E731
        base = doses()
        assert post(stack_settings, [valid_event(cid=citizen_id()) for _ in range(3)]).json()["accepted"] == 3
        deadline = time.monotonic() + 120
        while doses() < base + 3:
            assert time.monotonic() < deadline, "the sink did not write the doses"
            time.sleep(0.5)

    rows_error = "the analytics query would read more than 1 rows (NHDP_ANALYTICS_MAX_ROWS_TO_READ); narrow it (from, to, province)"
    for path in ("/v1/analytics/coverage", "/v1/national/summary?as_of=2030-01-01T00:00:00Z"):
        resp = httpx.get(f"{tight_api}{path}", headers=bearer(stack_settings), timeout=60)
        assert (resp.status_code, resp.json()) == (422, {"error": rows_error}), path

    # Doses sleep 2.5 s in ClickHouse first, over the 1 s limit: stopped there by ClickHouse.
    started = time.perf_counter()
    resp = httpx.get(f"{tight_api}/v1/analytics/doses", headers=bearer(stack_settings), timeout=60)
    assert time.perf_counter() - started < SLEEP_S + 2
    assert resp.status_code == 504
    assert resp.json() == {
        "error": "the analytics query ran over its time limit of 1 s (NHDP_ANALYTICS_MAX_EXECUTION_S); "
        "narrow it (from, to, province) or try again later"
    }


# -- lanes -----------------------------------------------------------------------------------------------


def test_a_full_analytics_lane_answers_503_with_retry_after_and_ingest_goes_on(stack_settings, slow_api):
    """16 analytics requests in progress (the default), 4 of them on ClickHouse connections;
    40 at once: 24 refused by the lane at once, 12 after waiting 2 s for a connection."""
    answers: list[httpx.Response] = []
    national = bearer(stack_settings)

    def one():
        answers.append(httpx.get(f"{slow_api}/v1/analytics/doses", headers=national, timeout=60))

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    resp = httpx.post(
        f"{slow_api}/v1/events",
        content=orjson.dumps([valid_event()]),
        headers=bearer(stack_settings, "producer", source=SOURCE),
        timeout=30,
    )
    assert resp.status_code == 200 and resp.json()["accepted"] == 1
    for t in threads:
        t.join(60)
    errors = Counter(r.json().get("error", "") if r.status_code != 200 else "ok" for r in answers)
    assert {r.status_code for r in answers} <= {200, 503}
    assert all(r.headers["retry-after"] == "1" for r in answers if r.status_code == 503)
    assert errors["too many analytics requests in progress (at most 16); retry after 1 s"] == 24, errors
    assert errors["analytics is busy: all 4 ClickHouse connections stayed busy for 2 s; retry after 1 s"] == 12, errors
    assert errors["ok"] == 4, errors


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def _ingest_latencies(url: str, n: int, auth: dict[str, str]) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30, headers={"content-type": "application/json", **auth}) as client:
        for _ in range(n):
            body = orjson.dumps([valid_event()])
            started = time.perf_counter()
            resp = client.post("/v1/events", content=body)
            out.append(time.perf_counter() - started)
            assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
    return out


def test_200_slow_analytics_calls_leave_ingest_p99_within_twice_idle(stack_settings, slow_api):
    """THE acceptance test of bounded resources: analytics cannot starve ingest.

    Idle is measured before the load and again once it has drained, and the worse of
    the two is the baseline: the machine's own noise (2 cores, other work) is not the
    load's. With the analytics on the gateway's threads, the loaded posts time out."""
    producer = bearer(stack_settings, "producer", source=SOURCE)
    _ingest_latencies(slow_api, 20, producer)  # warm: connections, pools, the codec's schema ids
    idle_before = _ingest_latencies(slow_api, 200, producer)

    host, port = slow_api.removeprefix("http://").split(":")
    load = subprocess.Popen(
        [sys.executable, "-c", LOAD, host, port, "200"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        load.stdin.write(token(stack_settings) + "\n")  # the token on stdin, never in a command line
        load.stdin.flush()
        assert load.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # every client has its first call in the API
        loaded = _ingest_latencies(slow_api, 200, producer)
    finally:
        load.stdin.close()  # the clients stop and the load prints what it got
        load.wait(60)
    stats = json.loads(load.stdout.read().strip().splitlines()[-1])
    time.sleep(SLEEP_S + 1)  # the calls the API had admitted end
    idle_after = _ingest_latencies(slow_api, 200, producer)

    p99_idle = max(_p99(idle_before), _p99(idle_after))
    p99_loaded = _p99(loaded)
    summary = (
        f"ingest p99 idle {_p99(idle_before) * 1000:.1f} / {_p99(idle_after) * 1000:.1f} ms (before / after), "
        f"under load {p99_loaded * 1000:.1f} ms; medians {statistics.median(idle_before) * 1000:.1f} / "
        f"{statistics.median(loaded) * 1000:.1f} ms; load {stats}"
    )
    print(summary)
    assert stats["max_in_flight"] == 200 and stats["200"] > 0 and stats["503"] > 0, summary
    assert stats["other"] == 0, summary
    assert p99_loaded <= 2 * max(p99_idle, 0.020), summary


# -- /metrics ---------------------------------------------------------------------------------------------


def _time_wait_to(port: int) -> int:
    """Sockets in TIME_WAIT towards a local port: what a client leaves behind per connection it closes."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "06" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_metrics_reuses_one_kafka_client(stack_settings):
    url = f"{stack_settings.api_url}/metrics"
    first = httpx.get(url, headers=bearer(stack_settings), timeout=30)
    assert first.status_code == 200 and "nhdp_consumer_lag{" in first.text
    before = _time_wait_to(stack_settings.kafka_port)
    with httpx.Client(timeout=30, headers=bearer(stack_settings)) as client:
        for _ in range(20):
            resp = client.get(url)
            assert resp.status_code == 200 and "nhdp_consumer_lag{" in resp.text
    # A client per scrape would leave at least 20 closed connections to Kafka behind.
    assert _time_wait_to(stack_settings.kafka_port) - before <= 3


# -- back-pressure ------------------------------------------------------------------------------------


def test_the_gateway_refuses_while_the_projections_are_behind_and_accepts_once_they_catch_up(
    stack_settings, tmp_path, log
):
    """Past NHDP_GATEWAY_MAX_BACKLOG events not yet projected, a request is answered 503 with
    Retry-After and the reason, and nothing of it is published; the same request is accepted
    once the worker has caught up."""
    from nhdp.stack import worker_service
    from tests.helpers import wait_caught_up

    worker = worker_service(stack_settings)
    headers = bearer(stack_settings, "producer", source=SOURCE, provinces=["*"])
    with (
        private_api(stack_settings, tmp_path, gateway_max_backlog=100) as url,
        httpx.Client(base_url=url, headers=headers, timeout=60) as client,
    ):
        worker.stop()
        try:
            first = client.post("/v1/events", content=orjson.dumps([valid_event() for _ in range(150)]))
            assert first.status_code == 200 and first.json()["accepted"] == 150, first.text
            held = orjson.dumps([valid_event()])
            deadline = time.monotonic() + 30
            while True:  # the backlog is measured twice a second, off the request path
                before = log.ends()
                refused = client.post("/v1/events", content=held)
                if refused.status_code == 503:
                    break
                assert refused.status_code == 200, refused.text
                held = orjson.dumps([valid_event()])
                assert time.monotonic() < deadline, "never refused with 150 events unprojected and a limit of 100"
                time.sleep(0.2)
            assert refused.headers["retry-after"] == "1"
            message = refused.json()["error"]
            assert "back-pressure: the live projections are" in message and "NHDP_GATEWAY_MAX_BACKLOG" in message
            assert "nothing from this request was published" in message
            time.sleep(2)  # a publication would be visible by now
            assert log.ends() == before
        finally:
            worker.start(stack_settings.start_timeout_s)
        wait_caught_up(stack_settings)
        deadline = time.monotonic() + 30
        while (again := client.post("/v1/events", content=held)).status_code == 503:
            assert time.monotonic() < deadline, again.text
            time.sleep(0.5)
        assert again.status_code == 200 and again.json()["accepted"] == 1, again.text


def test_the_gateway_paces_requests_while_the_projections_fall_behind(stack_settings, tmp_path):
    """Past NHDP_GATEWAY_PACE_BACKLOG events not yet projected, a request waits before it is read
    (counted in nhdp_gateway_pace_seconds) and is then accepted whole: pacing slows, never refuses."""
    from nhdp.stack import worker_service
    from tests.helpers import wait_caught_up

    worker = worker_service(stack_settings)
    producer = bearer(stack_settings, "producer", source=SOURCE, provinces=["*"])
    national = bearer(stack_settings, "national")

    def paced(client: httpx.Client) -> float:
        text = client.get("/metrics", headers=national).text
        return sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("nhdp_gateway_pace_seconds_count")
        )

    with (
        private_api(stack_settings, tmp_path, gateway_pace_backlog=50) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        assert paced(client) == 0
        worker.stop()
        try:
            first = client.post(
                "/v1/events", headers=producer, content=orjson.dumps([valid_event() for _ in range(150)])
            )
            assert first.status_code == 200 and first.json()["accepted"] == 150, first.text
            deadline = time.monotonic() + 30
            while paced(client) == 0:  # the backlog is measured off the request path, 4 times a second
                answer = client.post("/v1/events", headers=producer, content=orjson.dumps([valid_event()]))
                assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
                assert time.monotonic() < deadline, "never paced with 150 events unprojected and a pace backlog of 50"
                time.sleep(0.2)
        finally:
            worker.start(stack_settings.start_timeout_s)
        wait_caught_up(stack_settings)
        time.sleep(1)  # measured again with the worker caught up: no more waiting
        count = paced(client)
        again = client.post("/v1/events", headers=producer, content=orjson.dumps([valid_event()]))
        assert again.status_code == 200 and again.json()["accepted"] == 1, again.text
        assert paced(client) == count

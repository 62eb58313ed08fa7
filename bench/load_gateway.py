"""Load generator for `POST /v1/events`: a separate process, so its CPU is not the gateway's.

    .venv/bin/python bench/load_gateway.py --url http://127.0.0.1:8000 --mode max --seconds 20 --connections 4 --batch 1000
    .venv/bin/python bench/load_gateway.py --url http://127.0.0.1:8000 --mode paced --rate 5000 --batch 100 --seconds 20

Usually started by bench/bench_gateway.py, which reads its output. Every event is
a national-scenario event from the simulator with a fresh event_id (unique per
run: a random prefix and a counter), so the gateway accepts it rather than
answering "duplicate". Request bodies are spliced from pre-serialised events,
so building one costs the load process little.

- ``max``: each connection (a thread with one keep-alive HTTP/1.1 connection)
  posts back to back until --seconds are up;
- ``paced``: requests leave on a fixed schedule of --rate events/s shared by all
  connections; latency is measured from the scheduled start, so a gateway that
  falls behind shows it (no coordinated omission), and from the actual send.

The first --warmup seconds are not counted. Output, on stdout, one JSON object per
line: ``{"kind": "progress", ...}`` about twice a second, then one
``{"kind": "result", ...}`` with totals and latencies (ms).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson


class Bodies:
    """Fresh request bodies from a pool of pre-serialised events with their event_id cut out."""

    def __init__(self, pool_events: int, seed: int, source: str):
        from producers.simulator import simulate

        sim = simulate("national", seed=seed, days=1, daily_doses=max(1000, pool_events // 5 + 500))
        self.parts: list[tuple[bytes, bytes]] = []
        for event in itertools.islice(sim.events(), pool_events):
            raw = orjson.dumps(event | {"source": source})  # one producer, one token (DESIGN §8)
            old = event["event_id"].encode()
            before, after = raw.split(b'"event_id":"' + old + b'"', 1)
            self.parts.append((before + b'"event_id":"', b'"' + after))
        self.prefix = str(uuid.uuid4())[:24].encode()  # 8-4-4-4- : the last group is a counter
        self._ids = itertools.count()
        self._next = itertools.count()

    def make(self, n: int) -> bytes:
        pool, k = self.parts, len(self.parts)
        start = next(self._next) * n
        out = []
        for j in range(n):
            before, after = pool[(start + j) % k]
            out.append(before + self.prefix + b"%012x" % next(self._ids) + after)
        return b"[" + b",".join(out) + b"]"


class Stats:
    """Counts requests that complete inside the measured window [lo, hi] only."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.lock = threading.Lock()
        self.accepted = self.duplicates = self.rejected = self.requests = 0
        self.errors: dict[str, int] = {}
        self.latency_ms: list[float] = []
        self.schedule_latency_ms: list[float] = []
        self.behind_max_ms = 0.0
        self.backoffs, self.backoff_s = 0, 0.0  # answers that asked to retry later, and the wait

    def add(self, answer: dict, t0: float, t1: float, scheduled: float | None) -> None:
        if not self.lo <= t1 <= self.hi:
            return
        with self.lock:
            self.requests += 1
            self.accepted += answer["accepted"]
            self.duplicates += answer["duplicates"]
            self.rejected += len(answer["rejected"])
            self.latency_ms.append((t1 - t0) * 1000)
            if scheduled is not None:
                self.schedule_latency_ms.append((t1 - scheduled) * 1000)
                self.behind_max_ms = max(self.behind_max_ms, (t0 - scheduled) * 1000)

    def backoff(self, seconds: float) -> None:
        with self.lock:
            self.backoffs += 1
            self.backoff_s += seconds

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1


# A producer token for --source, from the environment: never in a command line others can read.
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ.get('NHDP_API_TOKEN', '')}"}


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes, float | None]:
    conn.request("POST", "/v1/events", body=body, headers=HEADERS)
    resp = conn.getresponse()
    retry_after = resp.getheader("Retry-After")
    return resp.status, resp.read(), float(retry_after) if retry_after else None


class Budget:
    """--events: requests are handed out until that many events have been sent in all."""

    def __init__(self, events: int | None):
        self.left, self.lock = events, threading.Lock()

    def take(self, batch: int) -> int:
        if self.left is None:
            return batch
        with self.lock:
            n = min(batch, self.left)
            self.left -= n
            return n


def connection_loop(
    url: str, bodies: Bodies, batch: int, stats: Stats, deadline: float, next_slot=None, budget: Budget | None = None
) -> None:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    while True:
        n = budget.take(batch) if budget else batch
        if n == 0:
            break
        body = bodies.make(n)
        scheduled = None
        if next_slot is not None:
            scheduled = next_slot()
            if scheduled >= deadline:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elif time.perf_counter() >= deadline:
            break
        t0 = time.perf_counter()
        while True:  # the same body until it is answered: a retry is a duplicate, never a second event
            try:
                status, data, retry_after = post(conn, body)
            except (OSError, http.client.HTTPException) as exc:
                stats.error(type(exc).__name__)
                conn.close()
                time.sleep(0.2)
                continue
            if status in (429, 503) and retry_after is not None:
                stats.backoff(retry_after)  # back-pressure, as the gateway asks: not an error
                time.sleep(retry_after)
                continue
            break
        t1 = time.perf_counter()
        if status != 200:
            stats.error(f"HTTP {status}: {data[:200].decode(errors='replace')}")
            continue
        stats.add(orjson.loads(data), t0, t1, scheduled)
    conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the API, e.g. http://127.0.0.1:8000")
    ap.add_argument("--mode", choices=["max", "paced"], default="max")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured duration (after the warm-up)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--wait-go", action="store_true", help="print a ready line, then start on a line on stdin")
    ap.add_argument("--events", type=int, help="max: stop after sending this many events (then --seconds is a limit)")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000, help="events per request")
    ap.add_argument("--rate", type=float, default=0.0, help="paced: events/s for all connections together")
    ap.add_argument("--pool", type=int, default=20_000, help="distinct event bodies to cycle through")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    ap.add_argument("--source", default="bench-load", help="the source of every event: NHDP_API_TOKEN's")
    args = ap.parse_args(argv)
    if args.mode == "paced" and args.rate <= 0:
        ap.error("--mode paced needs --rate")

    bodies = Bodies(args.pool, args.seed, args.source)
    if args.wait_go:  # several load processes start together, after each has built its bodies
        sys.stdout.write(orjson.dumps({"kind": "ready"}).decode() + "\n")
        sys.stdout.flush()
        sys.stdin.readline()
    start = time.perf_counter()
    deadline = start + args.warmup + args.seconds
    stats = Stats(start + args.warmup, deadline)

    next_slot = None
    if args.mode == "paced":
        interval = args.batch / args.rate
        tickets = itertools.count()
        slot_lock = threading.Lock()

        def next_slot() -> float:
            with slot_lock:
                return start + next(tickets) * interval

    budget = Budget(args.events) if args.events else None
    threads = [
        threading.Thread(
            target=connection_loop,
            args=(args.url, bodies, args.batch, stats, deadline, next_slot, budget),
            daemon=True,
        )
        for _ in range(args.connections)
    ]
    for t in threads:
        t.start()

    def emit(kind: str, **fields) -> None:
        sys.stdout.write(orjson.dumps({"kind": kind, **fields}).decode() + "\n")
        sys.stdout.flush()

    while any(t.is_alive() for t in threads):
        now = time.perf_counter()
        with stats.lock:
            emit(
                "progress",
                elapsed=now - start,
                warmup=now < stats.lo,
                accepted=stats.accepted,
                requests=stats.requests,
                errors=sum(stats.errors.values()),
                backoffs=stats.backoffs,
            )
        time.sleep(0.5)
    for t in threads:
        t.join()
    emit(
        "result",
        mode=args.mode,
        connections=args.connections,
        batch=args.batch,
        rate=args.rate,
        seconds=args.seconds,
        accepted=stats.accepted,
        duplicates=stats.duplicates,
        rejected=stats.rejected,
        requests=stats.requests,
        errors=stats.errors,
        latency_ms=stats.latency_ms,
        schedule_latency_ms=stats.schedule_latency_ms,
        behind_max_ms=stats.behind_max_ms,
        backoffs=stats.backoffs,
        backoff_s=stats.backoff_s,
        elapsed=time.perf_counter() - start,
        pid=os.getpid(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

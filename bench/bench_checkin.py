"""Check-in by scan (issue 17): `POST /v1/checkins` at a fixed offered rate, on the whole platform.

    ./run bench checkin                                   # 200 scans/s for 60 s on a private stack
    ./run bench checkin --rate 200 --seconds 60 --save bench/checkin/alone.json
    ./run bench checkin --background-events 2000 --save bench/checkin/with-load.json
    ./run bench checkin --profile /tmp/checkin-profile    # py-spy on the API (warm-up and measured window)

Target (issue 17): p99 ≤ 50 ms at 200 scans/s.

1. a private stack exactly as `nhdp up` makes it (authentication on, supervisor,
   stream worker, ClickHouse sink, API, registry, Kafka, PostgreSQL, ClickHouse);
2. --citizens people seeded through `POST /v1/events` (a site's producer token):
   each 1 or 2 DoseAdministered (pfizer or astrazeneca), some an AppointmentScheduled
   at site 79-760-0001 today, ~1% a serious AdverseEventReported; then wait until
   the projections have applied the whole log. Each gets its health-book code from
   `POST /v1/health-book/qr` (citizen app token; JSON with the PNG, as the app asks),
   --issue-threads at a time; the time per code is reported;
3. open loop: --clients scan processes (this file with --scan-child) share one
   schedule of --rate scans/s for --warmup + --seconds (the warm-up, 20 s by default,
   is reported apart: a cold API takes 10–30 s to reach its steady state at this
   rate: pools grow, threads start), each scan a random citizen's
   code, sent with asyncio httpx.AsyncClients over --connections keep-alive
   connections. A scan leaves at its scheduled time whatever the answers before it
   did, so a slow answer never slows the offered rate. Latency is measured from the
   scheduled send (what a site would see: waiting for a free connection and queueing
   in the server count; no coordinated omission) and from the actual send (the request
   handed to httpx). Every 200 answer is checked against what was seeded (valid doses,
   the appointment, serious adverse events, a new check-in);
4. --background-events R: meanwhile one bench/load_gateway.py process posts
   national-campaign events at R events/s in 1,000-event requests, so the scans meet
   a busy gateway, worker, sink, Kafka and PostgreSQL.

The API's own histogram (`nhdp_checkin_seconds`, from /metrics before and after the
measured window) says how much of the latency is inside the request handler. The
final table: offered and achieved rate, p50/p95/p99/max both ways, errors by status,
CPU per process (from /proc), the whole machine's busy CPU beside it (so another
engineer's test run on the same cores shows), load average before and after; then
p99 by second. --save writes it all as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import orjson
import psutil

TARGET_P99_MS, TARGET_RATE = 50.0, 200
SITE_ID, SITE_SOURCE, PROVINCE = "79-760-0001", "site-79-760", "79"
LOCAL = timezone(timedelta(hours=7))  # the site's "today" (projections/health_records.py)
BUCKETS_RE = re.compile(r'^nhdp_checkin_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.M)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- 2. seeding ---------------------------------------------------------------------------------


def _ts(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def _event(event_type: str, at: datetime, **payload: Any) -> dict[str, Any]:
    """One JSON-form event as a site posts it (the shape of tests/helpers.valid_event)."""
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": _ts(at),
        "province_code": PROVINCE,
        "source": SITE_SOURCE,
        "payload": payload,
    }


def population(n: int, seed: int, appointment_share: float, serious_share: float):
    """(citizens, events): each citizen {citizen_id, doses, appointment, serious}; their events in time order."""
    rng = random.Random(seed)
    now = datetime.now(LOCAL)
    today = now.replace(hour=7, minute=0, second=0, microsecond=0)
    ids: set[str] = set()
    while len(ids) < n:
        ids.add(f"{rng.randrange(10**11, 10**12)}")  # 12 digits
    citizens, events = [], []
    for cid in sorted(ids, key=lambda _: rng.random()):
        doses = rng.choice((1, 2))
        vaccine = rng.choice(("pfizer", "astrazeneca"))
        first = now - timedelta(days=rng.randrange(60, 120), seconds=rng.randrange(86_400))
        dose_ids = []
        for k in range(doses):
            ev = _event(
                "DoseAdministered",
                first + timedelta(days=28 * k),
                citizen_id=cid,
                site_id=SITE_ID,
                vaccine=vaccine,
                lot_number=f"LOT{rng.randrange(10_000):04d}",
                dose_number=k + 1,
            )
            dose_ids.append(ev["event_id"])
            events.append(ev)
        appointment = rng.random() < appointment_share
        if appointment:
            slot = today + timedelta(minutes=30 * rng.randrange(20))  # 07:00–16:30 local, today
            events.append(
                _event(
                    "AppointmentScheduled",
                    now - timedelta(days=1),
                    citizen_id=cid,
                    appointment_id="AP-" + uuid.uuid4().hex[:10],
                    site_id=SITE_ID,
                    slot_start=_ts(slot),
                    slot_end=_ts(slot + timedelta(minutes=30)),
                    dose_number=doses + 1,
                )
            )
        serious = rng.random() < serious_share
        if serious:
            events.append(
                _event(
                    "AdverseEventReported",
                    first + timedelta(days=1),
                    citizen_id=cid,
                    severity="serious",
                    dose_event_id=dose_ids[0],
                    symptoms=["anaphylaxis"],
                )
            )
        citizens.append({"citizen_id": cid, "doses": doses, "appointment": appointment, "serious": int(serious)})
    return citizens, events


def seed(settings, citizens_n: int, seed_value: int, producer: str, bars) -> tuple[list[dict], dict]:
    citizens, events = population(citizens_n, seed_value, appointment_share=0.3, serious_share=0.01)
    t0 = time.perf_counter()
    task = bars.add_task("seed events posted", total=len(events), info=f"{citizens_n:,} citizens")
    with httpx.Client(base_url=settings.api_url, timeout=120, headers={"authorization": f"Bearer {producer}"}) as http:
        for i in range(0, len(events), 1000):
            chunk = events[i : i + 1000]
            while True:
                resp = http.post(
                    "/v1/events", content=orjson.dumps(chunk), headers={"content-type": "application/json"}
                )
                if resp.status_code in (429, 503):
                    time.sleep(float(resp.headers.get("retry-after", "1")))
                    continue
                break
            answer = resp.json() if resp.status_code == 200 else {}
            if resp.status_code != 200 or answer.get("accepted") != len(chunk):
                raise SystemExit(f"seeding: HTTP {resp.status_code}: {resp.text[:1000]}")
            bars.update(task, advance=len(chunk))
    posted_s = time.perf_counter() - t0
    lag_task = bars.add_task("seed events projected", total=None, info="")
    wait_projected(settings, bars, lag_task)
    return citizens, {"events": len(events), "posted_s": posted_s, "projected_s": time.perf_counter() - t0}


def wait_projected(settings, bars, task, timeout_s: float = 300.0) -> None:
    """Until the live projections have applied every message now in health.events (their lag is 0)."""
    import psycopg

    from projections.postgres.tracking import consumer_lag

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        while True:
            lag, applied, _ = consumer_lag(settings, conn)
            behind = sum(lag.values())
            bars.update(task, total=applied + behind, completed=applied, info=f"lag {behind:,}")
            if behind == 0:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"projections still {behind:,} behind after {timeout_s:.0f} s")
            time.sleep(0.2)


def issue_codes(settings, citizens: list[dict], app_token: str, threads: int, bars) -> dict:
    """Each citizen's HB1: code from POST /v1/health-book/qr (format=json: the token and its PNG)."""
    task = bars.add_task("health-book codes issued", total=len(citizens), info="")
    latencies: list[float] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    headers = {"authorization": f"Bearer {app_token}"}
    with httpx.Client(base_url=settings.api_url, timeout=60, headers=headers, limits=limits) as http:

        def one(citizen: dict) -> None:
            t = time.perf_counter()
            resp = http.post("/v1/health-book/qr", json={"citizen_id": citizen["citizen_id"]})
            ms = (time.perf_counter() - t) * 1000
            if resp.status_code != 200:
                raise SystemExit(f"health-book code: HTTP {resp.status_code}: {resp.text[:500]}")
            citizen["code"] = resp.json()["token"]
            with lock:
                latencies.append(ms)
            bars.update(task, advance=1)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, citizens))
        seconds = time.perf_counter() - t0
    return {
        "codes": len(citizens),
        "threads": threads,
        "seconds": seconds,
        "codes_per_s": len(citizens) / seconds,
        "wall_ms_per_code": seconds / len(citizens) * 1000,
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "code_chars": round(sum(len(c["code"]) for c in citizens) / len(citizens)),
    }


# -- 3. the scan processes ------------------------------------------------------------------------


def scan_child(args) -> int:
    """One scan process: --child-index k of --clients takes scans k, k+K, k+2K, … of the shared schedule.

    stdout, one JSON object a line: ready; progress twice a second; the result."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # httpcore asks `import sniffio` on every request; without sniffio installed each is a failed import
    # that searches all of sys.path (8% of this process in a profile). None here makes it fail at once.
    sys.modules.setdefault("sniffio", None)
    codes = orjson.loads(Path(args.codes).read_bytes())
    bodies = [
        orjson.dumps({"code": c["code"], "site_id": SITE_ID, "province_code": PROVINCE})
        for c in codes  # built up front: the schedule pays nothing for them
    ]
    emit = lambda kind, **f: print(orjson.dumps({"kind": kind, **f}).decode(), flush=True)  # noqa: E731
    emit("ready")
    t0 = float(sys.stdin.readline().split()[1])  # the shared start, time.monotonic() (CLOCK_MONOTONIC)
    return asyncio.run(scan_loop(args, codes, bodies, t0, emit))


async def scan_loop(args, codes: list[dict], bodies: list[bytes], t0: float, emit) -> int:
    k, clients, rate = args.child_index, args.clients, args.rate
    total = int((args.warmup + args.seconds) * rate)
    measured_from = int(args.warmup * rate)  # scans scheduled before this index are the warm-up
    rng = random.Random(args.seed * 1000 + k)
    url = f"{args.url}/v1/checkins"
    headers = {"authorization": f"Bearer {os.environ['NHDP_SITE_TOKEN']}", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(30.0)
    st: dict[str, Any] = dict(sent=0, done=0, ok=0, measured=0, behind_ms=0.0)
    # per answered scan, in two groups (the warm-up and the measured window):
    # sched_ms answer − scheduled send; send_ms answer − actual send; lag_ms actual − scheduled send;
    # at_s scheduled send − t0 (for the per-second view)
    groups = {
        g: dict(sched_ms=[], send_ms=[], lag_ms=[], at_s=[], statuses={}, mismatches={}) for g in ("warmup", "measured")
    }
    cpu0 = time.process_time()

    async def scan(i: int, scheduled: float) -> None:
        c = rng.randrange(len(codes))
        measured = i >= measured_from
        client = await free.get()  # a free connection; the wait counts (latency runs from the schedule)
        try:
            sent = time.monotonic()
            try:
                resp = await client.post(url, content=bodies[c], headers=headers)
                status, data = str(resp.status_code), resp.content
            except httpx.HTTPError as exc:
                status, data = type(exc).__name__, b""
            end = time.monotonic()
        finally:
            free.put_nowait(client)
        st["done"] += 1
        st["ok"] += status == "200"
        st["measured"] += measured
        g = groups["measured" if measured else "warmup"]
        g["statuses"][status] = g["statuses"].get(status, 0) + 1
        g["sched_ms"].append((end - scheduled) * 1000)
        g["send_ms"].append((end - sent) * 1000)
        g["lag_ms"].append((sent - scheduled) * 1000)
        g["at_s"].append(scheduled - t0)
        mismatches = g["mismatches"]
        if status == "200":
            answer, want = orjson.loads(data), codes[c]
            for what, ok in (
                ("valid_doses", answer["valid_doses"] == want["doses"]),
                ("appointment", (answer["appointment"] is not None) == want["appointment"]),
                ("serious_adverse_events", len(answer["serious_adverse_events"]) == want["serious"]),
                ("checked_in.new", answer["checked_in"]["new"] is True),
            ):
                if not ok:
                    mismatches[what] = mismatches.get(what, 0) + 1

    async def report() -> None:
        while True:
            emit("progress", **st, elapsed=time.monotonic() - t0)
            await asyncio.sleep(0.5)

    # --connections AsyncClients of one keep-alive connection each, lent out one scan at a time; a scan
    # that finds none free waits here, in the order scans were due. Not one AsyncClient with a pool
    # of --connections: httpcore's pool, at every request's start and end, walks its waiting requests
    # and asks each connection whether it has expired (a select() on its socket). With 64 connections
    # and a queue that cost more CPU than the scans, and the client fell minutes behind (py-spy: 60–75%
    # of its samples in _assign_requests_to_connections).
    # FIFO, so every connection is used every --connections/--rate seconds: one left idle for 5 s is
    # closed by uvicorn (its keep-alive timeout) and a scan sent on it as it closes gets a ReadError
    # (11 of 6,000 scans in a run that lent the most recent connection first).
    free: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(args.connections):
            free.put_nowait(await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout)))
        reporter = asyncio.create_task(report())
        tasks: set[asyncio.Task] = set()
        for i in range(k, total, clients):
            scheduled = t0 + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            st["behind_ms"] = max(st["behind_ms"], (time.monotonic() - scheduled) * 1000)
            task = asyncio.create_task(scan(i, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            st["sent"] += 1
        unfinished = 0
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=60)
            for task in pending:
                task.cancel()
            unfinished = len(pending)
        reporter.cancel()
    if unfinished:  # the last ones scheduled: the measured window's
        groups["measured"]["statuses"]["unanswered after 60 s"] = unfinished
    emit(
        "result",
        groups=groups,
        sent=st["sent"],
        cpu_s=time.process_time() - cpu0,
        last_answer_s=time.monotonic() - t0,
    )
    return 0


class Scanner:
    """One scan process and what it last said."""

    def __init__(self, args, settings, codes_file: Path, site_token: str, index: int):
        cmd = [sys.executable, __file__, "--scan-child", "--codes", str(codes_file), "--url", settings.api_url]
        cmd += ["--child-index", str(index), "--clients", str(args.clients), "--rate", str(args.rate)]
        cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup), "--connections", str(args.connections)]
        cmd += ["--seed", str(args.seed)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ | {"NHDP_SITE_TOKEN": site_token},  # never in a command line others can read
        )
        self.ready = threading.Event()
        self.progress: dict = {}
        self.result: dict | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = orjson.loads(line)
            if msg["kind"] == "ready":
                self.ready.set()
            elif msg["kind"] == "progress":
                self.progress = msg
            else:
                self.result = msg

    def go(self, t0: float) -> None:
        if not self.ready.wait(120):
            raise SystemExit(f"scan process not ready:\n{self.proc.stderr.read().decode()[-3000:]}")
        self.proc.stdin.write(f"go {t0!r}\n".encode())
        self.proc.stdin.close()

    def wait(self) -> dict:
        self.proc.wait(timeout=180)
        if self.proc.returncode != 0 or self.result is None:
            raise SystemExit(
                f"scan process failed ({self.proc.returncode}):\n{self.proc.stderr.read().decode()[-3000:]}"
            )
        return self.result


# -- the API's own view ---------------------------------------------------------------------------


def checkin_histogram(settings, token: str) -> dict[float, float]:
    """nhdp_checkin_seconds' cumulative buckets (le → count) from the API's /metrics."""
    resp = httpx.get(f"{settings.api_url}/metrics", headers={"authorization": f"Bearer {token}"}, timeout=30)
    resp.raise_for_status()
    return {float(le): float(n) for le, n in BUCKETS_RE.findall(resp.text)}


def server_share(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Over the window: requests handled, and the share the handler finished within each bucket."""
    diff = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    n = diff.get(float("inf"), 0.0)
    return {
        "requests": int(n),
        "within_ms": {f"{le * 1000:g}": diff[le] / n for le in sorted(diff) if n and le != float("inf")},
    }


def api_process(settings):
    """The API's process (psutil): the one listening on its port, as bench_gateway finds it."""
    from bench_gateway import server_process

    return server_process(settings.api_url)


# -- 3+4. the measured run ------------------------------------------------------------------------


class CpuTimeline:
    """About every second, the cores each platform process tree used (psutil, /proc), beside the whole
    machine's: to see which process was busy when the latency rose."""

    def __init__(self, roots: dict[str, int]):
        self.roots, self.samples = roots, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    out[name] = out.get(name, 0.0) + t.user + t.system
        out["machine"] = busy_seconds(psutil.cpu_times())
        return out

    def _loop(self) -> None:
        t0 = t_last = time.monotonic()
        last = self._cpu()
        while not self._stop.wait(1.0):
            now, t = self._cpu(), time.monotonic()
            # cores over the interval (reading ~25 process trees stretches it); a new process from its first sample
            cores = {k: round((v - last.get(k, v)) / (t - t_last), 2) for k, v in now.items()}
            self.samples.append({"t": round(t - t0, 1), **cores})
            last, t_last = now, t

    def start(self) -> CpuTimeline:
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.samples


def busy_seconds(t) -> float:
    """CPU seconds the whole machine was not idle (psutil.cpu_times(): all cores)."""
    gone = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)  # steal: the hypervisor ran others
    return sum(t) - gone - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest is in user


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 0.5),
        "p95_ms": percentile(values, 0.95),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values, default=float("nan")),
    }


def measure(settings, args, citizens: list[dict], tokens: dict[str, str], bars) -> dict:
    from bench_platform import CpuMeter, Load, platform_processes

    codes_dir = Path(tempfile.mkdtemp(prefix="nhdp-bench-checkin-"))
    codes_file = codes_dir / "codes.json"
    codes_file.write_bytes(orjson.dumps(citizens))
    try:
        scanners = [Scanner(args, settings, codes_file, tokens["site"], k) for k in range(args.clients)]
        background = None
        if args.background_events:
            paced = ("--mode", "paced", "--rate", str(args.background_events), "--batch", "1000")
            seconds = args.warmup + args.seconds + 2
            background = Load.start(
                settings, tokens["producer"], *paced, "--connections", "4", "--seconds", str(seconds)
            )
            background.go()  # builds its bodies first; the scans start once it posts
        for s in scanners:
            if not s.ready.wait(120):
                raise SystemExit(f"scan process not ready:\n{s.proc.stderr.read().decode()[-3000:]}")
        load_before = os.getloadavg()
        machine_before = psutil.cpu_times()
        api = api_process(settings)
        meter = CpuMeter(platform_processes(settings), split_children=frozenset({"sink"})).start()
        clients = {f"scan client {s.proc.pid}": s.proc.pid for s in scanners}
        if background is not None:
            clients["background load"] = background.proc.pid
        client_meter = CpuMeter(clients).start()
        metered_from = time.perf_counter()
        t0 = time.monotonic() + 0.5
        cpu_timeline = CpuTimeline(platform_processes(settings) | clients).start()
        for s in scanners:
            s.go(t0)
        profilers = []
        if args.profile and api is not None and args.warmup >= 1:
            profilers.append(py_spy(api.pid, args.profile / "api-warmup.txt", args.warmup, args.profile_rate))
        total_s = args.warmup + args.seconds
        task = bars.add_task(f"scans at {args.rate:g}/s offered", total=total_s, info="")
        hist_before = None
        while any(s.proc.poll() is None for s in scanners):
            now = time.monotonic() - t0
            if hist_before is None and now >= args.warmup:
                hist_before = checkin_histogram(settings, tokens["national"])
                if args.profile and api is not None:
                    profilers.append(py_spy(api.pid, args.profile / "api.txt", args.seconds, args.profile_rate))
            done = sum(s.progress.get("done", 0) for s in scanners)
            sent = sum(s.progress.get("sent", 0) for s in scanners)
            ok = sum(s.progress.get("ok", 0) for s in scanners)
            behind = max((s.progress.get("behind_ms", 0.0) for s in scanners), default=0.0)
            info = f"{sent:,} sent, {done:,} answered ({done - ok:,} not 200), {sent - done} in flight"
            info += f", client up to {behind:.0f} ms late"
            if background is not None:
                info += f"; background {background.accepted():,} events"
            bars.update(task, completed=min(max(now, 0.0), total_s), info=info)
            time.sleep(0.25)
        results = [s.wait() for s in scanners]
        hist_after = checkin_histogram(settings, tokens["national"])
        cpu = meter.stop()
        cpu_by_second = cpu_timeline.stop()
        metered_s = time.perf_counter() - metered_from
        clients_cpu = client_meter.stop()
        load_after = os.getloadavg()
        machine_busy = busy_seconds(psutil.cpu_times()) - busy_seconds(machine_before)
        bg = None
        if background is not None:
            r = background.wait()
            bg = {
                "rate": args.background_events,
                "accepted": r["accepted"],
                "accepted_rate": r["accepted"] / r["seconds"],
                "errors": r["errors"],
                "backoffs": r["backoffs"],
                "request_p99_ms": percentile(r["latency_ms"], 0.99),
            }
        for profiler in profilers:
            profiler.wait(60)
    finally:
        for p in codes_dir.iterdir():
            p.unlink()
        codes_dir.rmdir()

    merged = {}
    for name in ("warmup", "measured"):
        gs = [r["groups"][name] for r in results]
        g = merged[name] = {
            key: [x for one in gs for x in one[key]] for key in ("sched_ms", "send_ms", "lag_ms", "at_s")
        }
        for key in ("statuses", "mismatches"):
            g[key] = {}
            for one in gs:
                for what, n in one[key].items():
                    g[key][what] = g[key].get(what, 0) + n
    m, w = merged["measured"], merged["warmup"]
    statuses, mismatches = m["statuses"], m["mismatches"]
    measured = sum(statuses.values())
    ok = statuses.get("200", 0)
    window = max(r["last_answer_s"] for r in results) - args.warmup
    by_second: dict[int, list[float]] = {}
    for t, ms in zip(w["at_s"] + m["at_s"], w["sched_ms"] + m["sched_ms"]):
        by_second.setdefault(int((t - args.warmup) // 1), []).append(ms)  # the warm-up's seconds are negative
    timeline = [
        {"second": s, "scans": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99), "max_ms": max(v)}
        for s, v in sorted(by_second.items())
    ]
    sched, send, lag = m["sched_ms"], m["send_ms"], m["lag_ms"]
    return {
        "offered_rate": args.rate,
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "clients": args.clients,
        "connections": args.connections,
        "scans": measured,
        "ok": ok,
        "ok_with_warmup": ok + w["statuses"].get("200", 0),
        "achieved_rate": ok / window,
        "from_schedule": summarise(sched),
        "from_send": summarise(send),
        "client_late": summarise(lag),
        "statuses": statuses,
        "errors": measured - ok,
        "mismatches": mismatches,
        "warmup": {
            "from_schedule": summarise(w["sched_ms"]),
            "statuses": w["statuses"],
            "mismatches": w["mismatches"],
        },
        "server": server_share(hist_before or {}, hist_after),
        "cpu_s": cpu,
        "metered_s": metered_s,
        "clients_cpu_s": clients_cpu,
        "background": bg,
        "load_before": load_before,
        "load_after": load_after,
        # every process on the machine: what is not the platform's or the clients' is someone else's
        # (another engineer's test suite shares these cores) or this benchmark's own main process
        "machine_busy_s": machine_busy,
        "others_cpu_s": machine_busy - sum(cpu.values()) - sum(clients_cpu.values()),
        "timeline": timeline,
        "cpu_by_second": cpu_by_second,  # t: seconds since the scans' start (±0.5 s); cores per process
    }


def py_spy(pid: int, output: Path, seconds: float, rate: int) -> subprocess.Popen:
    """py-spy record of the API for `seconds`, every thread, idle ones too (waits are latency): collapsed
    stacks (`--format raw`), for a flame graph or a top-N. --profile DIR: DIR/api-warmup.txt for the
    warm-up, DIR/api.txt for the measured window. Few samples a second (--profile-rate): the API has
    ~45 threads, and py-spy at 97/s with --idle, or even 20/s with the background load, took enough of
    the 2 cores that the scans fell a minute behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--idle", "--threads"]
    cmd += ["--nonblocking", "--duration", str(int(seconds)), "--output", str(output)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- report ---------------------------------------------------------------------------------------


def report(run: dict, console) -> None:
    from rich.table import Table

    m = run["scan"]
    table = Table(title=f"POST /v1/checkins, open loop — {run['label']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    bg = m["background"]
    table.add_row(
        "background load", f"{bg['rate']:,} events/s offered, {bg['accepted_rate']:,.0f}/s accepted" if bg else "none"
    )
    table.add_row("offered rate", f"{m['offered_rate']:g} scans/s for {m['seconds']:g} s ({m['clients']} client(s))")
    table.add_row("achieved rate (200 answers)", f"{m['achieved_rate']:.1f} scans/s")
    for name, key in (("from scheduled send", "from_schedule"), ("from actual send", "from_send")):
        s = m[key]
        ok = s["p99_ms"] <= TARGET_P99_MS
        colour = "green" if ok else "red"
        table.add_row(
            f"latency {name}: p50 / p95 / [bold]p99[/] / max ms",
            f"{s['p50_ms']:.1f} / {s['p95_ms']:.1f} / [bold {colour}]{s['p99_ms']:.1f}[/] / {s['max_ms']:.0f}",
        )
    wu = m["warmup"]["from_schedule"]
    table.add_row(
        f"warm-up, first {m['warmup_s']:g} s (not measured): p50 / p99 / max ms",
        f"{wu['p50_ms']:.1f} / {wu['p99_ms']:.1f} / {wu['max_ms']:.0f}",
    )
    c = m["client_late"]
    table.add_row("client: into httpx after the schedule, p99 / max ms", f"{c['p99_ms']:.1f} / {c['max_ms']:.0f}")
    within = m["server"]["within_ms"]
    table.add_row(
        "API handler (nhdp_checkin_seconds) within 20 / 50 / 100 ms",
        " / ".join(f"{within.get(k, float('nan')):.1%}" for k in ("20", "50", "100")),
    )
    errors = ", ".join(f"{k}: {n:,}" for k, n in sorted(m["statuses"].items()) if k != "200") or "none"
    table.add_row("scans measured; not 200", f"{m['scans']:,}; {errors}")
    table.add_row(
        "answers unlike the seeded record", ", ".join(f"{k}: {n}" for k, n in m["mismatches"].items()) or "none"
    )
    cpu = m["cpu_s"]
    parts = sorted(cpu.items(), key=lambda kv: -kv[1])
    table.add_row("platform CPU s in the run", ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.5))
    idle = run.get("idle_cores")
    if idle:
        at_rest = sorted(idle.items(), key=lambda kv: -kv[1])
        table.add_row(
            "platform CPU at rest before (cores)",
            f"{sum(idle.values()):.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in at_rest if v >= 0.01),
        )
    table.add_row(
        "CPU in the run (cores): platform / machine / neither platform nor clients",
        f"{sum(cpu.values()) / m['metered_s']:.2f} / {m['machine_busy_s'] / m['metered_s']:.2f} / "
        f"{m['others_cpu_s'] / m['metered_s']:.2f} of {os.cpu_count()}",
    )
    if not m["background"]:
        net = cpu.get("api", 0.0) - (idle or {}).get("api", 0.0) * m["metered_s"]
        table.add_row("API CPU per scan (less its CPU at rest)", f"{net / max(m['ok_with_warmup'], 1) * 1000:.2f} ms")
    table.add_row(
        "load clients CPU s",
        ", ".join(f"{k} {v:.1f} ({v / m['metered_s']:.2f} cores)" for k, v in m["clients_cpu_s"].items()),
    )
    la = lambda t: " ".join(f"{x:.2f}" for x in t)  # noqa: E731
    table.add_row("load average before → after", f"{la(m['load_before'])} → {la(m['load_after'])}")
    iss = run["issuance"]
    table.add_row(
        "health-book codes issued",
        f"{iss['codes']:,} in {iss['seconds']:.1f} s ({iss['threads']} threads): {iss['wall_ms_per_code']:.1f} ms "
        f"wall per code, request p50 {iss['p50_ms']:.0f} / p99 {iss['p99_ms']:.0f} ms",
    )
    table.add_row("seeded", f"{run['seed']['events']:,} events, projected after {run['seed']['projected_s']:.1f} s")
    console.print(table)
    warm = [s for s in m["timeline"] if s["second"] < 0]
    console.print("warm-up, p99 ms from the schedule by second: " + " ".join(f"{s['p99_ms']:.0f}" for s in warm))
    worst = sorted((s for s in m["timeline"] if s["second"] >= 0), key=lambda s: -s["p99_ms"])[:5]
    console.print(
        "worst measured seconds (p99 from the schedule): "
        + ", ".join(f"s{s['second']} {s['p99_ms']:.0f} ms" for s in worst)
    )
    p99 = m["from_schedule"]["p99_ms"]
    met = p99 <= TARGET_P99_MS and m["achieved_rate"] >= 0.99 * m["offered_rate"] and not m["errors"]
    console.print(
        ("[green]" if met else "[red]")
        + f"target p99 ≤ {TARGET_P99_MS:.0f} ms at {TARGET_RATE} scans/s: {'met' if met else 'NOT met'} "
        f"(p99 {p99:.1f} ms from the schedule at {m['offered_rate']:g}/s offered)[/]"
    )


# -- main -----------------------------------------------------------------------------------------


def bench(settings, args) -> dict:
    from bench_platform import progress_bars
    from bench_sdk import console, machine

    from schemas.api_auth import issue_token

    console.print(f"[bold]NHDP check-in benchmark[/]: {settings.api_url}; machine: {machine()}")
    tokens = {
        "producer": issue_token(
            settings, "bench-checkin-seed", "producer", ttl="2h", source=SITE_SOURCE, provinces=["*"]
        ).token,
        "site": issue_token(
            settings, "bench-checkin-site", "site", ttl="2h", source=SITE_SOURCE, provinces=[PROVINCE]
        ).token,
        "app": issue_token(settings, "bench-checkin-app", "citizen_app", ttl="2h").token,
        "national": issue_token(settings, "bench-checkin-watch", "national", ttl="2h").token,
    }
    run: dict[str, Any] = {"label": args.label, "machine": machine(), "started_utc": _utc_now()}
    with progress_bars() as bars:
        citizens, run["seed"] = seed(settings, args.citizens, args.seed, tokens["producer"], bars)
        run["issuance"] = issue_codes(settings, citizens, tokens["app"], args.issue_threads, bars)
    if args.settle:
        from bench_platform import CpuMeter, platform_processes

        status = f"letting the machine settle for {args.settle:g} s (load average {os.getloadavg()[0]:.2f})"
        with console.status(status):
            meter = CpuMeter(platform_processes(settings), split_children=frozenset({"sink"})).start()
            t = time.perf_counter()
            time.sleep(args.settle)
            idle = meter.stop()
            run["idle_cores"] = {name: cpu / (time.perf_counter() - t) for name, cpu in idle.items()}
    # the background load's own producer token: its events name source bench-load
    tokens["producer"] = issue_token(
        settings, "bench-checkin-load", "producer", ttl="2h", source="bench-load", provinces=["*"]
    ).token
    with progress_bars() as bars:
        run["scan"] = measure(settings, args, citizens, tokens, bars)
    run["machine_after"] = machine()
    run["finished_utc"] = _utc_now()
    report(run, console)
    return run


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--existing", action="store_true", help="the stack of the NHDP_* settings, not a private one")
    ap.add_argument("--citizens", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=200.0, help="scans/s offered, on a fixed schedule")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured part of the schedule")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of scans at --rate first, not measured")
    ap.add_argument("--clients", type=int, default=1, help="scan processes sharing the schedule")
    ap.add_argument("--connections", type=int, default=64, help="HTTP connections per scan process")
    ap.add_argument("--background-events", type=int, default=0, help="events/s posted meanwhile (1,000 a request)")
    ap.add_argument("--issue-threads", type=int, default=8, help="health-book codes requested at a time")
    ap.add_argument("--settle", type=float, default=30.0, help="seconds of rest between set-up and the scans")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--label", default=time.strftime("%Y-%m-%d %H:%M"))
    ap.add_argument("--save", type=Path, help="write the run as JSON")
    ap.add_argument("--profile", type=Path, help="py-spy record the API over the measured window, into this folder")
    ap.add_argument("--profile-rate", type=int, default=3, help="py-spy samples per second and thread")
    # a scan process (started by this benchmark)
    ap.add_argument("--scan-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--codes", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--child-index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scan_child:
        return scan_child(args)

    from infra.settings import Settings
    from nhdp import stack

    if args.existing:
        run = bench(Settings(), args)
    else:
        from bench_sdk import console

        console.print("starting a private stack as `nhdp up` makes it (temporary folder, free ports)")
        t0 = time.perf_counter()
        with stack.private("bench-checkin") as settings:
            console.print(f"private stack up in {time.perf_counter() - t0:.0f} s: API {settings.api_url}")
            run = bench(settings, args)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

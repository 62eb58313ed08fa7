"""The whole platform at once: events posted through the gateway until the summary and the analytics show them.

    ./run bench platform                      # a private stack (temp folder, free ports), as `nhdp up` makes it
    ./run bench platform --existing           # the stack named by the NHDP_* settings (`nhdp up`)
    ./run bench platform --save bench/platform/after.json --chart bench/platform/cpu.png \\
        --compare bench/platform/before.json

Everything runs as a user gets it: authentication on, the supervisor, the stream
worker, the ClickHouse sink and its decoder processes, the API, the registry,
Kafka, PostgreSQL and ClickHouse all on this machine, competing for its cores.

1. throughput: after --warmup-events (the JVM's compiler and every cache
   warm) and once the platform is idle again (the warm-up's deferred work
   done), --clients load processes (bench/load_gateway.py, one keep-alive
   connection each) post --events national-campaign events in --batch-event
   requests. Accepted events/s is the gateway's answer rate; end-to-end events/s
   runs from the first post until the national summary (PostgreSQL projections)
   AND the analytics (ClickHouse) both reflect every offset the log holds (the
   summary's NHDP-Positions header; the sink's committed offsets, which are the
   analytics answers' header). CPU time of every process of the platform is
   read from /proc (psutil) over that window and divided by the events. The
   work the events leave behind (the sink's rollups after the lull,
   ClickHouse's merges) is measured after the window, until the platform is
   idle, and reported beside it.
2. ceiling: one plain consumer process reads the same events and Avro-decodes
   them, nothing else; the platform's end-to-end rate is reported against it.
3. freshness: one load process posts --fresh-rate events/s in 100-event requests
   for --fresh-seconds; every 50 ms the log's end is sampled beside the positions
   the summary and the analytics reflect. An event's freshness is the time from
   the sample whose end first includes it until an answer reflects it (one
   sample, 50 ms, is the resolution).

Progress bars while it runs, then a table of CPU µs per event per process and,
with --chart, a stacked bar chart (PNG) beside any --compare'd earlier runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import orjson
import psutil
from bench_gateway import percentile
from bench_sdk import console, machine, own_stack
from kafka.errors import KafkaError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.settings import Settings
from projections.clickhouse.connect import open_store
from projections.freshness import HEADER_POSITIONS, reached
from schemas.api_auth import issue_token

LOAD = Path(__file__).resolve().parent / "load_gateway.py"
TARGET_EVENTS_S, TARGET_CPU_US, TARGET_FRESH_P99_S = 15_000, 120, 1.0
SAMPLE_S = 0.05


# -- CPU from /proc -----------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) of named process trees, from /proc via psutil.

    Every process of a tree is sampled (twice a second, and at start and stop) and
    its CPU since the start, or since it appeared, is kept; one that exits between
    two samples loses at most its last half second."""

    def __init__(self, roots: dict[str, int], split_children: frozenset[str] = frozenset()):
        self.roots, self.split = roots, split_children
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], tuple[str, float]] = {}
        # The JVMs' JIT compiler threads, by (pid, tid): part of their process's CPU, reported
        # apart because it is a cost of a young JVM, not of the events.
        self.jit_first: dict[tuple[int, int], float] = {}
        self.jit_last: dict[tuple[int, int], float] = {}
        self.roles: dict[tuple[int, float], str] = {}  # PostgreSQL's processes: what each is for
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, initial: bool = False) -> None:
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [(name, root)] + [
                    (f"{name} (children)" if name in self.split else name, c) for c in root.children(recursive=True)
                ]
            except psutil.Error:
                continue
            for label, proc in procs:
                try:
                    key = (proc.pid, proc.create_time())
                    t = proc.cpu_times()
                except psutil.Error:
                    continue
                cpu = t.user + t.system
                if initial:
                    self.first[key] = cpu
                self.first.setdefault(key, 0.0)  # appeared during the window: all its CPU counts
                self.last[key] = (label, cpu)
                if label.startswith("kafka"):
                    self._sample_jit(proc, initial)
                if label == "postgres" and key not in self.roles:
                    self.roles[key] = postgres_role(proc)

    def _sample_jit(self, proc: psutil.Process, initial: bool) -> None:
        try:
            threads = proc.threads()
        except psutil.Error:
            return
        for th in threads:
            try:
                name = Path(f"/proc/{proc.pid}/task/{th.id}/comm").read_text()
            except OSError:
                continue
            if "CompilerThre" in name:  # "C2 CompilerThre", "C1 CompilerThre"
                key = (proc.pid, th.id)
                if initial:
                    self.jit_first[key] = th.user_time + th.system_time
                self.jit_first.setdefault(key, 0.0)
                self.jit_last[key] = th.user_time + th.system_time

    def so_far(self) -> float:
        """CPU seconds of every process since the start, as of the last sample."""
        return sum(cpu - self.first.get(key, 0.0) for key, (_, cpu) in list(self.last.items()))

    def postgres_s(self) -> dict[str, float]:
        """CPU seconds over the window of PostgreSQL's processes by role (after stop())."""
        out: dict[str, float] = {}
        for key, (label, cpu) in self.last.items():
            if key in self.roles:
                out[self.roles[key]] = out.get(self.roles[key], 0.0) + cpu - self.first[key]
        return out

    def jit_s(self) -> float:
        """CPU seconds of the JVMs' JIT compilers over the window (after stop())."""
        return sum(cpu - self.jit_first[key] for key, cpu in self.jit_last.items())

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def start(self) -> CpuMeter:
        self._sample(initial=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        out: dict[str, float] = {}
        for key, (label, cpu) in self.last.items():
            out[label] = out.get(label, 0.0) + cpu - self.first[key]
        return out


def platform_meter(settings: Settings) -> CpuMeter:
    """A started CpuMeter of every platform process, the sink's decoders apart."""
    return CpuMeter(platform_processes(settings), split_children=frozenset({"sink"})).start()


def postgres_role(proc: psutil.Process) -> str:
    """What a PostgreSQL process is for, from the title it sets itself ("postgres: autovacuum worker …")."""
    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if not title.startswith("postgres: "):
        return "postmaster"
    for role in ("autovacuum", "walwriter", "checkpointer", "background writer", "logical replication"):
        if role in title:
            return role
    return "client connections"


IDLE_CORES = 0.1  # the platform is idle once its processes use less than this a second…
IDLE_FOR_S = 3  # …for this many seconds in a row


def settle(settings: Settings, timeout_s: float = 120.0) -> tuple[float, dict[str, float]]:
    """Wait until the platform's processes are idle; (seconds waited, their CPU seconds by part meanwhile).

    A run's last events leave work behind them: the sink recomputes the rollups of
    every hour they touched once the stream pauses, and ClickHouse merges their
    parts. Left running into the next measured window, that work was counted
    against the next run's events or not, depending on a second's timing: the
    largest part of the run-to-run spread of ClickHouse's CPU (11 to 36 µs an event)."""
    meter = platform_meter(settings)
    t0 = time.perf_counter()
    before, quiet = 0.0, 0
    # Quiet for IDLE_FOR_S in a row: the sink starts its rollups only after a lull of a second.
    while time.perf_counter() - t0 < timeout_s and quiet < IDLE_FOR_S:
        time.sleep(1.0)
        used = meter.so_far()
        quiet = quiet + 1 if used - before < IDLE_CORES else 0
        before = used
    return time.perf_counter() - t0 - quiet, by_part(meter.stop())


def extra_workers(settings: Settings, workers: int) -> list:
    """The stream workers beside the standard one (worker2…), as bench_pipeline starts them."""
    from nhdp.stack import worker_service

    return [worker_service(settings, f"worker{i}") for i in range(2, workers + 1)]


# ClickHouse's own counters (system.events) of what its CPU went on: inserted, merged and read rows.
CLICKHOUSE_WORK = (
    "InsertQuery",
    "InsertedRows",
    "Merge",
    "MergedRows",
    "SelectQuery",
    "SelectedRows",
    "UserTimeMicroseconds",
    "SystemTimeMicroseconds",
)


def clickhouse_work(settings: Settings) -> dict[str, int] | None:
    """The server's counters now; None when the analytics are chDB's (no server) or it does not answer."""
    if not settings.analytics_url().startswith("clickhouse"):
        return None
    try:
        store = open_store(settings.analytics_url(), password=settings.analytics_password())
        try:
            return {name: int(value) for name, value in store.execute("SELECT event, value FROM system.events")}
        finally:
            store.close()
    except Exception as exc:  # a figure of the report, never a reason to fail the run
        console.print(f"[yellow]ClickHouse's counters unread: {type(exc).__name__}: {exc}[/]")
        return None


def platform_processes(settings: Settings) -> dict[str, int]:
    """Every running service of the stack by name → pid (nhdp/stack.py's list, plus the supervisor
    and any extra worker this benchmark started)."""
    from nhdp import stack

    services = [step.service for step in stack.steps(settings)] + [stack.supervisor_service(settings)]
    services += extra_workers(settings, settings.kafka_partitions)
    return {svc.name: pid for svc in services if (pid := svc.pid()) is not None}


def by_part(cpu: dict[str, float]) -> dict[str, float]:
    """CPU seconds per part of the platform: a cluster's nodes (kafka-1…, clickhouse-1-2…) and
    extra workers (worker2…) add up under their part's name."""
    out: dict[str, float] = {}
    for name, seconds in cpu.items():
        part = re.sub(r"(-\d+)+$|\d+$", "", name) if name.startswith(("kafka", "worker", "clickhouse")) else name
        out[part] = out.get(part, 0.0) + seconds
    return out


# -- what the answers reflect -----------------------------------------------------------------


def parse_positions(text: str | None) -> dict[int, int] | None:
    if not text:
        return None
    return {int(p): int(o) for p, o in (part.split(":") for part in text.split(","))}


class Watcher:
    """The log's end and the positions the national summary and the analytics reflect.

    The summary's are its NHDP-Positions header. The analytics' header is the sink's committed
    offsets, read here directly: an analytics query every 50 ms would be ClickHouse work of the
    benchmark's own (a tenth of ClickHouse's CPU in a run that polled /v1/analytics/doses)."""

    def __init__(self, settings: Settings, token: str):
        from schemas.log import GroupPositions, LogEnds
        from schemas.topics import ANALYTICS_GROUP

        self.http = httpx.Client(base_url=settings.api_url, timeout=30, headers={"authorization": f"Bearer {token}"})
        self.log_ends = LogEnds(settings)
        self.sink_positions = GroupPositions(settings, ANALYTICS_GROUP)

    def ends(self) -> dict[int, int]:
        return {p: o for (_topic, p), o in self.log_ends().items()}

    def summary(self) -> dict[int, int] | None:
        try:
            resp = self.http.get("/v1/national/summary")
        except httpx.HTTPError:
            return None
        return parse_positions(resp.headers.get(HEADER_POSITIONS)) if resp.status_code == 200 else None

    def analytics(self) -> dict[int, int] | None:
        try:
            return self.sink_positions()
        except Exception:
            return None

    def close(self) -> None:
        self.http.close()
        self.log_ends.close()
        self.sink_positions.close()


def count(positions: dict[int, int] | None, since: dict[int, int]) -> int:
    return sum(max(0, o - since.get(p, 0)) for p, o in (positions or {}).items())


# -- load processes -----------------------------------------------------------------------------


@dataclass
class Load:
    """One bench/load_gateway.py process and what it last said."""

    proc: subprocess.Popen
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, settings: Settings, token: str, *args: str) -> Load:
        """Started, its request bodies built, waiting for go()."""
        cmd = [sys.executable, str(LOAD), "--url", settings.api_url, "--warmup", "0", "--wait-go", *args]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ | {"NHDP_API_TOKEN": token},
        )
        load = cls(proc)
        threading.Thread(target=load._read, daemon=True).start()
        return load

    def go(self) -> None:
        if not self.ready.wait(300):
            raise SystemExit(f"load process not ready:\n{self.proc.stderr.read().decode()[-3000:]}")
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = orjson.loads(line)
            if msg["kind"] == "ready":
                self.ready.set()
            elif msg["kind"] == "progress":
                self.progress = msg
            else:
                self.result = msg

    def accepted(self) -> int:
        return (self.result or self.progress).get("accepted", 0)

    def wait(self) -> dict:
        self.proc.wait(timeout=600)
        if self.proc.returncode != 0 or self.result is None:
            raise SystemExit(
                f"load process failed ({self.proc.returncode}):\n{self.proc.stderr.read().decode()[-3000:]}"
            )
        return self.result


def progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


# -- 1. throughput ----------------------------------------------------------------------------


def throughput(settings: Settings, args, producer: str, watcher: Watcher, events: int, profile_to=None) -> dict:
    per_client = -(-events // args.clients)
    max_load = ("--mode", "max", "--seconds", "3600", "--batch", str(args.batch), "--connections", "1")
    loads = [Load.start(settings, producer, *max_load, "--events", str(per_client)) for _ in range(args.clients)]
    start_ends = watcher.ends()
    meter = platform_meter(settings)
    client_meter = CpuMeter({f"load client {i + 1}": ld.proc.pid for i, ld in enumerate(loads)}).start()
    profilers = profile(settings, profile_to) if profile_to else []
    ch_before = clickhouse_work(settings)
    machine_before = psutil.cpu_times()
    t0 = time.perf_counter()
    for ld in loads:
        ld.go()
    total = per_client * args.clients
    t_posted = t_summary = t_analytics = None
    timeline: list[tuple[float, int, int, int]] = []  # (s, accepted, in the summary, in the analytics)
    with progress_bars() as bars:
        posted = bars.add_task("accepted by the gateway", total=total, info="")
        in_summary = bars.add_task("in the national summary", total=total, info="")
        in_analytics = bars.add_task("in the analytics", total=total, info="")
        end = None
        while t_summary is None or t_analytics is None:
            accepted = sum(ld.accepted() for ld in loads)
            now = time.perf_counter() - t0
            bars.update(posted, completed=accepted, info=f"{accepted / max(now, 1e-9):,.0f}/s")
            if t_posted is None and all(ld.proc.poll() is not None for ld in loads):
                t_posted = time.perf_counter()
                end = watcher.ends()
            reflected = []
            for task, fetch, done in ((in_summary, watcher.summary, "s"), (in_analytics, watcher.analytics, "a")):
                positions = fetch()
                reflected.append(count(positions, start_ends))
                bars.update(task, completed=reflected[-1])
                if end is not None and positions is not None and reached(positions, end):
                    if done == "s" and t_summary is None:
                        t_summary = time.perf_counter()
                    if done == "a" and t_analytics is None:
                        t_analytics = time.perf_counter()
            timeline.append((round(now, 2), accepted, *reflected))
            if time.perf_counter() - t0 > args.timeout:
                raise SystemExit(f"not all events reflected after {args.timeout:.0f} s")
            time.sleep(0.25)
    cpu = by_part(meter.stop())
    machine_cpu = psutil.cpu_times()
    ch_after = clickhouse_work(settings)
    ch_work = (
        {k: ch_after.get(k, 0) - ch_before.get(k, 0) for k in CLICKHOUSE_WORK}
        if ch_before is not None and ch_after is not None
        else None
    )
    clients_cpu = client_meter.stop()
    for proc in profilers:
        proc.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
    for proc in profilers:
        proc.wait(60)
    results = [ld.wait() for ld in loads]
    events = sum(r["accepted"] for r in results)
    in_log = count(end, start_ends)
    if events != in_log or any(r["errors"] or r["duplicates"] or r["rejected"] for r in results):
        console.print(
            f"[red]accepted {events:,}, the log grew by {in_log:,}; answers: {[r['errors'] for r in results]}[/]"
        )
    t_done = max(t_summary, t_analytics)
    return {
        "events": events,
        "clients": args.clients,
        "batch": args.batch,
        "accepted_s": t_posted - t0,
        "summary_s": t_summary - t0,
        "analytics_s": t_analytics - t0,
        "accepted_rate": events / (t_posted - t0),
        "end_to_end_rate": events / (t_done - t0),
        "cpu_s": cpu,
        "clients_cpu_s": sum(clients_cpu.values()),
        "kafka_jit_s": meter.jit_s(),
        "postgres_s": meter.postgres_s(),
        "backoffs": sum(r.get("backoffs", 0) for r in results),
        "request_p99_ms": percentile([x for r in results for x in r["latency_ms"]], 0.99),
        "ends": end,
        "timeline": timeline,
        "clickhouse_work": ch_work,
        # the hypervisor's share: time this VM's cores were runnable but ran someone else
        "steal_s": getattr(machine_cpu, "steal", 0.0) - getattr(machine_before, "steal", 0.0),
        "idle_s": machine_cpu.idle - machine_before.idle,
    }


def profile(settings: Settings, folder: Path) -> list[subprocess.Popen]:
    """py-spy on each Python service (the sink with its decoders) for the throughput phase, sampling
    only threads that hold the GIL (Python at work, not waiting): collapsed
    stacks in folder/NAME.txt (`py-spy record --format raw`), for flame graphs or a top-N."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    procs = []
    for name, pid in platform_processes(settings).items():
        if name in ("api", "sink", "registry") or name.startswith("worker"):
            cmd = [str(spy), "record", "--pid", str(pid), "--rate", "97", "--format", "raw", "--nonblocking", "--gil"]
            cmd += ["--subprocesses"] if name == "sink" else []
            cmd += ["--output", str(folder / f"{name}.txt")]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


# -- 2. the read+decode ceiling ---------------------------------------------------------------


def ceiling_child(upto: dict[int, int]) -> None:
    """In a process of its own: read the log up to `upto` and Avro-decode every value, nothing more."""
    from schemas.codec import Codec
    from schemas.log import LogPrefix
    from schemas.registry_client import RegistryClient

    settings = Settings().as_service("replay")
    codec = Codec(RegistryClient.for_settings(settings))
    n = bad = 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    with LogPrefix(settings, upto={p: o - 1 for p, o in upto.items()}) as prefix:
        for chunk in prefix:
            for result in codec.decode_many_lenient([r.value for r in chunk]):
                n += 1
                bad += isinstance(result, Exception)
    seconds = time.perf_counter() - t0
    print(
        orjson.dumps(
            {"events": n, "undecodable": bad, "seconds": seconds, "cpu_s": time.process_time() - cpu0}
        ).decode()
    )


def ceiling(settings: Settings, upto: dict[int, int]) -> dict:
    with console.status("read+decode ceiling: one plain consumer reads and Avro-decodes the same log"):
        out = subprocess.run(
            [sys.executable, __file__, "--ceiling-child", orjson.dumps(upto, option=orjson.OPT_NON_STR_KEYS).decode()],
            env=os.environ | settings.as_env(),
            capture_output=True,
            check=False,
        )
    if out.returncode != 0:
        raise SystemExit(f"ceiling process failed:\n{out.stderr.decode()[-3000:]}")
    result = orjson.loads(out.stdout.splitlines()[-1])
    result["rate"] = result["events"] / result["seconds"]
    return result


# -- 3. freshness -----------------------------------------------------------------------------


def freshness(settings: Settings, args, producer: str, watcher: Watcher) -> dict:
    """Samples (t, log end), (t, summary positions), (t, analytics positions) while a paced load runs."""
    ends: list[tuple[float, dict[int, int]]] = []
    missed: list[str] = []  # log-end samples Kafka did not answer
    seen: dict[str, list[tuple[float, dict[int, int]]]] = {"summary": [], "analytics": []}
    stop = threading.Event()

    def sampler(name: str, fetch) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            positions = fetch()
            if positions is not None:
                seen[name].append((t, positions))
            time.sleep(max(0.0, SAMPLE_S - (time.perf_counter() - t)))

    threads = [
        threading.Thread(target=sampler, args=("summary", watcher.summary), daemon=True),
        threading.Thread(target=sampler, args=("analytics", watcher.analytics), daemon=True),
    ]
    for t in threads:
        t.start()
    paced = ("--mode", "paced", "--rate", str(args.fresh_rate), "--batch", "100", "--connections", "8")
    load = Load.start(settings, producer, *paced, "--seconds", str(args.fresh_seconds))
    load.go()
    t0 = time.perf_counter()
    with progress_bars() as bars:
        task = bars.add_task(f"freshness at {args.fresh_rate:,}/s", total=int(args.fresh_seconds), info="")
        while load.proc.poll() is None:
            t = time.perf_counter()
            try:
                ends.append((t, watcher.ends()))
            except KafkaError as exc:  # a stalled broker must not lose the run: the gap is reported
                missed.append(f"{t - t0:.1f} s: {type(exc).__name__}")
            bars.update(task, completed=min(t - t0, args.fresh_seconds), info=f"{load.accepted():,} accepted")
            time.sleep(max(0.0, SAMPLE_S - (time.perf_counter() - t)))
    result = load.wait()
    final = watcher.ends()
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline and not all(
        s and reached(s[-1][1], final) for s in seen.values()
    ):  # let the last samples be reflected
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    out = {"rate": args.fresh_rate, "accepted": result["accepted"], "seconds": args.fresh_seconds, "missed": missed}
    for name, samples in seen.items():
        lags, k = [], 0
        for t, end in ends:
            while k < len(samples) and not reached(samples[k][1], end):
                k += 1
            if k == len(samples):
                break
            lags.append(max(0.0, samples[k][0] - t))
        out[name] = {"p50_s": percentile(lags, 0.5), "p99_s": percentile(lags, 0.99), "max_s": max(lags or [0])}
    out["request_p99_ms"] = percentile(result["latency_ms"], 0.99)
    return out


# -- report -----------------------------------------------------------------------------------


ORDER = [
    "api", "worker", "sink", "sink (children)", "kafka", "postgres", "clickhouse", "zookeeper", "registry", "supervisor"
]  # fmt: skip
LABELS = {"api": "API (gateway + queries)", "sink (children)": "sink decoders"}


def report(run: dict) -> None:
    tp, ev = run["throughput"], run["throughput"]["events"]
    table = Table(title=f"CPU per event, whole platform — {run['label']}")
    table.add_column("process")
    table.add_column("CPU s", justify="right")
    table.add_column("µs / event", justify="right")
    table.add_column("share", justify="right")
    total = sum(tp["cpu_s"].values())
    for name in sorted(tp["cpu_s"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        s = tp["cpu_s"][name]
        table.add_row(LABELS.get(name, name), f"{s:.1f}", f"{s / ev * 1e6:.0f}", f"{s / total:.0%}")
    table.add_row("[bold]total[/]", f"{total:.1f}", f"[bold]{total / ev * 1e6:.0f}[/]", "100%")
    table.add_row("load clients (outside)", f"{tp['clients_cpu_s']:.1f}", f"{tp['clients_cpu_s'] / ev * 1e6:.0f}", "")
    console.print(table)
    ceil = run["ceiling"]
    fr = run.get("freshness")
    lines = [
        f"events: {ev:,} in {tp['clients']} clients × {tp['batch']:,}-event requests "
        f"(request p99 {tp['request_p99_ms']:.0f} ms, {tp['backoffs']} back-off answers)",
        f"accepted: [bold]{tp['accepted_rate']:,.0f} events/s[/] ({tp['accepted_s']:.1f} s)",
        f"end to end: [bold]{tp['end_to_end_rate']:,.0f} events/s[/] (summary after {tp['summary_s']:.1f} s, "
        f"analytics after {tp['analytics_s']:.1f} s); target {TARGET_EVENTS_S:,}",
        f"read+decode ceiling: {ceil['rate']:,.0f} events/s ({ceil['cpu_s'] / max(ceil['events'], 1) * 1e6:.0f} µs CPU "
        f"an event); the platform ran at [bold]{tp['end_to_end_rate'] / ceil['rate']:.2f}[/] of it",
        f"CPU: [bold]{total / ev * 1e6:.0f} µs per event[/] in all (target ≤ {TARGET_CPU_US})",
    ]
    if tp.get("kafka_jit_s"):
        lines.append(
            f"of Kafka's CPU, its JVM's JIT compiler: {tp['kafka_jit_s'] / ev * 1e6:.0f} µs an event "
            "(compiling the broker's code, a cost of a young JVM: see --warmup-events)"
        )
    if "deferred_cpu_s" in tp:
        deferred = sum(tp["deferred_cpu_s"].values())
        parts = sorted(tp["deferred_cpu_s"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(
            f"left for after the window (rollups after the lull, merges): {deferred / ev * 1e6:.0f} µs an event more, "
            f"done {tp['deferred_s']:.0f} s later ("
            + ", ".join(f"{LABELS.get(n, n)} {s / ev * 1e6:.0f}" for n, s in parts)
            + ")"
        )
    if tp.get("postgres_s"):
        parts = sorted(tp["postgres_s"].items(), key=lambda kv: -kv[1])
        lines.append("PostgreSQL, µs an event: " + ", ".join(f"{role} {s / ev * 1e6:.1f}" for role, s in parts))
    if "steal_s" in tp:
        window = max(tp["summary_s"], tp["analytics_s"]) * (os.cpu_count() or 1)
        lines.append(
            f"the machine's cores in that window: {tp['idle_s'] / window:.0%} idle, "
            f"{tp['steal_s'] / window:.1%} stolen by the hypervisor"
        )
    if tp.get("clickhouse_work"):
        w = tp["clickhouse_work"]
        lines.append(
            f"ClickHouse, per event: {w['InsertedRows'] / ev:.1f} rows inserted ({w['InsertQuery']:,} inserts), "
            f"{w['MergedRows'] / ev:.1f} merged ({w['Merge']:,} merges), {w['SelectedRows'] / ev:.1f} read "
            f"({w['SelectQuery']:,} selects); its queries' CPU {(w['UserTimeMicroseconds'] + w['SystemTimeMicroseconds']) / ev:.0f} µs"
        )
    if fr:
        lines.append(
            f"freshness at {fr['rate']:,}/s offered ({fr['accepted']:,} accepted): summary p50 "
            f"{fr['summary']['p50_s']:.2f} s, [bold]p99 {fr['summary']['p99_s']:.2f} s[/]; analytics p50 "
            f"{fr['analytics']['p50_s']:.2f} s, p99 {fr['analytics']['p99_s']:.2f} s (target p99 ≤ {TARGET_FRESH_P99_S:.0f} s)"
        )
        if fr.get("missed"):
            lines.append(f"[red]log-end samples Kafka did not answer: {', '.join(fr['missed'])}[/]")
    lines.append(f"machine: {run['machine']}")
    for line in lines:
        console.print(line)


def median_run(runs: list[dict]) -> dict:
    """The run of median total CPU an event, with every run's figures beside it (`series`).

    On this VM the same code measures ±10% apart from one run to the next, every
    process at once and with no steal, so one run is not a figure."""

    def cpu_us(r: dict) -> float:
        return sum(r["throughput"]["cpu_s"].values()) / r["throughput"]["events"] * 1e6

    series = [
        {
            "label": r["label"],
            "cpu_us": cpu_us(r),
            "end_to_end_rate": r["throughput"]["end_to_end_rate"],
            "accepted_rate": r["throughput"]["accepted_rate"],
            "ceiling_rate": r["ceiling"]["rate"],
            **({"analytics_p99_s": r["freshness"]["analytics"]["p99_s"]} if "freshness" in r else {}),
            **({"summary_p99_s": r["freshness"]["summary"]["p99_s"]} if "freshness" in r else {}),
        }
        for r in runs
    ]
    table = Table(title=f"{len(runs)} runs, each on a fresh stack")
    for col in ("run", "CPU µs / event", "end to end /s", "accepted /s", "summary p99", "analytics p99"):
        table.add_column(col, justify="right")
    for i, x in enumerate(series, 1):
        fresh = [f"{x[k]:.2f} s" if k in x else "" for k in ("summary_p99_s", "analytics_p99_s")]
        table.add_row(
            str(i), f"{x['cpu_us']:.0f}", f"{x['end_to_end_rate']:,.0f}", f"{x['accepted_rate']:,.0f}", *fresh
        )
    median = {k: statistics.median(x[k] for x in series) for k in ("cpu_us", "end_to_end_rate", "accepted_rate")}
    table.add_row(
        "median", f"{median['cpu_us']:.0f}", f"{median['end_to_end_rate']:,.0f}", f"{median['accepted_rate']:,.0f}"
    )
    console.print(table)
    chosen = dict(sorted(runs, key=cpu_us)[(len(runs) - 1) // 2])
    chosen["series"], chosen["median"] = series, median
    return chosen


def chart(runs: list[dict], path: Path) -> None:
    """Stacked bars: CPU µs per event by process, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(
        {n for r in runs for n in r["throughput"]["cpu_s"]}, key=lambda n: ORDER.index(n) if n in ORDER else 99
    )
    fig, ax = plt.subplots(figsize=(5.5 + 1.6 * len(runs), 5.2))
    bottoms = [0.0] * len(runs)
    labels = [f"{r['label']}\n{r['throughput']['end_to_end_rate']:,.0f} ev/s e2e" for r in runs]
    for name in names:
        heights = [r["throughput"]["cpu_s"].get(name, 0.0) / r["throughput"]["events"] * 1e6 for r in runs]
        ax.bar(labels, heights, bottom=bottoms, label=LABELS.get(name, name), width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, b in enumerate(bottoms):
        ax.text(x, b, f"{b:.0f} µs", ha="center", va="bottom")
    ax.axhline(TARGET_CPU_US, color="black", linestyle="--", linewidth=1, label=f"target {TARGET_CPU_US} µs")
    ax.set_ylabel("CPU µs per event (all processes)")
    ax.set_title("NHDP whole platform: CPU per event by process")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    console.print(f"chart: {path}")


# -- main -------------------------------------------------------------------------------------


def bench(settings: Settings, args) -> dict:
    console.print(f"[bold]NHDP whole-platform benchmark[/]: {settings.api_url}; machine: {machine()}")
    producer = issue_token(settings, "bench-platform", "producer", ttl="2h", source="bench-load", provinces=["*"]).token
    national = issue_token(settings, "bench-platform-watch", "national", ttl="2h").token
    watcher = Watcher(settings, national)
    try:
        if args.warmup_events:
            # The JVM compiles Kafka's hot paths in its first minute (its compiler threads were half
            # of the broker's CPU then), and every cache is cold: measure the platform warm.
            console.print(f"warm-up: {args.warmup_events:,} events, not measured")
            throughput(settings, args, producer, watcher, args.warmup_events)
            waited, _ = settle(settings)
            console.print(f"warm-up's deferred work done (the platform idle) after {waited:.1f} s")
        run = {"label": args.label, "machine": machine()}
        run["throughput"] = throughput(settings, args, producer, watcher, args.events, args.profile)
        # What the events leave for later (the sink's rollups after the lull, ClickHouse's
        # merges), measured apart: the window above ends when the answers show every event.
        run["throughput"]["deferred_s"], run["throughput"]["deferred_cpu_s"] = settle(settings)
        run["ceiling"] = ceiling(settings, run["throughput"]["ends"])
        if args.fresh_seconds > 0:
            run["freshness"] = freshness(settings, args, producer, watcher)
        run["machine_after"] = machine()
    finally:
        watcher.close()
    report(run)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--existing", action="store_true", help="the stack of the NHDP_* settings, not a private one")
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--warmup-events", type=int, default=100_000, help="posted and reflected before measuring")
    ap.add_argument("--clients", type=int, default=4, help="load processes, one connection each")
    ap.add_argument("--batch", type=int, default=1000, help="events per request")
    ap.add_argument("--fresh-rate", type=int, default=5000, help="freshness phase: events/s offered")
    ap.add_argument("--fresh-seconds", type=float, default=30.0, help="0 skips the freshness phase")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--label", default=time.strftime("%Y-%m-%d %H:%M"))
    ap.add_argument("--save", type=Path, help="write the run as JSON")
    ap.add_argument("--compare", type=Path, nargs="*", default=[], help="earlier runs (JSON) to chart beside this one")
    ap.add_argument("--chart", type=Path, help="stacked bar chart (PNG) of CPU µs per event by process")
    ap.add_argument("--profile", type=Path, help="py-spy the Python services in the throughput phase, into this folder")
    ap.add_argument(
        "--workers", type=int, default=1, help="stream workers (the stack runs 1; the rest are started here)"
    )
    ap.add_argument("--kafka-nodes", type=int, default=1, help="3: the stack on a 3-node Kafka cluster")
    ap.add_argument("--api-processes", type=int, default=1, help="API processes sharing the port")
    ap.add_argument(
        "--clickhouse-shards", type=int, default=0, help="2: ClickHouse as 2 shards × 2 replicas with ZooKeeper"
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole run, each on a fresh stack; report every one and the median",
    )
    ap.add_argument("--pause", type=float, default=30.0, help="with --runs: idle seconds before each run")
    ap.add_argument("--ceiling-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ceiling_child:
        ceiling_child({int(p): o for p, o in orjson.loads(args.ceiling_child).items()})
        return 0
    shape = {
        "kafka_nodes": args.kafka_nodes,
        "api_processes": args.api_processes,
        "clickhouse_cluster_shards": args.clickhouse_shards,
    }
    runs = []
    for i in range(args.runs):
        if args.runs > 1:
            console.print(f"[bold]run {i + 1} of {args.runs}[/]: {args.pause:.0f} s idle first")
            time.sleep(args.pause)  # the last run's stack has stopped; let its files and caches settle
        with own_stack(**shape) if not args.existing else contextlib.nullcontext(Settings()) as settings:
            extra = extra_workers(settings, args.workers)
            try:
                for svc in extra:
                    svc.start(settings.start_timeout_s)
                runs.append(bench(settings, args))
            finally:
                for svc in extra:
                    svc.stop()
    run = median_run(runs) if len(runs) > 1 else runs[0]
    run["throughput"].pop("ends")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    if args.chart:
        chart([orjson.loads(p.read_bytes()) for p in args.compare] + [run], args.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

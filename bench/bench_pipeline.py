"""End-to-end stream-worker throughput and freshness: Kafka → PostgreSQL projections.

    .venv/bin/python bench/bench_pipeline.py                        # a private stack: temp folder, free ports
    .venv/bin/python bench/bench_pipeline.py --events 300000 --freshness-seconds 30
    .venv/bin/python bench/bench_pipeline.py --settings-from-env    # the stack named by NHDP_* (appends to its log!)

1. Throughput, sustained and caught up. For 1 and then 2 workers: with every
   worker stopped, --events new events (the simulator's national mix) are
   pre-loaded into health.events; then the workers start and the clock runs
   from the first worker holding partitions until the tracking record says
   the backlog is applied (lag 0). CPU seconds of the workers, PostgreSQL and
   Kafka are sampled, to say where the time goes.
2. The ceiling: a plain consumer (kafka-python, the codec's decode_many) that
   only reads and Avro-decodes the same topic; our throughput is reported as a
   share of it.
3. Freshness: ~--freshness-rate events/s POSTed to the gateway in small
   requests for --freshness-seconds; the latency of a request is from the
   moment its POST returns (accepted = durable in Kafka) until
   /v1/national/summary, polled every --poll-ms, shows its increment.

Targets (issue 5): ≥ 20,000 events/s sustained; freshness p99 ≤ 2 s. Loopback
only; every phase has a deadline. ClickHouse's sink, if the stack runs one,
is stopped during the throughput phases so that only the projection pipeline
is measured (--keep-sink to leave it on).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.settings import Settings
from projections.postgres import tracking
from schemas import log as kafka_log
from schemas.api_auth import issue_token

console = Console()
TARGET_RATE = 20_000
TARGET_FRESHNESS_P99 = 2.0
# Fresh event_ids on every run, even against a stack that holds an earlier run's events.
SEED = int(time.time()) % 1_000_000 * 100


# -- the stack ------------------------------------------------------------------------


@contextlib.contextmanager
def bench_stack(from_env: bool, label: str = "bench") -> Iterator[Settings]:
    """The stack to measure: NHDP_* settings, or a private one in a temp folder on free ports (wiped after)."""
    from nhdp import stack

    if from_env:
        from infra.settings import get_settings

        yield get_settings()
        return
    console.print("starting a private stack (temporary folder, free ports; stopped and wiped afterwards)")
    with stack.private(label) as settings:
        yield settings


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({usable} usable), load average {load} at the start, "
        f"Python {platform.python_version()}, {platform.machine()}"
    )


def sink_service(settings: Settings):
    from nhdp import stack

    factory = getattr(stack, "sink_service", None)
    return factory(settings) if factory else None


# -- data --------------------------------------------------------------------------------


def simulated(n: int, seed: int, *, drop_voids: bool = False) -> list[dict]:
    """About n events of the national scenario (≈ 6.4 events per dose), JSON form."""
    from producers.simulator import simulate

    sim = simulate("national", seed=seed, days=1, daily_doses=max(100, round(n / 6.4)))
    out = []
    for batch in sim.batches(20_000):
        out.extend(e for e in batch if not (drop_voids and e["event_type"] == "RecordVoided"))
        if len(out) >= n:
            break
    return out[:n]


def encode(settings: Settings, events: list[dict], progress: Progress | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) as the SDK writes them: validated, pseudonymised, Confluent wire format."""
    from producers.pseudonym import Pseudonymiser, edge_record
    from schemas.codec import Codec
    from schemas.models import validate_event
    from schemas.registry_client import RegistryClient
    from schemas.topics import partition_key

    codec = Codec(RegistryClient.for_settings(settings))
    codec.register_catalog()
    pseudonymiser = Pseudonymiser.from_settings(settings)
    task = progress.add_task("encode (validate, pseudonymise, Avro)", total=len(events)) if progress else None
    out: list[tuple[bytes, bytes]] = []
    for i in range(0, len(events), 10_000):
        records = [edge_record(validate_event(e)[0], pseudonymiser) for e in events[i : i + 10_000]]
        values = codec.encode_many([(r["event_type"], r) for r in records])
        out.extend((partition_key(r), v) for r, v in zip(records, values))
        if progress:
            progress.update(task, advance=len(records))
    return out


def preload(settings: Settings, messages: list[tuple[bytes, bytes]], progress: Progress | None = None) -> None:
    """Produce into health.events (librdkafka; murmur2 = the Java/kafka-python partitioner the SDK uses)."""
    from confluent_kafka import Producer

    from schemas.topics import TOPIC_EVENTS

    failed: list[str] = []
    producer = Producer(
        {
            **settings.librdkafka_config(),
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    task = progress.add_task("pre-load into health.events", total=len(messages)) if progress else None
    headers = [("source", b"bench-pipeline")]

    def on_delivery(err, msg):
        if err is not None:
            failed.append(str(err))

    for i, (key, value) in enumerate(messages):
        while True:
            try:
                producer.produce(TOPIC_EVENTS, value=value, key=key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
            if progress:
                progress.update(task, completed=i)
    producer.flush(120)
    if progress:
        progress.update(task, completed=len(messages))
    if failed:
        raise RuntimeError(f"{len(failed)} messages not acknowledged: {failed[:3]}")


# -- measuring ---------------------------------------------------------------------------


def log_end(settings: Settings) -> int:
    """Messages in health.events now, over all partitions."""
    return sum(kafka_log.log_end(settings).values())


def applied(conn) -> int:
    """Messages of health.events the live projections have applied (the tracking record)."""
    try:
        return sum(tracking.next_offsets(conn).values())
    except Exception:  # the schema is not there yet
        conn.rollback()
        return 0


def wait_caught_up(settings: Settings, progress: Progress, timeout_s: float) -> None:
    """Until the live projections' tracking record reaches the end of health.events."""
    import psycopg

    target = log_end(settings)
    task = progress.add_task("projections catch up", total=target)
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        while (done := applied(conn)) < target:
            progress.update(task, completed=done)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target - done:,} events still not applied after {timeout_s:.0f}s")
            time.sleep(0.2)
    progress.update(task, completed=target)


def cpu_of(pids: list[int], with_children: bool = False) -> float:
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc] + (proc.children(recursive=True) if with_children else [])
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return total


class CpuMeter:
    """CPU seconds used by the workers, PostgreSQL (all backends) and Kafka between start() and stop()."""

    def __init__(self, settings: Settings):
        from infra import kafka, postgres

        self.settings = settings
        self.pg = postgres.service(settings).pid() if settings.local_postgres else None
        self.kafka = kafka.service(settings).pid()
        self.totals: dict[str, float] = {}

    def sample(self, worker_pids: list[int]) -> dict[str, float]:
        # Backends come and go; the postmaster's children at this moment are close enough for a batch job.
        return {
            "workers": cpu_of(worker_pids),
            "postgres": cpu_of([self.pg], with_children=True) if self.pg else 0.0,
            "kafka": cpu_of([self.kafka]) if self.kafka else 0.0,
        }


def run_workers(settings: Settings, n_workers: int, backlog: int, progress: Progress, timeout_s: float) -> dict:
    """Start n workers on a pre-loaded backlog; time until the tracking record has applied all of it."""
    import psycopg

    from nhdp.stack import worker_service

    services = [worker_service(settings)] + [worker_service(settings, f"worker{i}") for i in range(2, n_workers + 1)]
    target = log_end(settings)
    meter = CpuMeter(settings)
    ready: list[float] = []
    errors: list[BaseException] = []

    startup_cpu: list[float] = []

    def start(svc) -> None:
        try:
            pid, _ = svc.start(settings.start_timeout_s)
            ready.append(time.perf_counter())
            startup_cpu.append(cpu_of([pid]))  # imports and joining the group: not the pipeline's cost
        except BaseException as exc:
            errors.append(exc)

    task = progress.add_task(f"{n_workers} worker(s): apply the backlog", total=backlog)
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        before = applied(conn)
        cpu0 = meter.sample([])
        t0 = time.perf_counter()
        threads = [threading.Thread(target=start, args=(svc,)) for svc in services]
        for t in threads:
            t.start()
        samples: list[tuple[float, int]] = []
        deadline = t0 + timeout_s
        while True:
            done = applied(conn)
            now = time.perf_counter()
            samples.append((now, done))
            progress.update(task, completed=min(backlog, done - before))
            if done >= target:
                break
            if errors:
                raise errors[0]
            if now > deadline:
                raise TimeoutError(f"{target - done:,} events still not applied after {timeout_s:.0f}s")
            time.sleep(0.1)
        t_done = time.perf_counter()
        for t in threads:
            t.join()
        pids = [svc.pid() for svc in services]
        cpu1 = meter.sample([p for p in pids if p])
    first_ready = min(ready) if ready else t0
    first_applied = next((t for t, d in samples if d > before), t_done)
    seconds = t_done - first_ready
    return {
        "workers": n_workers,
        "events": target - before,
        "seconds": seconds,
        "rate": (target - before) / seconds,
        "start_seconds": first_ready - t0,
        "first_batch_seconds": first_applied - first_ready,
        "wall_seconds": t_done - t0,
        # The workers' CPU is read at the end (their own processes); the services' as a difference.
        "cpu": {
            "workers": cpu1["workers"] - sum(startup_cpu),
            "postgres": cpu1["postgres"] - cpu0["postgres"],
            "kafka": cpu1["kafka"] - cpu0["kafka"],
        },
    }


def stop_workers(settings: Settings) -> None:
    from nhdp.stack import worker_service

    for name in ("worker", "worker2", "worker3", "worker4"):
        worker_service(settings, name).stop()


def plain_consumer(settings: Settings, limit: int, progress: Progress, timeout_s: float) -> dict:
    """Read + Avro-decode health.events from offset 0 with kafka-python: the ceiling for any Python consumer."""
    from kafka import KafkaConsumer, TopicPartition

    from schemas.codec import Codec
    from schemas.registry_client import RegistryClient
    from schemas.topics import TOPIC_EVENTS

    codec = Codec(RegistryClient.for_settings(settings))
    consumer = KafkaConsumer(
        **settings.kafka_python_config(),
        enable_auto_commit=False,
        max_poll_records=10_000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        tps = [TopicPartition(TOPIC_EVENTS, p) for p in sorted(consumer.partitions_for_topic(TOPIC_EVENTS))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        total = min(limit, sum(ends.values()))
        task = progress.add_task("plain consumer: read + decode (the ceiling)", total=total)
        n = bad = 0
        t0 = time.perf_counter()
        while n < total:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"plain consumer read {n:,} of {total:,} in {timeout_s:.0f}s")
            for records in consumer.poll(timeout_ms=1000, max_records=10_000).values():
                decoded = codec.decode_many_lenient([r.value for r in records])
                bad += sum(1 for d in decoded if isinstance(d, Exception))
                n += len(records)
            progress.update(task, completed=min(n, total))
        seconds = time.perf_counter() - t0
    finally:
        consumer.close()
    return {"events": n, "seconds": seconds, "rate": n / seconds, "undecodable": bad}


def freshness(settings: Settings, rate: int, seconds: float, poll_ms: int, batch: int, progress: Progress) -> dict:
    """POST events at `rate`/s; per request, from the POST's return to its increment showing in the summary."""
    import httpx

    COUNTED = {
        "VaccinationRegistered": "registrations",
        "HealthDeclarationSubmitted": "declarations",
        "DoseAdministered": "doses_administered",
    }

    def counted(summary: dict) -> int:
        return sum(summary[f] for f in COUNTED.values())

    events = simulated(int(rate * seconds) + batch, seed=SEED + 99, drop_voids=True)
    events = [e | {"source": "bench-pipeline"} for e in events]  # one producer, one token (DESIGN §8)
    requests = [events[i : i + batch] for i in range(0, len(events), batch)]
    producer = issue_token(settings, "bench-pipeline", "producer", source="bench-pipeline", provinces=["*"]).token
    national = {"authorization": f"Bearer {issue_token(settings, 'bench-pipeline', 'national').token}"}
    api = httpx.Client(base_url=settings.api_url, timeout=30, headers=national)
    base = counted(api.get("/v1/national/summary").json())
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=settings.api_url, timeout=30, headers=national) as client:
            while not stop.is_set():
                value = counted(client.get("/v1/national/summary").json())
                samples.append((time.perf_counter(), value))  # when the answer arrived: an upper bound
                time.sleep(poll_ms / 1000)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    interval = batch / rate
    accepted: list[tuple[float, int]] = []  # (POST returned, cumulative counted figure expected)
    cumulative = base
    task = progress.add_task(f"freshness: POST {batch} events every {interval * 1000:.0f} ms", total=len(requests))
    t0 = next_at = time.perf_counter()
    for body in requests:
        if time.perf_counter() - t0 > seconds:
            break
        response = api.post("/v1/events", json=body, headers={"authorization": f"Bearer {producer}"})
        response.raise_for_status()
        answer = response.json()
        if answer.get("rejected") or answer.get("duplicates"):
            raise RuntimeError(f"gateway did not accept every event: {str(answer)[:300]}")
        cumulative += sum(1 for e in body if e["event_type"] in COUNTED)
        accepted.append((time.perf_counter(), cumulative))
        progress.advance(task)
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    offered_seconds = time.perf_counter() - t0
    deadline = time.perf_counter() + 60
    while (not samples or samples[-1][1] < cumulative) and time.perf_counter() < deadline:
        time.sleep(0.05)
    stop.set()
    poller.join()
    api.close()
    latencies, unseen = [], 0
    i = 0
    for t_accept, target in accepted:  # targets rise; the polled figure never falls (no voids are posted)
        while i < len(samples) and samples[i][1] < target:
            i += 1
        if i == len(samples):
            unseen += 1
            continue
        latencies.append(max(0.0, samples[i][0] - t_accept))
    latencies.sort()
    n_events = sum(len(b) for b in requests[: len(accepted)])
    return {
        "requests": len(accepted),
        "events": n_events,
        "offered_rate": n_events / offered_seconds,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "max": latencies[-1] if latencies else float("nan"),
        "unseen": unseen,
        "polls": len(samples),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="backlog per throughput phase")
    ap.add_argument("--workers", default="1,2", help="worker counts to measure, in order")
    ap.add_argument("--freshness-rate", type=int, default=2_000, help="events/s offered to the gateway")
    ap.add_argument("--freshness-seconds", type=float, default=30.0)
    ap.add_argument("--freshness-batch", type=int, default=100, help="events per POST")
    ap.add_argument("--poll-ms", type=int, default=20, help="pause between summary polls")
    ap.add_argument("--timeout", type=float, default=900.0, help="deadline of each phase, seconds")
    ap.add_argument(
        "--settings-from-env",
        action="store_true",
        help="measure the stack named by NHDP_* instead of a private one (appends events to its log)",
    )
    ap.add_argument("--keep-sink", action="store_true", help="leave the ClickHouse sink running meanwhile")
    ap.add_argument("--skip-freshness", action="store_true")
    args = ap.parse_args(argv)

    console.print(f"[bold]bench_pipeline[/]: {machine()}")
    results: list[dict] = []
    with bench_stack(args.settings_from_env, "pipeline") as settings:
        sink = sink_service(settings)
        if sink is not None and not args.keep_sink:
            sink.stop()
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        with progress:
            for k, n_workers in enumerate(int(w) for w in args.workers.split(",")):
                stop_workers(settings)
                events = simulated(args.events, seed=SEED + k)
                preload(settings, encode(settings, events, progress), progress)
                results.append(run_workers(settings, n_workers, len(events), progress, args.timeout))
                r = results[-1]
                progress.console.print(
                    f"{n_workers} worker(s): {r['events']:,} events in {r['seconds']:.1f}s = "
                    f"[bold]{r['rate']:,.0f} events/s[/] (start-up {r['start_seconds']:.1f}s not counted)"
                )
            ceiling = plain_consumer(settings, results[0]["events"], progress, args.timeout)
            progress.console.print(
                f"plain consumer: {ceiling['events']:,} in {ceiling['seconds']:.1f}s = {ceiling['rate']:,.0f} events/s"
            )
            stop_workers(settings)
            from nhdp.stack import worker_service

            worker_service(settings).start(settings.start_timeout_s)
            if sink is not None and not args.keep_sink:
                sink.start(settings.start_timeout_s)  # the stack as it runs normally, for freshness
            fresh = None
            if not args.skip_freshness:
                fresh = freshness(
                    settings, args.freshness_rate, args.freshness_seconds, args.poll_ms, args.freshness_batch, progress
                )

    table = Table(title=f"Kafka → PostgreSQL projections ({machine()})")
    columns = (
        "measurement",
        "events",
        "seconds",
        "events/s",
        "vs ceiling",
        "CPU s per 100k: worker / postgres / kafka",
        "target",
    )
    for col in columns:
        table.add_column(col, justify="right" if col not in ("measurement", "target") else "left")
    for r in results:
        cpu = r["cpu"]
        per = 100_000 / r["events"]
        ok = "[green]met[/]" if r["rate"] >= TARGET_RATE else "[red]missed[/]"
        table.add_row(
            f"{r['workers']} worker(s), caught up",
            f"{r['events']:,}",
            f"{r['seconds']:.1f}",
            f"{r['rate']:,.0f}",
            f"{r['rate'] / ceiling['rate']:.0%}",
            f"{cpu['workers'] * per:.1f} / {cpu['postgres'] * per:.1f} / {cpu['kafka'] * per:.1f}",
            f"≥ {TARGET_RATE:,}/s {ok}",
        )
    table.add_row(
        "plain consumer (read + decode)",
        f"{ceiling['events']:,}",
        f"{ceiling['seconds']:.1f}",
        f"{ceiling['rate']:,.0f}",
        "100%",
        "",
        "the ceiling",
    )
    console.print(table)
    if fresh:
        ok = "[green]met[/]" if fresh["p99"] <= TARGET_FRESHNESS_P99 else "[red]missed[/]"
        console.print(
            f"freshness at {fresh['offered_rate']:,.0f} events/s offered ({fresh['requests']} POSTs, "
            f"{fresh['events']:,} events, {fresh['polls']} summary polls): "
            f"p50 [bold]{fresh['p50'] * 1000:.0f} ms[/], p99 [bold]{fresh['p99'] * 1000:.0f} ms[/], "
            f"max {fresh['max'] * 1000:.0f} ms; target p99 ≤ {TARGET_FRESHNESS_P99:.0f} s {ok}"
            + (f"; [red]{fresh['unseen']} never seen[/]" if fresh["unseen"] else "")
        )
    console.print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

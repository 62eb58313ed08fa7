"""Producer SDK publish throughput against a real Kafka (acks=all, idempotent, lz4), one process.

    .venv/bin/python bench/bench_sdk.py                        # the stack named by the NHDP_* settings
    .venv/bin/python bench/bench_sdk.py --bootstrap 127.0.0.1:9092 --registry http://127.0.0.1:8081
    .venv/bin/python bench/bench_sdk.py --own-stack            # a private stack: temp folder, free ports

Events: the simulator's national scenario (the real mix of the eight types). Each
row publishes --events of them in calls of --batch, each call waiting for every
acknowledgement, as the gateway and `nhdp simulate` do:

  (a) EventProducer.publish_json     validate + pseudonymise + encode + send + acks
  (b) EventProducer.publish_many     pre-built Avro records: encode + send + acks
  (c) kafka-python KafkaProducer     send() per record with the SDK's config, pre-encoded bytes (the SDK
                                     now hands kafka-python whole batches instead: row (b))
  (d) confluent-kafka Producer       enable.idempotence, acks=all, lz4, the same bytes, keys and headers
  (e) validate + pseudonymise + encode, then confluent-kafka: what (a) would be on librdkafka
  (f) aiokafka send_batch            the same bytes in record batches built by aiokafka's compiled
                                     builder (idempotent, acks=all, lz4); aiokafka is already pinned (Faust)
  (g) as (c), as the SDK was before  kafka-python's own partitioner and its pure-Python CRC-32C
                                     (the two things producers/sdk.py now does differently)

Every row writes to its own fresh topic with as many partitions as health.events
(deleted afterwards unless --keep), so the log of record and the stream worker
are untouched; after each row the topic's end offsets must add up to exactly the
events sent (no loss, no duplicates). Loopback only; bounded by --events.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from infra.settings import Settings

console = Console()


# -- a private stack ----------------------------------------------------------------------------


@contextlib.contextmanager
def own_stack(keep_data: bool = False, **overrides) -> Iterator[Settings]:
    """The whole local stack in a temporary folder on free loopback ports; stopped and wiped after.
    overrides: settings of its shape (kafka_nodes=3, api_processes=2…)."""
    from nhdp import stack

    console.print("starting a private stack (temporary folder, free ports; stopped and wiped afterwards)")
    t0 = time.perf_counter()
    with stack.private("bench", keep_data=keep_data, **overrides) as settings:
        console.print(
            f"private stack up in {time.perf_counter() - t0:.0f}s: Kafka {settings.kafka_bootstrap_servers}, "
            f"registry {settings.registry_url}, API {settings.api_url}"
        )
        yield settings


def machine() -> str:
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{os.cpu_count()} cores ({allowed} usable by this process), {platform.machine()}, "
        f"Python {platform.python_version()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


# -- events -----------------------------------------------------------------------------------


def national_events(n: int, seed: int) -> list[dict[str, Any]]:
    """n events of the national scenario (about 5.2 events per dose; one day is enough)."""
    from producers.simulator import simulate

    sim = simulate("national", seed=seed, days=1, daily_doses=max(1000, n // 5 + 1000))
    events = list(islice(sim.events(), n))
    if len(events) < n:
        raise SystemExit(f"the scenario produced only {len(events):,} events; ask for fewer")
    return events


# -- topics -------------------------------------------------------------------------------------


class Topics:
    def __init__(self, settings: Settings, partitions: int, keep: bool):
        from kafka import KafkaAdminClient

        self.settings, self.partitions, self.keep = settings, partitions, keep
        self.admin = KafkaAdminClient(**settings.kafka_python_config(), client_id="nhdp-bench-sdk")
        self.created: list[str] = []

    def fresh(self, label: str) -> str:
        from kafka.admin import NewTopic

        name = f"bench.sdk.{label}.{uuid.uuid4().hex[:8]}"
        self.admin.create_topics([NewTopic(name, self.partitions, 1)])
        self.created.append(name)
        deadline = time.monotonic() + 30
        while self.total(name) is None:  # metadata propagates
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {name} not visible after 30s")
            time.sleep(0.1)
        return name

    def total(self, topic: str) -> int | None:
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(**self.settings.kafka_python_config(), request_timeout_ms=10_000)
        try:
            parts = c.partitions_for_topic(topic)
            if not parts:
                return None
            return sum(c.end_offsets([TopicPartition(topic, p) for p in parts]).values())
        finally:
            c.close()

    def close(self) -> None:
        if self.created and not self.keep:
            with contextlib.suppress(Exception):
                self.admin.delete_topics(self.created)
        self.admin.close()


# -- the rows -------------------------------------------------------------------------------------


def batches(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def confluent_producer(settings: Settings):
    from confluent_kafka import Producer

    return Producer(
        {
            **settings.librdkafka_config(),
            "client.id": "nhdp-bench-confluent",
            "partitioner": "murmur2_random",  # the Java client's (and the SDK's) choice of partition per key
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 5,
            "batch.size": 512 * 1024,
            "max.in.flight.requests.per.connection": 5,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )


def confluent_publish(
    producer, topic: str, keys: Sequence[bytes], values: Sequence[bytes], headers: Sequence[list[tuple[str, bytes]]]
) -> None:
    """Send one batch and wait for every delivery report, as publish_many does."""
    failed: list[str] = []

    def report(err, msg):
        if err is not None:
            failed.append(str(err))

    produce, poll = producer.produce, producer.poll
    for k, v, h in zip(keys, values, headers):
        while True:
            try:
                produce(topic, v, k, headers=h, on_delivery=report)
                break
            except BufferError:
                poll(0.05)
    left = producer.flush(60)
    if left or failed:
        raise RuntimeError(f"confluent-kafka: {left} undelivered, {len(failed)} failed: {failed[:3]}")


class AioBatches:
    """aiokafka's producer on its own event-loop thread; publish() sends one call's events as
    per-partition record batches (aiokafka's compiled builder) and waits for every ack."""

    def __init__(self, settings: Settings):
        import asyncio
        import threading

        from aiokafka import AIOKafkaProducer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            producer = AIOKafkaProducer(
                **settings.kafka_python_config(),
                acks="all",
                enable_idempotence=True,
                compression_type="lz4",
                linger_ms=5,
                max_batch_size=512 * 1024,
            )
            await producer.start()
            return producer

        self.producer = self._run(start())

    def _run(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def publish(self, topic, keys, values, headers, partitions) -> None:
        import asyncio

        async def send():
            p = self.producer
            by_partition: dict[int, list[int]] = {}
            for i, part in enumerate(partitions):
                by_partition.setdefault(part, []).append(i)
            futures = []
            for part, idx in by_partition.items():
                batch = p.create_batch()
                for i in idx:
                    if batch.append(key=keys[i], value=values[i], timestamp=None, headers=headers[i]) is None:
                        batch.close()
                        futures.append(await p.send_batch(batch, topic, partition=part))
                        batch = p.create_batch()
                        batch.append(key=keys[i], value=values[i], timestamp=None, headers=headers[i])
                batch.close()
                futures.append(await p.send_batch(batch, topic, partition=part))
            await asyncio.gather(*futures)

        self._run(send())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._run(self.producer.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run_row(label: str, n: int, batch: int, progress: Progress, fn: Callable[[Sequence[int]], None]) -> float:
    """Time fn over index batches of n; returns events/s."""
    task = progress.add_task(label, total=n)
    index = range(n)
    started = time.perf_counter()
    for chunk in batches(index, batch):
        fn(chunk)
        progress.advance(task, len(chunk))
    elapsed = time.perf_counter() - started
    progress.update(task, description=f"{label} [green]{n / elapsed:,.0f}/s")
    return n / elapsed


def bench(settings: Settings, args) -> int:
    from kafka import KafkaProducer

    from producers.pseudonym import Pseudonymiser, edge_record
    from producers.sdk import EventProducer
    from schemas.codec import Codec
    from schemas.models import validate_event
    from schemas.registry_client import RegistryClient
    from schemas.topics import murmur2, partition_key

    console.print(
        f"[bold]NHDP producer SDK benchmark[/]: {args.events:,} national-scenario events, calls of "
        f"{args.batch:,}, Kafka {settings.kafka_bootstrap_servers}, registry {settings.registry_url}"
    )
    console.print(f"machine: {machine()}")
    with console.status("simulating events and pre-building records"):
        events = national_events(args.events, args.seed)
        pseudonymiser = Pseudonymiser.from_settings(settings)
        records = []
        for e in events:
            validated, errors = validate_event(e)
            assert not errors, errors
            records.append(edge_record(validated, pseudonymiser))
        codec = Codec(RegistryClient.for_settings(settings))
        codec.register_catalog()
        values = codec.encode_many([(r["event_type"], r) for r in records])
        keys = [partition_key(r) for r in records]
        nparts = settings.kafka_partitions
        partition_of = [(murmur2(k) & 0x7FFFFFFF) % nparts for k in keys]
        trace = uuid.uuid4().hex.encode()
        headers = [[("trace_id", trace), ("source", b"bench")] for _ in records]
    size = sum(map(len, values)) / len(values)
    console.print(f"{len(events):,} events, {size:.0f} B/event Avro before lz4")

    topics = Topics(settings, settings.kafka_partitions, args.keep)
    rows: list[tuple[str, str, float]] = []
    n, b = args.events, args.batch
    columns = (TextColumn("{task.description:<58}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as progress:

            def sdk(topic: str) -> EventProducer:
                p = EventProducer(settings, codec=codec, source="bench", topic=topic)
                p.publish_many(records[:200])  # connect + metadata before the clock starts
                return p

            def checked(label: str, what: str, topic: str, fn, warm: int) -> None:
                rate = run_row(label, n, b, progress, fn)
                total = topics.total(topic)
                if total != n + warm:
                    raise RuntimeError(f"{label}: topic holds {total} messages, expected {n + warm}")
                rows.append((label, what, rate))

            if "a" in args.rows:
                topic = topics.fresh("a")
                p = sdk(topic)
                checked(
                    "(a) SDK publish_json",
                    "validate + pseudonymise + encode + send + acks",
                    topic,
                    lambda ix: p.publish_json(events[ix.start : ix.stop], pseudonymiser),
                    200,
                )
                p.close()
            if "b" in args.rows:
                topic = topics.fresh("b")
                p = sdk(topic)
                checked(
                    "(b) SDK publish_many",
                    "encode + send + acks (records pre-built)",
                    topic,
                    lambda ix: p.publish_many(records[ix.start : ix.stop]),
                    200,
                )
                p.close()
            if "c" in args.rows:
                topic = topics.fresh("c")
                p = sdk(topic)
                raw: KafkaProducer = p._producer

                def kp(ix):
                    futures = [
                        raw.send(topic, key=keys[i], value=values[i], headers=headers[i], partition=partition_of[i])
                        for i in ix
                    ]
                    raw.flush()
                    for f in futures:
                        f.get(timeout=0)

                checked("(c) kafka-python send() per record", "pre-encoded bytes, the SDK's config", topic, kp, 200)
                p.close()
            if "g" in args.rows:
                from kafka.record import default_records, util

                topic = topics.fresh("g")
                p = sdk(topic)
                raw = p._producer
                compiled, default_records.calc_crc32c = default_records.calc_crc32c, util.calc_crc32c
                try:

                    def kp_before(ix):
                        futures = [raw.send(topic, key=keys[i], value=values[i], headers=headers[i]) for i in ix]
                        raw.flush()
                        for f in futures:
                            f.get(timeout=0)

                    checked(
                        "(g) as (c), as the SDK was before",
                        "kafka-python partitioner + Python CRC-32C",
                        topic,
                        kp_before,
                        200,
                    )
                finally:
                    default_records.calc_crc32c = compiled
                p.close()
            ck = None
            if "d" in args.rows or "e" in args.rows:
                try:
                    ck = confluent_producer(settings)
                except ImportError:
                    console.print(
                        "[yellow]confluent-kafka is not installed (pip install -e '.[test]'): rows d, e skipped"
                    )
            if ck is not None and "d" in args.rows:
                topic = topics.fresh("d")
                confluent_publish(ck, topic, keys[:200], values[:200], headers[:200])
                checked(
                    "(d) confluent-kafka produce of the same bytes",
                    "librdkafka, same config",
                    topic,
                    lambda ix: confluent_publish(
                        ck, topic, keys[ix.start : ix.stop], values[ix.start : ix.stop], headers[ix.start : ix.stop]
                    ),
                    200,
                )
            if ck is not None and "e" in args.rows:
                topic = topics.fresh("e")
                confluent_publish(ck, topic, keys[:200], values[:200], headers[:200])

                def full(ix):
                    recs = []
                    for e in events[ix.start : ix.stop]:
                        validated, errors = validate_event(e)
                        recs.append(edge_record(validated, pseudonymiser))
                    vals = codec.encode_many([(r["event_type"], r) for r in recs])
                    confluent_publish(ck, topic, [partition_key(r) for r in recs], vals, headers[ix.start : ix.stop])

                checked("(e) validate + pseudonymise + encode, confluent-kafka", "(a) on librdkafka", topic, full, 200)
            if "f" in args.rows:
                topic = topics.fresh("f")
                with AioBatches(settings) as aio:
                    aio.publish(topic, keys[:200], values[:200], headers[:200], partition_of[:200])
                    checked(
                        "(f) aiokafka send_batch of the same bytes",
                        "compiled batch builder, same config",
                        topic,
                        lambda ix: aio.publish(
                            topic,
                            keys[ix.start : ix.stop],
                            values[ix.start : ix.stop],
                            headers[ix.start : ix.stop],
                            partition_of[ix.start : ix.stop],
                        ),
                        200,
                    )
    finally:
        topics.close()

    table = Table(title=f"publish throughput, one process, acks=all + idempotent + lz4 — {machine()}")
    table.add_column("row")
    table.add_column("does")
    table.add_column("events/s", justify="right")
    table.add_column("µs/event", justify="right")
    for label, what, rate in rows:
        table.add_row(label, what, f"{rate:,.0f}", f"{1e6 / rate:.1f}")
    console.print(table)
    by = {label[:3]: rate for label, _, rate in rows}
    if "(c)" in by and "(g)" in by:
        console.print(
            f"kafka-python with the SDK's partitioning and CRC / as before = [bold]{by['(c)'] / by['(g)']:.1f}x[/]"
        )
    if "(c)" in by and "(f)" in by:
        console.print(
            f"client alone, same bytes: aiokafka batches / kafka-python = [bold]{by['(f)'] / by['(c)']:.1f}x[/]"
        )
    if "(c)" in by and "(d)" in by:
        console.print(
            f"client alone, same bytes: confluent-kafka / kafka-python send() = [bold]{by['(d)'] / by['(c)']:.1f}x[/]"
        )
    if "(b)" in by and "(d)" in by:
        console.print(
            f"confluent-kafka (bytes only) / the SDK's batch path (encoding included) = [bold]{by['(d)'] / by['(b)']:.1f}x[/]"
        )
    if "(a)" in by and "(e)" in by:
        console.print(
            f"whole publish_json path: on confluent-kafka / on kafka-python = [bold]{by['(e)'] / by['(a)']:.1f}x[/]"
        )
    if "(b)" in by and "(c)" in by:
        console.print(f"the SDK's batch path / kafka-python send() per record = [bold]{by['(b)'] / by['(c)']:.1f}x[/]")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    ap.add_argument("--bootstrap", default=defaults.kafka_bootstrap_servers, help="Kafka (default: NHDP settings)")
    ap.add_argument("--registry", default=defaults.registry_url, help="schema registry (default: NHDP settings)")
    ap.add_argument("--own-stack", action="store_true", help="start a private stack in a temp folder on free ports")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=10_000, help="events per publish call (each waits for its acks)")
    ap.add_argument("--rows", default="abcdefg", help="which rows to run (default abcdefg)")
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--keep", action="store_true", help="keep the bench topics")
    args = ap.parse_args(argv)
    if args.own_stack:
        with own_stack() as settings:
            return bench(settings, args)
    settings = defaults.model_copy(
        update={"kafka_bootstrap_servers": args.bootstrap, "registry_url_override": args.registry}
    )
    return bench(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())

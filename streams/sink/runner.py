"""The sink's consumer loop: batches, the pipeline, commits, back-pressure (see the package's notes)."""

from __future__ import annotations

import collections
import gc
import json
import logging
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaException, Producer, TopicPartition

from infra.process import COLLECT_EVERY_S, write_atomically
from infra.settings import Settings
from projections.clickhouse.connect import open_store
from projections.clickhouse.shaping import Shaped
from projections.clickhouse.store import AnalyticsStore, AnalyticsStoreError
from projections.clickhouse.writer import DOSES_EVERY_S, BatchStats, Planned, Sink
from projections.faults import apply_isolating, is_permanent
from schemas.registry_client import RegistryError
from schemas.topics import ANALYTICS_GROUP, TOPIC_DLQ, TOPIC_EVENTS, dlq_headers
from streams.sink.decoders import BLOCK_TABLES, _start_decoder, decode_and_shape

log = logging.getLogger("nhdp.sink")


BATCH_ROWS = 10_000  # a batch is written once it has this many messages…


# …or this long after its first one. With decoding and writing after it, this is most of the
# analytics' freshness at a steady rate (DESIGN §5: p99 within 1 s at 5,000 events/s).
BATCH_WITHIN_S = 0.4


# While a batch is being decoded or written, the loop looks this often whether it is done: each
# stage's hand-off waited for the next poll, up to three of them per batch before it is committed.
HANDOFF_S = 0.01


MAX_BATCH_ROWS = 50_000  # while catching up, what is already fetched joins the batch, up to this


QUIET_S = 0.2  # no message for this long: the batches in the pipeline are finished and committed


ROLLUP_EVERY_S = 15.0  # recompute dirty hours at most this often while busy, and after each lull:
# each recomputation reads its hours whole (FINAL), and the hour being written is dirty again
# a moment later, so refreshing it at every pause of a steady stream (as before) made
# ClickHouse's work per event grow with the size of the current hour. Queries read dirty hours
# from the raw rows, so how often this runs changes how fast they are, never what they answer.
LULL_S = 1.0  # no message for this long is a lull


class Runner:
    """The consumer loop: poll, batch, decode, plan, write, commit; back-pressure while ClickHouse is down.

    The consumer is librdkafka's (confluent-kafka): it fetches and parses
    record batches on its own threads, outside the GIL, so Kafka costs this
    loop ~1 µs per message instead of kafka-python's ~6 µs of pure-Python
    parsing. Batches then go through the pipeline described at the top of
    this module: decoder processes, this thread's plan, the writer thread.
    """

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        *,
        group: str = ANALYTICS_GROUP,
        batch_rows: int = BATCH_ROWS,
        max_rows: int = MAX_BATCH_ROWS,
        within_s: float = BATCH_WITHIN_S,
        rollup_every_s: float = ROLLUP_EVERY_S,
        ready_file=None,
    ):
        self.settings, self.sink, self.group = settings, sink, group
        self.batch_rows, self.max_rows = batch_rows, max(max_rows, batch_rows)
        self.within_s, self.rollup_every_s = within_s, rollup_every_s
        self.ready_file = ready_file
        self.stop_event = threading.Event()
        self.processed = 0
        self.batches = 0
        self.retries = 0
        self.dead_letters = 0
        self._dlq: Producer | None = None
        self._buffer: list = []
        self._paused = False
        self._decoder = None  # the decoding processes (a ProcessPoolExecutor of settings.sink_decoders)
        # batches cut from the buffer, in log order: (future, records, values, partitions, offsets, to commit)
        self._decoding: collections.deque = collections.deque()
        self._writing: tuple | None = None  # (future, Planned, offsets to commit, records): the batch in flight
        self._write_store: AnalyticsStore | None = None
        self._refreshing = None  # the future of the rollups' recompute under way
        self._refresh_store: AnalyticsStore | None = None
        self._next_collection = 0.0  # run() collects garbage itself (_collect_if_due)
        # The store takes ready-made Native blocks: the decoders encode the rows only they make.
        column_types = getattr(sink.store, "column_types", None)
        types = [column_types(t, c) for t, c in BLOCK_TABLES] if column_types is not None else []
        self._block_types = types if types and all(types) else None

    def _consumer(self):
        return Consumer(
            {
                **self.settings.librdkafka_config(),
                "group.id": self.group,
                "client.id": f"nhdp-sink-{os.getpid()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                "fetch.max.bytes": 64 * 1024 * 1024,
                "max.poll.interval.ms": 600_000,
                # A sink that dies without leaving the group (SIGKILL, a lost host) holds its
                # partitions until this expires: 10 s, as the worker, not the client's 45 s.
                "session.timeout.ms": 10_000,
                "logger": logging.getLogger("nhdp.sink.kafka"),
            }
        )

    # A rebalance revokes every partition (eager protocol) and the consumer then
    # fetches from the committed offsets: drop what is buffered, it was not
    # committed and will be delivered again. A partition assigned while the sink
    # holds a batch for a ClickHouse that is down starts paused, like the others.
    def _on_assign(self, consumer, assigned) -> None:
        if self._paused:
            consumer.pause(assigned)
        if self.ready_file is not None:
            write_atomically(self.ready_file, json.dumps(sorted(tp.partition for tp in assigned)))

    def _on_revoke(self, _consumer, _revoked) -> None:
        self._buffer.clear()

    def _take(self, consumer, n: int, timeout_s: float) -> int:
        """Up to n messages into the buffer, waiting at most timeout_s for them all; how many came."""
        messages = consumer.consume(num_messages=max(1, n), timeout=timeout_s)
        good = [m for m in messages if m.error() is None]
        if len(good) < len(messages):
            for m in messages:
                error = m.error()
                if error is not None and error.fatal():
                    raise RuntimeError(f"Kafka consumer failed: {error}")
                if error is not None:  # a broker down or restarting: librdkafka retries on its own; no message is lost
                    log.warning("Kafka: %s", error)
        self._buffer += good
        return len(good)

    def run(self) -> None:
        consumer = self._consumer()
        consumer.subscribe([TOPIC_EVENTS], on_assign=self._on_assign, on_revoke=self._on_revoke)
        # Three stages at once, in log order: the decoder processes decode and shape batch k+2,
        # this thread plans batch k+1, the writer thread writes batch k (mostly ClickHouse's
        # own work, outside the GIL).
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nhdp-sink-write")
        # The rollups are recomputed beside the writes, on their own connection (Sink.refresh_version
        # says why that is safe): on this loop they held every batch behind them for up to a second.
        refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nhdp-sink-rollups")
        for _ in range(self.settings.sink_decoders):  # start them now, while the group forms, not with the first batch
            self._decoder_pool().submit(int)
        first_at = None
        last_polled = 0.0
        # The collector, left to itself, ran ~20 full collections a million messages, each
        # rescanning the live batches and the recent facts: a quarter of this process's CPU
        # for garbage that is almost never cyclic. It runs on this loop's schedule instead.
        collecting = gc.isenabled()
        gc.disable()
        self._next_collection = time.monotonic() + COLLECT_EVERY_S
        try:
            while not self.stop_event.is_set():
                self._collect_if_due()
                took_at = time.monotonic()
                wait_s = self.within_s if first_at is None else max(0.0, first_at + self.within_s - took_at)
                if self._decoding or self._writing is not None:  # move them on soon after they are done
                    wait_s = min(wait_s, HANDOFF_S)
                # returns when the batch is full or the wait is over, whichever comes first
                polled = self._take(consumer, self.batch_rows - len(self._buffer), wait_s)
                if self.ready_file is not None and not self.ready_file.exists():
                    # Up: ClickHouse migrated, Kafka reached. Partitions may come later (a departed
                    # member's session has to expire first); the listener records them when they do.
                    write_atomically(self.ready_file, "[]")
                if self._buffer and first_at is None:
                    first_at = self._first_arrived(took_at)
                full = len(self._buffer) >= self.batch_rows
                # Catching up: take what is already fetched, while the pipeline is busy anyway (an
                # idle one gets the first BATCH_ROWS at once: the sooner it fills, the sooner it flows).
                while full and len(self._buffer) < self.max_rows and (self._decoding or self._writing):
                    if not self._take(consumer, self.max_rows - len(self._buffer), 0):
                        break
                due = first_at is not None and time.monotonic() - first_at >= self.within_s
                if self._buffer and (full or due):
                    self._cut()
                    first_at = None
                if polled:
                    last_polled = time.monotonic()
                # A fetch can come back empty while catching up: only a log quiet for a while
                # drains the pipeline, anything sooner would stall the decoders.
                quiet = not polled and time.monotonic() - last_polled >= QUIET_S
                # One batch on per round, so that the decoders always have the next ones; all of
                # them once the log is quiet.
                if self._decoding and (
                    len(self._decoding) > self.settings.sink_decoders or self._decoding[0][0].done()
                ):
                    self._advance(consumer, writer)
                while quiet and self._decoding:
                    self._advance(consumer, writer)
                # committed as soon as written, not when the next batch is handed to the writer
                if self._writing is not None and (self._writing[0].done() or (quiet and not self._decoding)):
                    self._finish(consumer)
                lull = not polled and time.monotonic() - last_polled >= LULL_S
                self._refresh_if_due(
                    refresher,
                    # after the lull's last batch is written: the recompute then leaves nothing dirty
                    after_lull=lull and not self._buffer and not self._decoding and self._writing is None,
                    doses_every_s=DOSES_EVERY_S if polled else 0.0,
                )
            # Stopping: the batch being written is finished and committed; the ones still being
            # decoded were not committed and will be delivered again.
            self._finish(consumer)
        finally:
            if collecting:
                gc.enable()
            writer.shutdown(wait=True)
            refresher.shutdown(wait=True)
            if self._refresh_store is not None:
                self._refresh_store.close()
                self._refresh_store = None
            if self._decoder is not None:
                self._decoder.shutdown(wait=True, cancel_futures=True)
                self._decoder = None
            self._decoding.clear()
            if self._write_store is not None:
                self._write_store.close()
                self._write_store = None
            consumer.close()

    def _refresh_if_due(self, refresher, *, after_lull: bool, doses_every_s: float) -> None:
        """Recompute the rollups every ROLLUP_EVERY_S, busy or not, and once after each lull that
        followed a write; one recompute at a time."""
        if self._refreshing is not None:
            if not self._refreshing.done():
                return
            future, self._refreshing = self._refreshing, None
            exc = future.exception()
            if isinstance(exc, AnalyticsStoreError | OSError) and not is_permanent(exc):
                # ClickHouse down: the writes hold the batches meanwhile. Answers stay exact (they
                # read dirty hours from the raw rows), only slower, until the next recompute.
                log.warning("recomputing the rollups failed (%s); again in %.0f s", exc, self.rollup_every_s)
                if self._refresh_store is not None:
                    self._refresh_store.close()
                    self._refresh_store = None
            elif exc is not None:  # fenced by a newer sink, or a fault of ours: stop
                raise exc
        if (after_lull and self.sink.stale()) or time.monotonic() - self.sink.last_rollup > self.rollup_every_s:
            self._refreshing = refresher.submit(self._refresh, doses_every_s)

    def _refresh(self, doses_every_s: float) -> int:
        if self._refresh_store is None:
            self._refresh_store = open_store(
                self.sink.store.url, purpose="nhdp sink (rollups thread)", password=self.settings.analytics_password()
            )
        return self.sink.refresh_rollups(doses_every_s=doses_every_s, store=self._refresh_store)

    def _first_arrived(self, took_at: float) -> float:
        """When the buffer's oldest message reached Kafka, on this clock: its timestamp, but not
        before the take that brought it began (a backlog's old messages start a new batch's
        window now, and a producer's clock ahead or behind can only shorten a window)."""
        now = time.monotonic()
        stamps = [ms for kind, ms in (m.timestamp() for m in self._buffer) if kind != TIMESTAMP_NOT_AVAILABLE]
        age = time.time() - min(stamps) / 1000 if stamps else 0.0
        return min(now, max(took_at, now - age))

    def _collect_if_due(self) -> None:
        if time.monotonic() >= self._next_collection:
            gc.collect()
            self._next_collection = time.monotonic() + COLLECT_EVERY_S

    def _decoder_pool(self):
        if self._decoder is None:
            # spawn, not fork: this process runs librdkafka's and the writer's threads
            self._decoder = ProcessPoolExecutor(
                max_workers=self.settings.sink_decoders,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_decoder,
                initargs=(self.settings,),  # pickled through the pool's pipe, never the environment
            )
        return self._decoder

    def _cut(self) -> None:
        """The buffer becomes a batch, sent to the decoding processes."""
        records, self._buffer = self._buffer, []
        values = [r.value() for r in records]
        partitions = [r.partition() for r in records]
        offsets = [r.offset() for r in records]
        commit = dict(zip(partitions, (o + 1 for o in offsets)))  # a partition's records come in offset order
        future = self._decoder_pool().submit(decode_and_shape, values, partitions, offsets, self._block_types)
        self._decoding.append((future, records, values, partitions, offsets, commit))

    def _advance(self, consumer, writer) -> None:
        """The oldest batch being decoded: wait for it, plan it, and once the batch in flight is
        written and committed, hand its write to the writer thread."""

        future, records, values, partitions, offsets, commit = self._decoding.popleft()
        attempt = [future]

        def decoded():
            pending, attempt[0] = attempt[0], None
            try:
                return (
                    pending
                    or self._decoder_pool().submit(decode_and_shape, values, partitions, offsets, self._block_types)
                ).result()
            except BrokenProcessPool as exc:  # it died (killed, out of memory): a new one decodes it again
                self._decoder = None
                raise OSError(f"the sink's decoding process died: {exc}") from exc

        data, good = self._with_retry(consumer, decoded)
        shaped = _unpickled(data)
        # planned while the batch before it is written: what it writes is taken from memory
        writing = self._writing[1] if self._writing is not None else None
        planned = self._with_retry(consumer, lambda: self.sink.plan(shaped, good, writing))
        if self._finish(consumer):  # writes go one batch at a time, in log order
            # that batch was written in parts, without the event ClickHouse refused: plan on what is stored
            planned = self._with_retry(consumer, lambda: self.sink.plan(shaped, good, None))
        self._writing = (writer.submit(self._write, planned), planned, commit, records)

    def _write(self, planned: Planned) -> BatchStats:
        if self._write_store is None:  # its own connection: the next batch's reads need not wait for it
            self._write_store = open_store(
                self.sink.store.url, purpose="nhdp sink (writer thread)", password=self.settings.analytics_password()
            )
        return self.sink.write(planned, self._write_store)

    def _finish(self, consumer) -> bool:
        """Wait for the batch in flight; retry its write here while ClickHouse is down; then commit it.

        True when ClickHouse refused a value in it for good (projections.faults): the batch was
        then written in parts around the event at fault, which went to the DLQ."""

        if self._writing is None:
            return False
        future, planned, offsets, records = self._writing
        isolated = False
        try:
            try:
                future.result()
            except (AnalyticsStoreError, OSError) as exc:
                if not is_permanent(exc):
                    self._with_retry(consumer, lambda: self._write(planned))
                else:
                    raise
        except AnalyticsStoreError as exc:
            if not is_permanent(exc):
                raise
            log.warning("ClickHouse refused a value in a batch of %d (%s); isolating it", len(records), exc)
            self._isolate(consumer, records)
            isolated = True
        finally:
            self._writing = None
        try:
            consumer.commit(
                offsets=[TopicPartition(TOPIC_EVENTS, p, o) for p, o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:  # a rebalance took the partitions: they are re-delivered, idempotently
            log.warning("offset commit failed (%s); the batch will be re-delivered and changes nothing", exc)
        self.processed += len(records)
        self.batches += 1
        return isolated

    def _isolate(self, consumer, records: list) -> None:
        """Write a batch ClickHouse refused in halves, down to the event at fault, which is dead-lettered."""
        by_position = {(r.partition(), r.offset()): r for r in records}

        def write(part) -> None:
            live = [e for e in part if e[3] is not None]
            future = self._decoder_pool().submit(
                decode_and_shape, [e[3] for e in live], [e[1] for e in live], [e[2] for e in live], self._block_types
            )
            try:
                data, good = future.result()
            except BrokenProcessPool as exc:  # as in _advance: a new pool decodes it again
                self._decoder = None
                raise OSError(f"the sink's decoding process died: {exc}") from exc
            planned = self.sink.plan(_unpickled(data), good, None)
            self._write(planned)

        def reject(entry, reason: str) -> None:
            r = by_position[(entry[1], entry[2])]
            log.warning("dead-lettering %s[%d]@%d: %s", r.topic(), r.partition(), r.offset(), reason)
            if self._dlq is None:
                self._dlq = Producer({**self.settings.librdkafka_config(), "acks": "all"})
            headers = dlq_headers(r.headers(), reason, r.topic(), r.partition(), r.offset())
            self._dlq.produce(TOPIC_DLQ, r.value(), r.key(), headers=headers)
            if self._dlq.flush(30):
                raise OSError("the DLQ did not acknowledge a dead letter within 30 s")
            self.dead_letters += 1

        delay = [0.2]

        def wait(exc: BaseException) -> None:
            self._hold(consumer, exc, delay[0])
            delay[0] = min(delay[0] * 2, 10.0)

        entries = [(TOPIC_EVENTS, r.partition(), r.offset(), r.value()) for r in records]
        apply_isolating(write, entries, reject, wait)
        if self._paused:
            self._paused = False
            consumer.resume(consumer.assignment())

    def _with_retry(self, consumer, fn):
        """fn() until it succeeds; meanwhile the partitions are paused but the consumer keeps polling."""
        delay = 0.2
        while True:
            try:
                result = fn()
                if self._paused:
                    self._paused = False
                    consumer.resume(consumer.assignment())
                return result
            except (AnalyticsStoreError, OSError) + _registry_errors() as exc:
                if self.stop_event.is_set() or is_permanent(exc):
                    raise
                self._hold(consumer, exc, delay)
                delay = min(delay * 2, 10.0)

    def _hold(self, consumer, exc: BaseException, delay: float) -> None:
        """Back-pressure for delay seconds: the partitions are paused but the consumer keeps polling."""
        if self.stop_event.is_set():
            raise exc
        self.retries += 1
        log.warning("ClickHouse or the registry failed (%s); holding the batch, retrying in %.1fs", exc, delay)
        if not self._paused:
            self._paused = True
            consumer.pause(consumer.assignment())
        self._collect_if_due()  # a long outage keeps this loop out of run()'s
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self.stop_event.is_set():
            # paused: nothing arrives, but rebalances are served; anything fetched before
            # the pause is kept for the next batch, never dropped
            self._take(consumer, self.max_rows, 0.1)


def _unpickled(data: bytes) -> Shaped:
    parts, skipped = pickle.loads(data)
    shaped = Shaped(parts)
    shaped.skipped = skipped
    return shaped


def _registry_errors() -> tuple:
    return (RegistryError,)


def ready_path(settings: Settings, pid: int) -> Path:
    return settings.ready_path("sink", pid)

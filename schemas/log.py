"""Reading the log's positions: where it ends, where a group stands, and a fixed prefix of it.

The one place that asks Kafka for offsets (kafka-python clients signed in as the
caller's principal (Settings.kafka_python_config), closed
after each question, except the long-lived ones of LogEnds and GroupPositions): the projections' lag, the sink's lag,
`verify`, replay and the benchmarks all read positions through these.
"""

from __future__ import annotations

import threading

from kafka import KafkaConsumer, TopicPartition

from infra.settings import Settings
from schemas.topics import TOPIC_EVENTS


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]


def end_offsets(settings: Settings, topics: tuple[str, ...] = (TOPIC_EVENTS,)) -> dict[tuple[str, int], int]:
    """The next offset of every partition of these topics, from one client."""
    consumer = KafkaConsumer(**settings.kafka_python_config(), request_timeout_ms=10_000)
    try:
        parts = [tp for topic in topics for tp in _partitions(consumer, topic)]
        return {(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


class _LongLived:
    """One kafka-python client kept for a question asked again and again (every /metrics scrape,
    every analytics answer): a client per question costs a connection, a metadata round trip
    and a socket left in TIME_WAIT each time. Callers take turns; after an error the client is
    dropped and the next question opens a fresh one."""

    def __init__(self, settings: Settings, **config):
        self.settings, self._config = settings, config
        self._consumer: KafkaConsumer | None = None
        self._lock = threading.Lock()

    def _ask(self, question):
        with self._lock:
            if self._consumer is None:
                self._consumer = KafkaConsumer(
                    **self.settings.kafka_python_config(), request_timeout_ms=10_000, **self._config
                )
            try:
                return question(self._consumer)
            except Exception:
                self._close()
                raise

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False)

    def close(self) -> None:
        with self._lock:
            self._close()


class LogEnds(_LongLived):
    """end_offsets, from one long-lived client."""

    def __call__(self, topics: tuple[str, ...] = (TOPIC_EVENTS,)) -> dict[tuple[str, int], int]:
        def question(consumer: KafkaConsumer) -> dict[tuple[str, int], int]:
            parts = [tp for topic in topics for tp in _partitions(consumer, topic)]
            return {(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(parts).items()}

        return self._ask(question)


class GroupPositions(_LongLived):
    """group_positions, from one long-lived client (it never joins the group: committed() only asks)."""

    def __init__(self, settings: Settings, group: str):
        super().__init__(settings, group_id=group, enable_auto_commit=False)

    def __call__(self, topic: str = TOPIC_EVENTS) -> dict[int, int]:
        return self._ask(
            lambda consumer: {tp.partition: consumer.committed(tp) or 0 for tp in _partitions(consumer, topic)}
        )


def log_end(settings: Settings, topic: str = TOPIC_EVENTS) -> dict[int, int]:
    """The next offset of every partition of the topic."""
    return {p: off for (_, p), off in end_offsets(settings, (topic,)).items()}


def group_positions(settings: Settings, group: str, topic: str = TOPIC_EVENTS) -> dict[int, int]:
    """The next offset the group will consume, per partition (its committed offsets; 0 if none)."""
    consumer = KafkaConsumer(
        **settings.kafka_python_config(), group_id=group, enable_auto_commit=False, request_timeout_ms=10_000
    )
    try:
        return {tp.partition: consumer.committed(tp) or 0 for tp in _partitions(consumer, topic)}
    finally:
        consumer.close(autocommit=False)


def lag(ends: dict[int, int], positions: dict[int, int]) -> dict[int, int]:
    """Messages not yet consumed, per partition of `ends`."""
    return {p: end - positions.get(p, 0) for p, end in ends.items()}


class LogPrefix:
    """`health.events` from offset 0 up to given last offsets (inclusive; default: the end now),
    as the lists of records each poll returns, in offset order per partition.

    What an audit rebuild reads: the same prefix of the log whatever arrives
    meanwhile. A partition is paused once it reaches its limit, so the others
    keep their fetch budget."""

    def __init__(self, settings: Settings, upto: dict[int, int] | None = None, batch_size: int = 10_000):
        self.batch_size = batch_size
        self.consumer = KafkaConsumer(
            **settings.kafka_python_config(),
            enable_auto_commit=False,
            max_poll_records=batch_size,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        try:
            parts = [
                TopicPartition(TOPIC_EVENTS, p) for p in sorted(self.consumer.partitions_for_topic(TOPIC_EVENTS) or [])
            ]
            self.consumer.assign(parts)
            self.consumer.seek_to_beginning(*parts)
            if upto is None:
                upto = {tp.partition: off - 1 for tp, off in self.consumer.end_offsets(parts).items()}
        except BaseException:
            self.consumer.close()
            raise
        self._remaining = {p: o for p, o in upto.items() if o >= 0}
        self.total = sum(o + 1 for o in self._remaining.values())
        for tp in parts:
            if tp.partition not in self._remaining:
                self.consumer.pause(tp)

    def __iter__(self):
        remaining = self._remaining
        while remaining:
            chunk = []
            for tp, records in self.consumer.poll(timeout_ms=1000, max_records=self.batch_size).items():
                limit = remaining.get(tp.partition)
                if limit is None:
                    continue
                chunk.extend(r for r in records if r.offset <= limit)
                if records and records[-1].offset >= limit:
                    remaining.pop(tp.partition)
                    self.consumer.pause(tp)
            if chunk:
                yield chunk

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> LogPrefix:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

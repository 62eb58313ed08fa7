"""kafka-python's private API, in one place: the producer SDK's whole-batch path.

`producers.sdk` hands kafka-python one complete record batch per partition per
call instead of calling `KafkaProducer.send` per event: a call then pays about
5 µs per event instead of the 60-70 µs of `send`'s per-record futures and
locks. That needs kafka-python's internals, all of them used here and only here:

- `kafka.record.default_records.DefaultRecordBatchBuilder` (its HEADER_STRUCT)
  and `kafka.record.memory_records.MemoryRecordsBuilder`, whose private buffer
  and counters (`_builder._buffer`, `_num_records`, `_last_offset`,
  `_first_timestamp`, `_max_timestamp`, `_next_offset`) `build_batches` fills
  with the records of a v2 batch written byte for byte as
  `DefaultRecordBatchBuilder.append` writes them (one join per record instead of
  a varint call per field), leaving the header, producer state, compression and
  CRC to kafka-python's own `build` when the sender drains the batch;
- `kafka.record.util.encode_varint`, for the records' zigzag varints;
- `kafka.producer.producer_batch.ProducerBatch` and the producer's
  `_accumulator` (`_tp_lock`, `_batches`, `_incomplete`, `config`) and `_sender`:
  `BatchSender.enqueue` adds complete batches as the accumulator does for the
  batches `send` fills, so the sender then assigns the idempotent producer id
  and sequence numbers, compresses, retries and completes each batch's future,
  all kafka-python's own code; only the per-record work is skipped;
- the value of a batch's `produce_future` (base offset, log append time,
  per-record errors), read by `batch_result`.

Every one of these is checked against the kafka-python version pinned in
pyproject.toml (import fails on any other): tests/unit/test_third_party.py
compares our batches with kafka-python's own builder, byte for byte, and hands
one to a producer's sender without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

from kafka import KafkaProducer
from kafka.producer.producer_batch import ProducerBatch
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecordsBuilder
from kafka.record.util import encode_varint
from kafka.structs import TopicPartition

from infra.tools import require_pinned

PINNED = "3.0.12"


def check_version(installed: str) -> None:
    require_pinned("kafka-python", PINNED, __name__, installed)


check_version(version("kafka-python"))


# Uncompressed bytes per enqueued batch. Far under the broker's message.max.bytes
# (1 MiB), so kafka-python never splits one of them: a split batch would complete
# futures the SDK does not wait on.
BATCH_BYTES = 256 * 1024


def _zigzag_varint(value: int) -> bytes:
    out = bytearray()
    encode_varint(value, out.append)
    return bytes(out)


# Kafka record fields are zigzag varints; lengths and offset deltas below 16 KiB are looked up.
_VARINT = [_zigzag_varint(v) for v in range(1 << 14)]


def varint(value: int, table=_VARINT) -> bytes:
    return table[value] if value < 16384 else _zigzag_varint(value)


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> bytes:
    """A record's header section (count, then each key and value), as kafka-python writes it."""
    parts = [varint(len(headers))]
    for name, value in headers:
        raw = name.encode()
        parts += (varint(len(raw)), raw, varint(len(value)), value)
    return b"".join(parts)


def build_batches(rows: Sequence[tuple[int, bytes, bytes, bytes]], timestamp: int, config: dict[str, Any]):
    """(index, key, value, header section) rows → [(indexes, MemoryRecordsBuilder)], each at most BATCH_BYTES.

    Writes the records of a v2 batch (DefaultRecordBatchBuilder.append's bytes,
    byte for byte: tests/unit/test_third_party.py compares) in one join per record
    instead of a varint call per field, and leaves the header, producer state,
    compression and CRC to kafka-python's own `build` when the sender drains the batch.
    `config` is the accumulator's (`message_version`, `compression_attrs`)."""
    out = []
    members: list[int] = []
    parts: list[bytes] = []

    def seal() -> None:
        builder = MemoryRecordsBuilder(config["message_version"], config["compression_attrs"], BATCH_BYTES)
        inner = builder._builder
        inner._buffer += b"".join(parts)
        inner._num_records = len(members)
        inner._last_offset = len(members) - 1
        inner._first_timestamp = inner._max_timestamp = timestamp
        builder._next_offset = len(members)
        out.append((members, builder))

    def encode(delta: int, key: bytes, value: bytes, headers: bytes) -> bytes:
        body = b"".join((b"\x00\x00", varint(delta), varint(len(key)), key, varint(len(value)), value, headers))
        return varint(len(body)) + body

    header = size = DefaultRecordBatchBuilder.HEADER_STRUCT.size
    for i, key, value, headers in rows:
        record = encode(len(members), key, value, headers)
        if size + len(record) > BATCH_BYTES and members:  # kafka-python's own rule for a full batch
            seal()
            members, parts, size = [], [], header
            record = encode(0, key, value, headers)
        parts.append(record)
        members.append(i)
        size += len(record)
    if members:
        seal()
    return out


class BatchSender:
    """A KafkaProducer's accumulator and sender, fed whole batches."""

    def __init__(self, producer: KafkaProducer):
        self._producer = producer
        self._accumulator = producer._accumulator

    def build(
        self, topic: str, partition: int, rows: Sequence[tuple[int, bytes, bytes, bytes]], timestamp: int
    ) -> list[tuple[ProducerBatch, list[int]]]:
        """(index, key, value, header section) rows of one partition → [(batch, the indexes in it)]."""
        tp = TopicPartition(topic, partition)
        return [
            (ProducerBatch(tp, builder), members)
            for members, builder in build_batches(rows, timestamp, self._accumulator.config)
        ]

    def enqueue(self, batches: Sequence[ProducerBatch]) -> None:
        """Hand complete batches to kafka-python's sender, as its accumulator does for
        the batches `send` fills: the sender then assigns the idempotent producer id and
        sequence numbers, compresses, retries and completes each batch's future, all
        kafka-python's own code. Only the per-record work is skipped.
        `KafkaProducer.flush` then waits for them as for its own."""
        acc = self._accumulator
        for batch in batches:
            with acc._tp_lock(batch.topic_partition):
                acc._batches[batch.topic_partition].append(batch)
                acc._incomplete.add(batch)
        self._producer._sender.wakeup()


def batch_result(
    batch: ProducerBatch,
) -> tuple[BaseException | None, int | None, Callable[[int], BaseException] | None] | None:
    """None while a batch is not done, else (error, base offset, per-record error).

    error: why the whole future failed; per-record error: None, or a function of a
    record's index in the batch giving its error (kafka-python completes a failed
    batch's future with one, and no base offset)."""
    future = batch.produce_future
    if not future.is_done:
        return None
    if future.failed():
        return future.exception, None, None
    base_offset, _, record_error = future.value
    return None, base_offset, record_error

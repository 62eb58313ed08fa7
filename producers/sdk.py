"""Producer SDK: the one way internal services put events on `health.events`.

- kafka-python's idempotent producer with acks=all, so a broker-side retry
  never writes a message twice and an ack means every in-sync replica has it;
- keyed by subject_id (allocation_id for allocations, the target for voids),
  so one citizen's events stay in one partition, in order;
- compressed as NHDP_KAFKA_COMPRESSION says (none by default: the cores, not
  loopback's bandwidth, are what a small machine runs out of);
- one record batch per partition per call, handed whole to kafka-python's
  sender (producers.kafka_internals, the one module that uses kafka-python's
  private API), so a call pays about 5 µs per event instead of the 60-70 µs
  of `KafkaProducer.send`'s per-record futures and locks;
- `publish_many` returns only when every event is acknowledged, or raises
  `PublishError` naming exactly the events that were not.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from infra.settings import Settings
from producers.kafka_internals import BATCH_BYTES as BATCH_BYTES  # re-exported: tests/unit/test_gateway.py
from producers.kafka_internals import BatchSender, batch_result, encode_headers
from producers.kafka_internals import build_batches as build_batches  # re-exported: tests/unit/test_gateway.py
from producers.pseudonym import checked_edge_record
from schemas.bounds import now_ms, record_problem
from schemas.codec import Codec, CodecError
from schemas.registry_client import RegistryClient
from schemas.topics import TOPIC_EVENTS, partition_key, partitions_of


@dataclass(frozen=True)
class Position:
    """Where an event landed in the log."""

    partition: int
    offset: int


class PublishError(RuntimeError):
    """Some events were not acknowledged. `failed` maps index → reason; the rest were."""

    def __init__(self, failed: dict[int, str], event_ids: Sequence[str], positions: dict[int, Position]):
        self.failed = failed
        self.positions = positions
        names = ", ".join(f"#{i} {event_ids[i]} ({reason})" for i, reason in list(failed.items())[:10])
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        super().__init__(f"{len(failed)} of {len(event_ids)} events were not acknowledged by Kafka: {names}{more}")


def _host_port(server: str) -> tuple[str, int]:
    host, sep, port = server.strip().rpartition(":")
    return (host.strip("[]"), int(port)) if sep and port.isdigit() else (server.strip(), 9092)


class EventProducer:
    def __init__(
        self,
        settings: Settings,
        *,
        codec: Codec | None = None,
        source: str = "nhdp-sdk",
        topic: str = TOPIC_EVENTS,
        delivery_timeout_ms: int = 30_000,
        max_block_ms: int = 10_000,
        **producer_config: Any,
    ):
        self.topic = topic
        self.source = source
        self.codec = codec or Codec(RegistryClient.for_settings(settings))
        self.codec.register_catalog()
        config = dict(
            **settings.kafka_python_config(),
            client_id=f"nhdp-{source}",
            acks="all",
            enable_idempotence=True,
            compression_type=settings.kafka_compression_type,
            linger_ms=5,
            batch_size=512 * 1024,
            max_in_flight_requests_per_connection=5,
            request_timeout_ms=min(10_000, delivery_timeout_ms),
            delivery_timeout_ms=delivery_timeout_ms,
            max_block_ms=max_block_ms,
        )
        config.update(producer_config)
        self._config = config
        self._producer = KafkaProducer(**config)
        self._sender = BatchSender(self._producer)
        self._renewing = threading.Lock()
        self._delivery_timeout_s = config["delivery_timeout_ms"] / 1000
        self._max_request_size = self._producer.config["max_request_size"]
        self._brokers = [_host_port(hp) for hp in settings.kafka_bootstrap_servers.split(",") if hp.strip()]
        self._reachable_at = float("-inf")

    def reachable(self, timeout_s: float = 1.0, cache_s: float = 1.0) -> bool:
        """Whether a Kafka broker accepts connections now (a success is trusted for cache_s).

        A fast pre-check, so that a caller facing a stopped Kafka fails in milliseconds
        instead of after delivery_timeout_ms. Not a guarantee: `publish_many` still
        reports exactly which events were not acknowledged."""
        now = time.monotonic()
        if now - self._reachable_at < cache_s:
            return True
        for host, port in self._brokers:
            try:
                socket.create_connection((host, port), timeout=timeout_s).close()
            except OSError:
                continue
            self._reachable_at = now
            return True
        return False

    def publish_many(
        self, records: Sequence[dict[str, Any]], *, trace_id: str | None = None, validated: bool = False
    ) -> list[Position]:
        """Encode and publish Avro-ready records; block until every one is acknowledged.

        validated: the records were made by producers.pseudonym.checked_edge_record a
        moment ago (the gateway, publish_json), which applied these same bounds at the
        same clock; checking them again was a tenth of the gateway's CPU."""
        if not records:
            return []
        producer, sender = self._producer, self._sender  # one producer for the whole call (see _renew)
        try:
            # One metadata look-up per call (it blocks up to max_block_ms when the topic
            # is unknown), not one per event; partitions are then chosen here exactly as
            # kafka-python's DefaultPartitioner would (murmur2 of the key over all
            # partitions), all keys of the call hashed at once.
            partitions = sorted(producer.partitions_for(self.topic))
        except KafkaError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise PublishError({i: reason for i in range(len(records))}, [r["event_id"] for r in records], {}) from exc
        now = now_ms()
        for i, record in enumerate(() if validated else records):  # what the router would dead-letter never leaves
            problem = record_problem(record, now)
            if problem:
                raise CodecError(f"record {i}: {problem}", index=i)
        values = self.codec.encode_many([(r["event_type"], r) for r in records])
        trace = (trace_id or uuid.uuid4().hex).encode()
        source = self.source.encode()
        failed: dict[int, str] = {}
        limit = self._max_request_size - 512  # room for the batch and request headers
        by_partition: dict[int, list[int]] = {}
        keys = [partition_key(r) for r in records]
        for i, index in enumerate(partitions_of(keys, len(partitions))):
            if len(values[i]) + len(keys[i]) > limit:  # KafkaProducer.send's own check, which this path skips
                failed[i] = (
                    f"MessageSizeTooLargeError: {len(values[i]):,} bytes encoded; at most {limit:,} fit one request"
                )
                continue
            by_partition.setdefault(partitions[index], []).append(i)
        timestamp = int(time.time() * 1000)
        header_bytes: dict[bytes, bytes] = {}
        batches: list[tuple[Any, int, list[int]]] = []  # (batch, its partition, the indexes in it)
        for partition, indexes in by_partition.items():
            rows = []
            for i in indexes:
                t = (records[i].get("trace_id") or "").encode() or trace
                hb = header_bytes.get(t)
                if hb is None:
                    hb = header_bytes[t] = encode_headers([("trace_id", t), ("source", source)])
                rows.append((i, keys[i], values[i], hb))
            for batch, members in sender.build(self.topic, partition, rows, timestamp):
                batches.append((batch, partition, members))
        sender.enqueue([b for b, _, _ in batches])
        try:
            producer.flush(timeout=self._delivery_timeout_s + 5)
        except KafkaTimeoutError:
            pass  # the batches still open are reported below, each of its events by index
        positions: dict[int, Position] = {}
        for batch, partition, members in batches:
            result = batch_result(batch)
            if result is None:
                for i in members:
                    failed[i] = "KafkaTimeoutError: not acknowledged within the delivery timeout"
                continue
            exc, base_offset, record_error = result
            if exc is not None:
                for i in members:
                    failed[i] = f"{type(exc).__name__}: {exc}"
                continue
            for index_in_batch, i in enumerate(members):
                if record_error is not None:
                    exc = record_error(index_in_batch)
                    failed[i] = f"{type(exc).__name__}: {exc}"
                else:
                    positions[i] = Position(partition, base_offset + index_in_batch)
        if failed:
            if any(not reason.startswith("MessageSizeTooLargeError") for reason in failed.values()):
                self._renew(producer)
            raise PublishError(failed, [r["event_id"] for r in records], positions)
        return [positions[i] for i in range(len(records))]

    def _renew(self, failed: KafkaProducer) -> None:
        """A new producer (a new producer id) in place of one whose batches failed.

        An idempotent kafka-python producer whose batch expired while in flight (a
        leader that appended it but could not reach min ISR, e.g. a cluster that lost
        its quorum) keeps that partition's sequence unresolved and sends nothing to it
        again, even once the cluster is whole (seen with kafka-python 3.0). A fresh
        producer id starts every sequence anew. Safe: what failed was not accepted and
        is sent again by the caller, and an unacknowledged copy that still lands is a
        repeated event_id, which every consumer drops. The old producer is closed once
        calls already using it have had their delivery timeout."""
        with self._renewing:
            if self._producer is not failed:
                return  # another call renewed it already
            self._producer = KafkaProducer(**self._config)
            self._sender = BatchSender(self._producer)
        threading.Thread(
            target=failed.close, kwargs={"timeout": self._delivery_timeout_s + 5}, daemon=True, name="nhdp-old-producer"
        ).start()

    def publish_json(
        self, events: Sequence[dict[str, Any]], pseudonymiser, *, trace_id: str | None = None
    ) -> list[Position]:
        """Validate and pseudonymise JSON-form events, then publish them all or none.

        Invalid input raises ValueError naming every bad event and reason before
        anything is sent: internal producers get the gateway's checks too."""

        records, problems = [], []
        for i, raw in enumerate(events):
            record, errors = checked_edge_record(raw, pseudonymiser)
            if errors:
                problems.append(f"#{i} {raw.get('event_id') if isinstance(raw, dict) else ''}: {'; '.join(errors)}")
            else:
                records.append(record)
        if problems:
            raise ValueError(f"{len(problems)} invalid event(s), nothing published: " + " | ".join(problems[:20]))
        return self.publish_many(records, trace_id=trace_id, validated=True)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

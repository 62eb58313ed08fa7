"""The log's names and how it is keyed: topics, consumer groups, the partitioner (DESIGN §3).

Every process that reads or writes Kafka learns these names here, not from
the module that runs the local broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TOPIC_EVENTS = "health.events"  # the log of record
TOPIC_DLQ = "health.events.dlq"
PROJECTOR_GROUP = "nhdp-projector"  # the stream workers (PostgreSQL projections)
ANALYTICS_GROUP = "nhdp-analytics"  # the ClickHouse sink
FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}


def dlq_headers(
    headers: list[tuple[str, bytes]] | None, reason: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """A dead letter's headers: the original ones plus why and where from, enough to find and replay it."""
    return list(headers or []) + [
        ("dlq_reason", reason.encode()),
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]


def province_topic(code: str) -> str:
    return f"province.{code}.events"


def contract_topics(partitions: int, province_codes: Sequence[str]) -> list[tuple[str, int, dict[str, str]]]:
    """(name, partitions, configs) of every topic the contract names; all kept forever."""
    return [
        (TOPIC_EVENTS, partitions, FOREVER),
        (TOPIC_DLQ, 1, FOREVER),
        *((province_topic(c), 1, FOREVER) for c in province_codes),
    ]


def partition_key(record: dict[str, Any]) -> bytes:
    et = record["event_type"]
    if et == "VaccineAllocated":
        return record["payload"]["allocation_id"].encode()
    if record.get("subject_id"):
        return record["subject_id"].encode()
    if et == "RecordVoided":
        return record["payload"]["voided_event_id"].encode()
    return record["event_id"].encode()


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2) of one key."""
    return int(murmur2_many([data])[0])


_M = np.uint32(0x5BD1E995)


def murmur2_many(keys: Sequence[bytes]) -> np.ndarray:
    """Kafka's murmur2 of many keys at once, as kafka-python's DefaultPartitioner
    computes it for one: keys of equal length (all subject_ids are 64 hex digits,
    all UUIDs 36 characters) are hashed together, a column of 4-byte words per
    step, in uint32 arithmetic that wraps exactly as Java's int does. Equality
    with kafka-python's is tested."""
    out = np.empty(len(keys), dtype=np.uint32)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    with np.errstate(over="ignore"):
        for length, indexes in by_length.items():
            raw = np.frombuffer(b"".join(keys[i] for i in indexes), dtype=np.uint8).reshape(len(indexes), length)
            n4 = length >> 2
            words = np.ascontiguousarray(raw[:, : n4 * 4]).view("<u4")
            h = np.full(len(indexes), 0x9747B28C ^ length, dtype=np.uint32)
            for j in range(n4):
                k = words[:, j] * _M
                k ^= k >> np.uint32(24)
                h = (h * _M) ^ (k * _M)
            extra = length & 3
            if extra:
                tail = raw[:, n4 * 4 :].astype(np.uint32)
                if extra == 3:
                    h ^= tail[:, 2] << np.uint32(16)
                if extra >= 2:
                    h ^= tail[:, 1] << np.uint32(8)
                h = (h ^ tail[:, 0]) * _M
            h ^= h >> np.uint32(13)
            h = h * _M
            out[indexes] = h ^ (h >> np.uint32(15))
    return out


def partitions_of(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition index (0..partitions-1) the Java client's default partitioner picks per key."""
    return ((murmur2_many(keys) & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).tolist()

"""Nothing lost, nothing silent (issue 5): bad messages on health.events go to the DLQ.

Hand-crafted messages are produced straight onto `health.events` with
kafka-python (no SDK, no gateway to stop them). Each must reach
`health.events.dlq` unchanged, with a `dlq_reason` header naming its problem
and `source_topic` / `source_partition` / `source_offset` headers saying
exactly where it came from; the worker must keep running and keep projecting.
Runs on the shared session stack: DLQ messages are matched by their origin.
"""

from __future__ import annotations

import struct
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from nhdp.stack import worker_service
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from schemas.topics import TOPIC_DLQ, TOPIC_EVENTS
from tests.helpers import api, wait_caught_up

pytestmark = pytest.mark.stack


def dose_record(**changes) -> dict:
    """A DoseAdministered in its Avro form (what the SDK would encode), with changes."""
    record = {
        "event_id": str(uuid.uuid4()),
        "event_type": "DoseAdministered",
        "occurred_at": 1_628_000_000_000,
        "province_code": "79",
        "source": "test-dlq",
        "subject_id": uuid.uuid4().hex * 2,
        "trace_id": None,
        "payload": {"site_id": "79-S0001", "vaccine": "pfizer", "lot_number": "FF2593", "dose_number": 1},
    }
    return {**record, **changes}


def read_dlq(settings) -> dict[tuple[str, int, int], object]:
    """Every DLQ message now on the topic, by its origin headers."""
    consumer = KafkaConsumer(**settings.kafka_python_config(), enable_auto_commit=False)
    try:
        tps = [TopicPartition(TOPIC_DLQ, p) for p in sorted(consumer.partitions_for_topic(TOPIC_DLQ))]
        ends = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out = {}
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError("DLQ not read to its end")
            for records in consumer.poll(timeout_ms=1000).values():
                for r in records:
                    h = {k: v for k, v in r.headers}
                    origin = (h["source_topic"].decode(), int(h["source_partition"]), int(h["source_offset"]))
                    out[origin] = r
        return out
    finally:
        consumer.close()


def test_bad_messages_reach_the_dlq_with_reason_and_origin_and_the_worker_keeps_going(stack_settings):
    settings = stack_settings
    worker = worker_service(settings)
    pid = worker.pid()
    assert pid is not None
    codec = Codec(RegistryClient.for_settings(settings))
    codec.register_catalog()
    good = codec.encode("DoseAdministered", dose_record())

    # name → (value, words the dlq_reason must contain)
    cases: dict[str, tuple[bytes | None, tuple[str, ...]]] = {
        "wrong magic byte": (b"\x01" + good[1:], ("undecodable", "magic byte")),
        "unknown schema id": (
            b"\x00" + struct.pack(">I", 987_654) + good[5:],
            ("undecodable", "unknown schema id 987654"),
        ),
        "truncated body": (good[: len(good) // 2], ("undecodable", "truncated")),
        "trailing garbage": (good + b"\x00\x01", ("undecodable", "trailing")),
        "shorter than a header": (b"\x00\x00", ("undecodable", "shorter than 5 bytes")),
        "tombstone": (None, ("undecodable", "None")),
        "not a province": (
            codec.encode("DoseAdministered", dose_record(province_code="99")),
            ("invalid", "province_code", "'99'"),
        ),
        "subject_id missing": (
            codec.encode("DoseAdministered", dose_record(subject_id=None)),
            ("invalid", "subject_id", "missing"),
        ),
        "event_id not a UUID": (
            codec.encode("DoseAdministered", dose_record(event_id="dose-42")),
            ("invalid", "UUID"),
        ),  # decodes; the router refuses it before any province copy
    }
    producer = KafkaProducer(**settings.kafka_python_config(), acks="all")
    try:
        futures = {
            name: producer.send(
                TOPIC_EVENTS,
                key=f"dlq-{name}".encode(),
                value=value,
                headers=[("source", b"test-dlq"), ("trace_id", name.encode())],
            )
            for name, (value, _) in cases.items()
        }
        producer.flush()
        origins = {name: (TOPIC_EVENTS, f.get(30).partition, f.get(30).offset) for name, f in futures.items()}
    finally:
        producer.close()

    # A good event after the bad ones: still projected.
    citizen = f"{uuid.uuid4().int % 10**12:012d}"
    later = {
        "event_id": str(uuid.uuid4()),
        "event_type": "DoseAdministered",
        "occurred_at": "2021-08-05T09:30:00+07:00",
        "province_code": "79",
        "source": "test-dlq",
        "payload": {
            "citizen_id": citizen,
            "site_id": "79-S0001",
            "vaccine": "pfizer",
            "lot_number": "FF2593",
            "dose_number": 1,
        },
    }
    pseudonymiser = Pseudonymiser.from_settings(settings)
    with EventProducer(settings, source="test-dlq") as sdk:
        sdk.publish_json([later], pseudonymiser)
    wait_caught_up(settings)

    dlq = read_dlq(settings)
    problems = []
    for name, (value, words) in cases.items():
        record = dlq.get(origins[name])
        if record is None:
            problems.append(f"{name}: not on {TOPIC_DLQ} (origin {origins[name]})")
            continue
        headers = {k: v for k, v in record.headers}
        reason = headers["dlq_reason"].decode()
        missing = [w for w in words if w not in reason]
        if missing:
            problems.append(f"{name}: dlq_reason {reason!r} lacks {missing}")
        if record.value != value or record.key != f"dlq-{name}".encode():
            problems.append(f"{name}: key or value changed on the way to the DLQ")
        if headers.get("trace_id") != name.encode() or headers.get("source") != b"test-dlq":
            problems.append(f"{name}: the original headers were not kept: {headers}")
    assert not problems, "\n".join(problems)
    assert len({dlq[o].offset for o in origins.values()}) == len(cases)

    assert worker.pid() == pid, "the worker restarted or died"
    record = api(settings).get(f"/v1/citizens/{pseudonymiser.subject_id(citizen)}/record", timeout=10)
    assert record.status_code == 200, record.text
    assert [d["event_id"] for d in record.json()["doses"]] == [later["event_id"]]

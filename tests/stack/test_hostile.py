"""Hostile input (issue 14, findings 1–3): nothing an attacker sends stops the pipeline.

Each of the events that used to stop a partition for good is refused at the
gateway with a field-level reason; produced straight to Kafka (as an internal
producer could), it is dead-lettered with a reason. So are a writer schema
whose name would have been code in the generated decoder and a decode bomb.
A valid event posted after them all is in the national summary and in the
ClickHouse analytics within 10 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import psycopg
import pytest
from kafka import KafkaProducer

from schemas import catalog
from schemas.registry_client import RegistryClient
from schemas.topics import TOPIC_EVENTS
from tests.helpers import api, post, valid_event
from tests.stack.test_dlq import dose_record, read_dlq

pytestmark = pytest.mark.stack

NUL_SITE = {"site_id": "79\x00-S1"}
HUGE = {"doses": 9223372036854775807}
ANCIENT = "1900-01-01T00:00:00+14:00"


def test_the_three_events_that_stopped_the_pipeline_are_refused_at_the_gateway(stack_settings):
    bad = [
        valid_event("DoseAdministered", **NUL_SITE),
        valid_event("VaccineAllocated", allocation_id="AL\x00-1"),
        valid_event("VaccineAllocated", **HUGE),
        {**valid_event("DoseAdministered"), "occurred_at": ANCIENT},
    ]
    answer = post(stack_settings, bad)
    assert answer.status_code == 200 and answer.json()["accepted"] == 0, answer.text
    errors = {r["index"]: r["errors"] for r in answer.json()["rejected"]}
    assert errors[0] == ["payload.site_id: must not contain control or bidirectional-override characters (U+0000 at 2)"]
    assert errors[1][0].startswith("payload.allocation_id: must not contain control")
    assert errors[2] == ["payload.doses: must be between 1 and 10000000, got 9223372036854775807"]
    assert errors[3] == ["occurred_at: is before the platform epoch 2020-01-01"]


def register_raw(settings, subject: str, schema: dict) -> int:
    """A schema row written straight into the registry's tables, past its name check: the attack of
    finding 2 assumes someone could, and the worker must still not run it."""
    text = json.dumps(schema)
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        schema_id = conn.execute(
            "INSERT INTO registry.schemas (fingerprint, canonical) VALUES (%s, %s) RETURNING id",
            (hashlib.sha256(text.encode()).digest(), text),
        ).fetchone()[0]
        version = conn.execute(
            "SELECT coalesce(max(version), 0) + 1 FROM registry.subject_versions WHERE subject = %s", (subject,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO registry.subject_versions (subject, version, schema_id) VALUES (%s, %s, %s)",
            (subject, version, schema_id),
        )
    return schema_id


def summary(settings) -> dict:
    answer = api(settings).get("/v1/national/summary", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def doses_on(settings, day: str, wait: float = 0) -> int:
    params = {"from": day, "to": day, "province": "79", "wait": wait}
    answer = api(settings).get("/v1/analytics/doses", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    return sum(r["doses"] for r in answer.json()["rows"])


def test_hostile_messages_on_the_log_are_dead_lettered_and_a_valid_event_still_lands(stack_settings, codec):
    settings = stack_settings
    codec.register_catalog()
    subject = catalog.subject_for("DoseAdministered")

    poc_name = "x'); __import__('os').system('touch /tmp/nhdp-pwned'); ('"
    poc = json.loads(json.dumps(catalog.current_schema("DoseAdministered")))
    poc["fields"].append({"name": "extra", "type": {"type": "fixed", "name": poc_name, "size": 1}, "default": "\u0000"})
    poc_id = register_raw(settings, subject, poc)
    bomb = {"type": "record", "name": "Bomb", "fields": [{"name": "items", "type": {"type": "array", "items": "null"}}]}
    with RegistryClient.for_settings(settings) as registry:
        bomb_id = registry.register("bomb-value", bomb)
    blocks = b"".join(bytes([0xC0, 0xA9, 0x07]) for _ in range(100)) + b"\x00"  # 100 blocks of 60,000 nulls

    allocation = dose_record()
    allocation.update(event_type="VaccineAllocated", subject_id=None)
    allocation["payload"] = {"allocation_id": "AL-1", "vaccine": "pfizer", "recipient": "armed_forces", **HUGE}
    cases = {
        "NUL in site_id": (
            codec.encode("DoseAdministered", dose_record(payload={**dose_record()["payload"], **NUL_SITE})),
            "invalid: payload.site_id: must not contain control",
        ),
        "doses overflow": (codec.encode("VaccineAllocated", allocation), "invalid: payload.doses: must be between"),
        "occurred in 1900": (
            codec.encode("DoseAdministered", dose_record(occurred_at=-2208988800000 - 14 * 3600_000)),
            "invalid: occurred_at: is before the platform epoch",
        ),
        "schema name as code": (
            b"\x00" + poc_id.to_bytes(4, "big") + b"\x00" * 80,
            "is not a valid Avro name",
        ),
        "decode bomb": (
            b"\x00" + bomb_id.to_bytes(4, "big") + blocks,
            "it writes 'Bomb', which is not an event of the catalog",
        ),
    }
    producer = KafkaProducer(**settings.kafka_python_config(), acks="all")
    try:
        futures = {name: producer.send(TOPIC_EVENTS, key=name.encode(), value=v) for name, (v, _) in cases.items()}
        producer.flush()
        origins = {name: (TOPIC_EVENTS, f.get(30).partition, f.get(30).offset) for name, f in futures.items()}
    finally:
        producer.close()

    day = f"2020-0{random.randint(2, 9)}-{random.randint(10, 28)}"
    before_summary = summary(settings)["doses_administered"]
    before_analytics = doses_on(settings, day)
    good = valid_event("DoseAdministered")
    good["occurred_at"] = f"{day}T10:00:00+07:00"
    answer = post(settings, [good])
    assert answer.status_code == 200, answer.text

    started = time.monotonic()
    assert doses_on(settings, day, wait=10) == before_analytics + 1  # read-your-writes: no sleeping
    while summary(settings)["doses_administered"] != before_summary + 1:
        assert time.monotonic() - started < 10, "not in the live summary within 10 s"
        time.sleep(0.1)

    dlq = read_dlq(settings)
    for name, (_, words) in cases.items():
        record = dlq.get(origins[name])
        assert record is not None, f"{name}: not dead-lettered"
        reason = dict(record.headers)["dlq_reason"].decode()
        assert words in reason, f"{name}: {reason}"
    assert not os.path.exists("/tmp/nhdp-pwned")
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:  # the shared stack's catalog, as it was
        conn.execute("DELETE FROM registry.subject_versions WHERE schema_id = %s", (poc_id,))


def test_the_sdk_refuses_what_the_router_would_dead_letter(stack_settings):
    from producers.sdk import EventProducer
    from schemas.codec import CodecError

    record = dose_record(subject_id="A" * 64)
    with EventProducer(stack_settings, source="test-hostile") as sdk, pytest.raises(CodecError, match="subject_id"):
        sdk.publish_many([record])

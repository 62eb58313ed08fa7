"""A province's subscription (issue 5): `province.79.events` read by a stock Confluent consumer.

Runs on the shared session stack, whose log also holds other tests' events,
so the test counts only the event_ids it published itself (from a simulator
seed no other test uses) and checks the province of every message on the
topic, whoever published it.
"""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, DeserializingConsumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer

from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from schemas.topics import province_topic
from tests.helpers import registry_conf, wait_caught_up

pytestmark = pytest.mark.stack

SEED = 790_079  # a data set of this test's own: its event_ids appear nowhere else


def read_topic(settings, topic: str, timeout_s: float = 120) -> list:
    """Every message now on `topic`, decoded by confluent-kafka's AvroDeserializer."""
    consumer = DeserializingConsumer(
        {
            **settings.librdkafka_config(),
            "group.id": f"test-province-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "value.deserializer": AvroDeserializer(SchemaRegistryClient(registry_conf(settings))),
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending = {p for p, end in ends.items() if end > 0}
        messages = []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to their end {ends}")
            msg = consumer.poll(1.0)  # raises ConsumeError / ValueDeserializationError on an undecodable message
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            messages.append(msg)
            if msg.offset() >= ends[msg.partition()] - 1:
                pending.discard(msg.partition())
        return messages
    finally:
        consumer.close()


def test_province_79_stream_holds_exactly_hcmcs_events_in_standard_avro(stack_settings):
    settings = stack_settings
    sim = simulate("national", seed=SEED, days=1, daily_doses=3000)
    events = list(sim.events())
    pseudonymiser = Pseudonymiser.from_settings(settings)
    with EventProducer(settings, source="test-province-streams") as producer:
        for i in range(0, len(events), 5000):
            producer.publish_json(events[i : i + 5000], pseudonymiser)
    wait_caught_up(settings)  # the worker copies to province topics before it records the offsets

    mine = {e["event_id"]: e for e in events}
    hcmc = {eid for eid, e in mine.items() if e["province_code"] == "79"}
    assert 500 < len(hcmc) < len(mine)

    messages = read_topic(settings, province_topic("79"))
    others = [(m.offset(), m.value()["province_code"]) for m in messages if m.value()["province_code"] != "79"]
    assert not others, f"events of other provinces on {province_topic('79')}: {others[:10]}"

    seen = {}
    for m in messages:
        eid = str(m.value()["event_id"])  # the uuid logical type decodes to a uuid.UUID
        if eid in mine:
            seen.setdefault(eid, m)
    # every HCMC event the worker accepted (all of them: the set is valid), and nothing else of ours
    assert set(seen) == hcmc

    for eid, m in seen.items():
        value, sent = m.value(), mine[eid]
        assert value["event_type"] == sent["event_type"]
        assert "citizen_id" not in value["payload"], "personal data must never reach Kafka"
        citizen = sent["payload"].get("citizen_id")
        if citizen:
            subject = pseudonymiser.subject_id(citizen)
            assert value["subject_id"] == subject
            assert m.key() == subject.encode()  # keyed as on health.events
        headers = dict(m.headers() or [])
        assert headers.get("source") == b"test-province-streams" and headers.get("trace_id")

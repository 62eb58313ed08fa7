"""The real services of the session stack answer: Kafka, PostgreSQL."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from schemas.topics import TOPIC_DLQ, TOPIC_EVENTS, province_topic

pytestmark = pytest.mark.stack


def test_kafka_produce_and_consume_through_the_real_broker(stack_settings):
    topic = TOPIC_EVENTS
    marker = uuid.uuid4().hex.encode()
    producer = KafkaProducer(**stack_settings.kafka_python_config(), acks="all")
    meta = producer.send(topic, key=b"smoke", value=marker, headers=[("trace_id", b"t1")]).get(timeout=30)
    producer.close()

    consumer = KafkaConsumer(**stack_settings.kafka_python_config(), consumer_timeout_ms=10000)
    tp = TopicPartition(topic, meta.partition)
    consumer.assign([tp])
    consumer.seek(tp, meta.offset)
    got = next(iter(consumer))
    consumer.close()
    assert (got.key, got.value, got.headers) == (b"smoke", marker, [("trace_id", b"t1")])


def test_contract_topics_exist_with_forever_retention(stack_settings):
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(**stack_settings.kafka_python_config())
    try:
        topics = set(admin.list_topics())
        assert {TOPIC_EVENTS, TOPIC_DLQ, province_topic("79"), province_topic("01")} <= topics
        assert sum(t.startswith("province.") for t in topics) == 63
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, TOPIC_EVENTS)])
        assert described["topic"][TOPIC_EVENTS]["retention.ms"]["value"] == "-1"
    finally:
        admin.close()


def test_postgres_round_trips_rows(stack_settings):
    rows = [(i, f"province-{i:02d}", i * 1.5) for i in range(100)]
    with psycopg.connect(stack_settings.postgres_url) as conn:
        conn.execute("CREATE TEMP TABLE smoke (id int PRIMARY KEY, name text, x double precision)")
        with conn.cursor().copy("COPY smoke (id, name, x) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        got = conn.execute("SELECT id, name, x FROM smoke ORDER BY id").fetchall()
        user, version = conn.execute("SELECT current_user, current_setting('server_version_num')::int").fetchone()
    assert got == rows
    assert user == "nhdp"
    if stack_settings.local_postgres:
        assert version >= 180000

"""Kafka's boundary (issue 15): SASL/SCRAM sign-in and least-privilege ACLs, enforced by the broker.

A province's credential comes from `nhdp province grant 79 --json`, run as a
person would, and is used exactly as printed by a stock confluent-kafka
consumer with AvroDeserializer. Every denial is checked as the client sees it
(an error code), never inferred from silence: with `subscribe()` the broker's
refusal reaches the consumer (with `assign()` it would not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, DeserializingConsumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer

from infra.settings import CHECKOUT
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from schemas.topics import TOPIC_DLQ, TOPIC_EVENTS, province_topic
from tests.helpers import valid_event, wait_caught_up

pytestmark = pytest.mark.stack

SEED = 790_151  # this module's own data set


def nhdp(*args: str) -> subprocess.CompletedProcess:
    """The `nhdp` command against the session stack (its NHDP_* variables are in os.environ)."""
    return subprocess.run(
        [sys.executable, "-m", "nhdp.cli", *args], cwd=CHECKOUT, env=os.environ.copy(), capture_output=True, text=True
    )


def grant(code: str) -> dict:
    proc = nhdp("province", "grant", code, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def first_error(config: dict, topic: str, group: str, timeout_s: float = 30.0) -> KafkaError | None:
    """The first error a subscribed consumer with this configuration gets (None if it reads a message first)."""
    consumer = Consumer({**config, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            return msg.error()
        raise AssertionError(f"no message and no error on {topic} within {timeout_s}s")
    finally:
        consumer.close()


def produce_error(config: dict, topic: str) -> KafkaError | None:
    """The delivery report's error for one message produced with this configuration."""
    reports: list = []
    producer = Producer({**config, "message.timeout.ms": 15_000})
    producer.produce(topic, b"not an event", b"k", on_delivery=lambda err, msg: reports.append(err))
    producer.flush(30)
    assert len(reports) == 1, "no delivery report within 30 s"
    return reports[0]


def auth_errors(config: dict, timeout_s: float = 15.0) -> list[KafkaError]:
    """Errors a client gets while asking for metadata with this configuration (the metadata call must fail)."""
    errors: list[KafkaError] = []
    admin = AdminClient({**config, "error_cb": errors.append})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=timeout_s)
    admin.poll(1.0)  # error_cb is served from poll()
    return errors


@pytest.fixture(scope="module")
def province79(stack_settings):
    """Events of province 79 on the log (and copied to its topic), then its credential, as printed."""
    settings = stack_settings
    events = list(simulate("national", seed=SEED, days=1, daily_doses=600).events())
    with EventProducer(settings, source="test-kafka-access") as producer:
        producer.publish_json(events, Pseudonymiser.from_settings(settings))
    wait_caught_up(settings)
    ours = {e["event_id"] for e in events if e["province_code"] == "79"}
    assert ours, "the simulated day has events of province 79"
    yield grant("79"), ours
    nhdp("province", "revoke", "79")


def test_grant_prints_exactly_the_client_configuration(province79, stack_settings):
    config, _ = province79
    assert set(config) == {"kafka", "registry", "topic", "group_prefix"}
    assert set(config["kafka"]) == {
        "bootstrap.servers",
        "security.protocol",
        "sasl.mechanism",
        "sasl.username",
        "sasl.password",
    }
    assert config["kafka"]["sasl.username"] == "province_79"
    assert config["kafka"]["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["kafka"]["bootstrap.servers"] == stack_settings.kafka_bootstrap_servers
    user, _, password = config["registry"]["basic.auth.user.info"].partition(":")
    assert (user, password) == ("province_79", config["kafka"]["sasl.password"])
    assert config["topic"] == province_topic("79") and config["group_prefix"] == "province.79."


def test_a_stock_avro_consumer_reads_its_province_with_the_granted_configuration(province79):
    config, ours = province79
    consumer = DeserializingConsumer(
        {
            **config["kafka"],
            "group.id": f"{config['group_prefix']}test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "value.deserializer": AvroDeserializer(
                SchemaRegistryClient(
                    {
                        "url": config["registry"]["url"],
                        "basic.auth.user.info": config["registry"]["basic.auth.user.info"],
                    }
                )
            ),
        }
    )
    seen: set[str] = set()
    try:
        consumer.subscribe([config["topic"]])
        deadline = time.monotonic() + 120
        while not ours <= seen and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            assert msg.value()["province_code"] == "79"
            seen.add(str(msg.value()["event_id"]))
    finally:
        consumer.close()
    assert ours <= seen, f"{len(ours - seen)} of the {len(ours)} events of province 79 not read"


@pytest.mark.parametrize("topic", [province_topic("01"), TOPIC_EVENTS, TOPIC_DLQ])
def test_another_topic_is_refused_to_a_province(province79, topic):
    config, _ = province79
    error = first_error(config["kafka"], topic, f"{config['group_prefix']}test-{uuid.uuid4().hex[:8]}")
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


def test_a_group_outside_its_prefix_is_refused_to_a_province(province79):
    config, _ = province79
    error = first_error(config["kafka"], config["topic"], f"province.01.{uuid.uuid4().hex[:8]}")
    assert error is not None and error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED, error


def test_a_province_cannot_write_even_its_own_topic(province79):
    config, _ = province79
    error = produce_error(config["kafka"], config["topic"])
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


def test_without_credentials_a_client_cannot_connect(stack_settings):
    auth_errors({"bootstrap.servers": stack_settings.kafka_bootstrap_servers, "security.protocol": "PLAINTEXT"})


def test_a_wrong_password_is_refused(province79):
    config, _ = province79
    errors = auth_errors({**config["kafka"], "sasl.password": config["kafka"]["sasl.password"] + "x"})
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors


def test_revoke_refuses_the_old_credential_and_grant_rotates_it(stack_settings):
    old = grant("48")
    AdminClient(old["kafka"]).list_topics(timeout=15)  # it signs in
    new = grant("48")  # a second grant rotates: the old password stops working
    assert new["kafka"]["sasl.password"] != old["kafka"]["sasl.password"]
    assert any(e.code() == KafkaError._AUTHENTICATION for e in auth_errors(old["kafka"]))
    AdminClient(new["kafka"]).list_topics(timeout=15)  # the new one signs in
    proc = nhdp("province", "revoke", "48")
    assert proc.returncode == 0 and "revoked province_48" in proc.stdout, proc.stdout + proc.stderr
    assert any(e.code() == KafkaError._AUTHENTICATION for e in auth_errors(new["kafka"]))
    again = nhdp("province", "revoke", "48")
    assert again.returncode == 0 and "nothing to revoke" in again.stdout


@pytest.mark.parametrize("principal", ["gateway", "producer", "sink", "replay"])
def test_services_but_the_worker_cannot_write_province_topics(stack_settings, principal):
    error = produce_error(stack_settings.as_principal(principal).librdkafka_config(), province_topic("79"))
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


@pytest.mark.parametrize("principal", ["worker", "sink", "replay"])
def test_only_the_gateway_and_producers_write_the_log(stack_settings, principal):
    error = produce_error(stack_settings.as_principal(principal).librdkafka_config(), TOPIC_EVENTS)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


def test_the_producer_principal_publishes_through_the_idempotent_sdk(stack_settings, log):
    start, source = log.ends(), f"test-kafka-access-{uuid.uuid4().hex[:8]}"
    with EventProducer(stack_settings.as_principal("producer"), source=source) as producer:
        producer.publish_json([valid_event()], Pseudonymiser.from_settings(stack_settings))
    mine = [m for m in log.read(start) if dict(m.headers).get("source") == source.encode()]
    assert len(mine) == 1


def test_a_malformed_province_code_is_refused_with_the_reason(stack_settings):
    proc = nhdp("province", "grant", "7a")
    assert proc.returncode == 2 and "must be two digits" in proc.stderr, proc.stderr


@pytest.mark.parametrize("principal", ["gateway", "producer"])
def test_writers_cannot_read_the_log(stack_settings, principal):
    config = stack_settings.as_principal(principal).librdkafka_config()
    error = first_error(config, TOPIC_EVENTS, f"test-{uuid.uuid4().hex[:8]}")
    # refused at the group (it may use none) before the topic is even asked for
    assert error is not None and error.code() in (
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ), error


@pytest.mark.parametrize("principal", ["gateway", "producer", "replay"])
def test_only_the_worker_and_sink_write_the_dead_letters(stack_settings, principal):
    error = produce_error(stack_settings.as_principal(principal).librdkafka_config(), TOPIC_DLQ)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error

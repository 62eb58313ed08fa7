"""The event catalog end to end, against the real stack (issue 3).

Real registry, real Kafka, real PostgreSQL behind the registry: nothing here is
mocked. What it proves:

- a stock Confluent client (confluent-kafka's SchemaRegistryClient with
  AvroSerializer/AvroDeserializer, TopicRecordNameStrategy) uses the ids our
  catalog registered and round-trips every event type through Kafka, and its
  bytes and our Codec's are interchangeable both ways;
- generated valid JSON events survive validate -> pseudonymise -> to_avro_record
  -> Codec.encode -> Kafka -> Codec.decode unchanged;
- schema evolution works for real: a v1 reader reads v2 data and a v2 reader v1
  data, with the writer schemas fetched by id from the registry; the registry
  refuses incompatible changes with 409 and names the field;
- random bodies behind a real registered id are a CodecError, never a crash.

Each test uses topics and registry subjects of its own (uuid suffix); the
catalog's own subjects are only read. The global compatibility level is only read.
"""

from __future__ import annotations

import copy
import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.settings import Settings
from producers.pseudonym import Pseudonymiser
from schemas import catalog
from schemas.catalog import EVENT_TYPES, current_schema, released_schemas
from schemas.codec import Codec, CodecError, SchemaCache, _strip_logical
from schemas.models import to_avro_record, to_epoch_millis, validate_event
from schemas.registry_client import RegistryClient, RegistryError
from tests.helpers import registry_auth, registry_conf
from tests.strategies import events

pytestmark = pytest.mark.stack

CT = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
V1_DOSE = released_schemas("DoseAdministered")[0][1]
V2_DOSE = current_schema("DoseAdministered")


# -- Kafka, for real ---------------------------------------------------------------------------


class Pipe:
    """A fresh single-partition topic with one producer and one consumer kept open.

    round_trip produces a batch (acks=all), then reads the topic forward until
    every message of the batch has come back, skipping anything older (left
    over from an earlier, failed call), and returns the messages in batch order.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(**settings.kafka_python_config(), client_id="nhdp-test-catalog")
        try:
            admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            admin.close()
        self.topic = topic
        self.producer = Producer(
            {**settings.librdkafka_config(), "acks": "all", "enable.idempotence": True, "linger.ms": 2}
        )
        self.consumer = Consumer(
            {
                **settings.librdkafka_config(),
                "group.id": f"test-catalog-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
            }
        )
        self.consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])

    def round_trip(self, messages: list[tuple[bytes | None, bytes]], timeout_s: float = 60.0) -> list[Any]:
        delivered: dict[int, int] = {}
        errors: list[Any] = []

        def on_delivery(i: int):
            def cb(err, msg):
                if err is not None:
                    errors.append(err)
                else:
                    delivered[i] = msg.offset()

            return cb

        for i, (key, value) in enumerate(messages):
            self.producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery(i))
        assert self.producer.flush(timeout_s) == 0, "produce did not complete"
        assert not errors, errors
        wanted = {offset: i for i, offset in delivered.items()}
        assert len(wanted) == len(messages)
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(wanted):
            assert time.monotonic() < deadline, f"only {len(got)} of {len(wanted)} messages came back"
            # Ask for no more than is missing: consume() waits until it has that many or times out.
            for msg in self.consumer.consume(num_messages=len(wanted) - len(got), timeout=0.5):
                assert msg.error() is None, msg.error()
                if msg.offset() in wanted:
                    got[wanted[msg.offset()]] = msg
        return [got[i] for i in range(len(messages))]

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(10)
        self.producer.close()  # its threads stop now, not whenever it is collected


@pytest.fixture(scope="module")
def pipes(stack_settings) -> Iterator[Any]:
    opened: list[Pipe] = []

    def make(prefix: str) -> Pipe:
        pipe = Pipe(stack_settings, f"test.catalog.{prefix}.{uuid.uuid4().hex[:10]}")
        opened.append(pipe)
        return pipe

    yield make
    for pipe in opened:
        pipe.close()
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**stack_settings.kafka_python_config(), client_id="nhdp-test-catalog")
    try:
        admin.delete_topics([pipe.topic for pipe in opened])
    finally:
        admin.close()


@pytest.fixture(scope="module")
def registry(stack_settings) -> Iterator[RegistryClient]:
    with RegistryClient.for_settings(stack_settings) as client:
        yield client


@pytest.fixture(scope="module")
def catalog_ids(registry: RegistryClient) -> dict[str, int]:
    """The ids the stack registered for the catalog, found by lookup (never registering)."""
    return {t: registry.lookup(catalog.subject_for(t), current_schema(t)) for t in EVENT_TYPES}


@pytest.fixture(scope="module")
def pseudonymiser(stack_settings) -> Pseudonymiser:
    return Pseudonymiser.from_settings(stack_settings)


def header_id(data: bytes) -> int:
    assert data[0] == 0, data[:5]
    return int.from_bytes(data[1:5], "big")


def kafka_key(record: dict[str, Any]) -> bytes:
    """health.events keys: subject_id (allocation_id for allocations), else the event_id."""
    key = record["subject_id"] or record["payload"].get("allocation_id") or record["event_id"]
    return key.encode()


# -- the stock (logical-type) form of a record ---------------------------------------------------


def logical(schema: Any, value: Any) -> Any:
    """value (raw form: epoch millis, str uuids) as a stock Avro deserializer returns it:
    aware UTC datetimes for timestamp-millis, uuid.UUID for uuid. Written from the
    schema, independently of the codec's generated code."""
    if value is None:
        return None
    if isinstance(schema, list):  # our unions are ["null", X]
        (branch,) = [b for b in schema if b != "null"]
        return logical(branch, value)
    if isinstance(schema, dict):
        kind = schema.get("logicalType")
        if kind == "timestamp-millis":
            return EPOCH + timedelta(milliseconds=value)
        if kind == "uuid":
            return uuid.UUID(value)
        if schema.get("type") == "record":
            return {f["name"]: logical(f["type"], value[f["name"]]) for f in schema["fields"]}
        if schema.get("type") == "array":
            return [logical(schema["items"], v) for v in value]
        if isinstance(schema.get("type"), (dict, list)):
            return logical(schema["type"], value)
    return value


# -- sample events: every type, optional fields both set and absent ------------------------------


def sample_events() -> list[dict[str, Any]]:
    def ev(n: int, event_type: str, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "event_id": str(uuid.UUID(int=0x6F1C1E9E3B7B4A539D3E2F0C8B7F0000 + n)),
            "event_type": event_type,
            "occurred_at": f"2021-08-10T09:15:{n:02d}.123+07:00",
            "province_code": "79",
            "source": "Trạm Y tế Phường 12, Quận 3",
            "payload": payload,
            **extra,
        }

    dose_id = str(uuid.UUID(int=0x6F1C1E9E3B7B4A539D3E2F0C8B7F0009))
    return [
        ev(
            1,
            "HealthDeclarationSubmitted",
            {
                "citizen_id": "079123456789",
                "symptoms": ["fever", "cough"],
                "contact_with_confirmed_case": True,
                "channel": "app",
            },
            trace_id="trace-0001",
        ),
        ev(
            2,
            "HealthDeclarationSubmitted",
            {"citizen_id": "012345678", "symptoms": [], "contact_with_confirmed_case": False, "channel": "paper"},
        ),
        ev(
            3,
            "VaccinationRegistered",
            {
                "citizen_id": "079123456789",
                "birth_year": 1956,
                "sex": "female",
                "priority_group": "elderly_65_plus",
                "channel": "web",
            },
        ),
        ev(
            4,
            "AppointmentScheduled",
            {
                "citizen_id": "079123456789",
                "appointment_id": "APT-79-000123",
                "site_id": "79-760-0123",
                "slot_start": "2021-08-10T08:00:00+07:00",
                "slot_end": "2021-08-10T08:30:00.250+07:00",
                "dose_number": 2,
            },
        ),
        ev(5, "CheckedIn", {"citizen_id": "079123456789", "site_id": "79-760-0123", "appointment_id": "APT-79-000123"}),
        ev(6, "CheckedIn", {"citizen_id": "012345678", "site_id": "79-760-0123"}),
        ev(
            7,
            "DoseAdministered",
            {
                "citizen_id": "079123456789",
                "site_id": "79-760-0123",
                "vaccine": "astrazeneca",
                "lot_number": "ABV1234",
                "dose_number": 2,
                "vaccinator_id": "HW-00077",
            },
        ),
        ev(
            8,
            "DoseAdministered",
            {
                "citizen_id": "012345678",
                "site_id": "79-760-0123",
                "vaccine": "janssen",
                "lot_number": "J-55",
                "dose_number": 1,
            },
        ),
        ev(
            10,
            "AdverseEventReported",
            {
                "citizen_id": "079123456789",
                "severity": "serious",
                "dose_event_id": dose_id,
                "symptoms": ["anaphylaxis", "sốt cao"],
            },
        ),
        ev(11, "AdverseEventReported", {"citizen_id": "012345678", "severity": "mild", "symptoms": []}),
        ev(
            12,
            "VaccineAllocated",
            {
                "allocation_id": "ALLOC-2021-06-79-0001",
                "vaccine": "sinopharm",
                "doses": 804_000,
                "recipient": "province_health",
            },
        ),
        ev(
            13,
            "VaccineAllocated",
            {
                "allocation_id": "ALLOC-2021-06-79-0002",
                "vaccine": "sinopharm",
                "doses": 10_000_000,  # the largest allocation the bounds allow (schemas/bounds.py)
                "recipient": "armed_forces",
            },
        ),
        ev(14, "RecordVoided", {"voided_event_id": dose_id, "reason": "entered in error: wrong lot number"}),
    ]


def edge(ev: dict[str, Any], pseudonymiser: Pseudonymiser) -> tuple[Any, dict[str, Any]]:
    """What the gateway does: validate, then the Avro record with citizen_id pseudonymised."""
    validated, errors = validate_event(ev)
    assert validated is not None, errors
    citizen = validated.payload.get("citizen_id")
    return validated, to_avro_record(validated, pseudonymiser.subject_id(citizen) if citizen else None)


@pytest.fixture(scope="module")
def samples(pseudonymiser: Pseudonymiser) -> list[tuple[str, dict[str, Any]]]:
    out = [(ev["event_type"], edge(ev, pseudonymiser)[1]) for ev in sample_events()]
    assert {t for t, _ in out} == set(EVENT_TYPES)
    return out


# -- 1. the stock Confluent client against our registry ------------------------------------------


def stock_serdes(registry: dict[str, str]) -> tuple[dict[str, Any], Any, Any]:
    """Per type an AvroSerializer writing the catalog's current schema under the id our
    catalog registered (TopicRecordNameStrategy, lookup only: auto-register off, no
    latest-version override); one AvroDeserializer; the health.events value context."""
    from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient(registry)
    conf = {
        "auto.register.schemas": False,
        "use.latest.version": False,
        "subject.name.strategy": topic_record_subject_name_strategy,
    }
    serializers = {t: AvroSerializer(client, json.dumps(current_schema(t)), conf=conf) for t in EVENT_TYPES}
    deserializer = AvroDeserializer(SchemaRegistryClient(registry))
    # The subject comes from this context: health.events-vn.nhdp.events.<Type>, i.e. the
    # catalog's subjects, whichever Kafka topic the bytes then travel on.
    return serializers, deserializer, SerializationContext(catalog.TOPIC, MessageField.VALUE)


def test_stock_confluent_serdes_round_trip_every_type_through_kafka(stack_settings, pipes, samples, catalog_ids):
    serializers, deserializer, ctx = stock_serdes(registry_conf(stack_settings))
    versions_before = {
        t: httpx.get(
            f"{stack_settings.registry_url}/subjects/{catalog.subject_for(t)}/versions",
            auth=registry_auth(stack_settings),
        ).json()
        for t in EVENT_TYPES
    }

    stock_bytes = [serializers[t](record, ctx) for t, record in samples]
    for (t, _), data in zip(samples, stock_bytes):
        assert header_id(data) == catalog_ids[t], t  # the id our catalog registered, found by lookup

    pipe = pipes("stock")
    back = pipe.round_trip([(kafka_key(r), data) for (_, r), data in zip(samples, stock_bytes)])
    for (t, record), data, msg in zip(samples, stock_bytes, back):
        assert msg.value() == data and msg.key() == kafka_key(record)
        decoded = deserializer(msg.value(), ctx)
        assert decoded == logical(current_schema(t), record), t
        assert decoded["event_type"] == t and decoded["event_id"] == uuid.UUID(record["event_id"])

    # The serializers only looked ids up: the catalog's subjects are as the stack left them.
    for t in EVENT_TYPES:
        url = f"{stack_settings.registry_url}/subjects/{catalog.subject_for(t)}/versions"
        assert httpx.get(url, auth=registry_auth(stack_settings)).json() == versions_before[t]


def test_our_codec_and_the_stock_serdes_read_each_other(stack_settings, pipes, samples, catalog_ids):
    serializers, deserializer, ctx = stock_serdes(registry_conf(stack_settings))
    ours = Codec(RegistryClient.for_settings(stack_settings))
    ours_logical = Codec(RegistryClient.for_settings(stack_settings), logical_types=True)

    our_bytes = ours.encode_many(samples)
    stock_bytes = [serializers[t](record, ctx) for t, record in samples]
    # Same schema, same id, same datum: the very same bytes.
    assert our_bytes == stock_bytes

    pipe = pipes("mixed")
    keys = [kafka_key(r) for _, r in samples]
    back = pipe.round_trip(list(zip(keys, our_bytes)) + list(zip(keys, stock_bytes)))
    from_ours, from_stock = back[: len(samples)], back[len(samples) :]
    fresh = Codec(RegistryClient.for_settings(stack_settings))  # writer schemas fetched by id
    for (t, record), ours_msg, stock_msg in zip(samples, from_ours, from_stock):
        # Our bytes through the stock deserializer.
        assert deserializer(ours_msg.value(), ctx) == logical(current_schema(t), record), t
        # The stock serializer's bytes through our codec, raw and logical forms.
        assert fresh.decode(stock_msg.value()) == record, t
        assert ours_logical.decode(stock_msg.value()) == deserializer(stock_msg.value(), ctx), t
    assert fresh.decode_many([m.value() for m in from_stock]) == [r for _, r in samples]


# -- 2. property: JSON -> model -> Avro -> Kafka -> Avro -> the same record -------------------


@pytest.fixture(scope="module")
def property_rig(stack_settings, pipes) -> tuple[Pipe, Codec, Codec]:
    pipe = pipes("property")
    writer = Codec(RegistryClient.for_settings(stack_settings))
    reader = Codec(RegistryClient.for_settings(stack_settings))
    return pipe, writer, reader


# Every type at least once per example, plus a few more of any type.
batches = st.tuples(st.tuples(*(events(t) for t in EVENT_TYPES)), st.lists(events(), max_size=8)).map(
    lambda parts: [*parts[0], *parts[1]]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches)
def test_generated_events_survive_the_pipeline_unchanged(property_rig, pseudonymiser, catalog_ids, batch):
    pipe, writer, reader = property_rig
    validated, records = zip(*(edge(ev, pseudonymiser) for ev in batch))
    pairs = [(r["event_type"], r) for r in records]
    model_side = copy.deepcopy(list(records))

    encoded = writer.encode_many(pairs)
    assert [header_id(d) for d in encoded] == [catalog_ids[t] for t, _ in pairs]
    back = pipe.round_trip([(kafka_key(r), d) for r, d in zip(records, encoded)])
    assert [m.value() for m in back] == encoded
    decoded = reader.decode_many([m.value() for m in back])

    # Raw forms both sides (epoch millis, str uuids): the model-side record, unchanged.
    assert decoded == model_side
    assert list(records) == model_side  # encoding did not touch the caller's records
    for ev, v, d in zip(batch, validated, decoded):
        assert d["occurred_at"] == to_epoch_millis(v.occurred_at)
        assert d["event_id"] == str(uuid.UUID(ev["event_id"]))
        citizen = ev["payload"].get("citizen_id")
        assert d["subject_id"] == (pseudonymiser.subject_id(citizen) if citizen else None)
        assert "citizen_id" not in d["payload"]


# -- 3. evolution against the registry and Kafka ------------------------------------------------


def dose_records(pseudonymiser: Pseudonymiser) -> tuple[dict[str, Any], dict[str, Any]]:
    """A v2 DoseAdministered record (with vaccinator_id) and the v1 record of the same fact."""
    ev = next(e for e in sample_events() if e["event_type"] == "DoseAdministered" and "vaccinator_id" in e["payload"])
    v2 = edge(ev, pseudonymiser)[1]
    assert v2["payload"]["vaccinator_id"] == "HW-00077"
    v1 = {**v2, "payload": {k: v for k, v in v2["payload"].items() if k != "vaccinator_id"}}
    return v2, v1


def test_v1_and_v2_readers_read_each_others_data_via_registry_and_kafka(
    stack_settings, pipes, pseudonymiser, catalog_ids, registry
):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    url = stack_settings.registry_url
    pipe = pipes("evolution")
    # TopicRecordNameStrategy on the test topic, released history in order: v1, then v2.
    subject = f"{pipe.topic}-{catalog.record_name('DoseAdministered')}"
    v1_id = registry.register(subject, V1_DOSE)
    v2_id = registry.register(subject, V2_DOSE)  # accepted under the default BACKWARD_TRANSITIVE
    # A producer still on v1 registers it under the catalog's subject too: consumers decode only
    # schemas registered there (schemas/codec.py), whatever topic the bytes travel on.
    assert registry.register(catalog.subject_for("DoseAdministered"), V1_DOSE) == v1_id
    assert v2_id == catalog_ids["DoseAdministered"] != v1_id  # ids are global: same schema, same id
    assert httpx.get(f"{url}/subjects/{subject}/versions", auth=registry_auth(stack_settings)).json() == [1, 2]

    v2_record, v1_record = dose_records(pseudonymiser)
    writer_v2 = Codec(RegistryClient.for_settings(stack_settings))
    # A producer still on v1: its schema under the id the registry gave it.
    writer_v1 = Codec(
        RegistryClient.for_settings(stack_settings),
        schemas={"DoseAdministered": V1_DOSE},
        cache=SchemaCache(None, {v1_id: V1_DOSE}),
    )
    v2_bytes = writer_v2.encode("DoseAdministered", v2_record)
    v1_bytes = writer_v1.encode("DoseAdministered", v1_record)
    assert (header_id(v2_bytes), header_id(v1_bytes)) == (v2_id, v1_id)

    key = kafka_key(v2_record)
    from_v2, from_v1 = (m.value() for m in pipe.round_trip([(key, v2_bytes), (key, v1_bytes)]))

    # Fresh clients: each writer schema is fetched by id from the registry.
    reader_v1 = Codec(RegistryClient.for_settings(stack_settings), schemas={"DoseAdministered": V1_DOSE})
    reader_v2 = Codec(RegistryClient.for_settings(stack_settings))
    assert reader_v1.decode(from_v2) == v1_record  # v1 reader, v2 data: vaccinator_id dropped
    assert reader_v1.decode(from_v1) == v1_record
    assert reader_v2.decode(from_v1) == {**v1_record, "payload": {**v1_record["payload"], "vaccinator_id": None}}
    assert reader_v2.decode(from_v2) == v2_record
    assert reader_v2.decode_many([from_v1, from_v2, from_v1])[1] == v2_record

    # The stock deserializer resolves the same way when given a reader schema.
    ctx = SerializationContext(pipe.topic, MessageField.VALUE)
    stock_v1 = AvroDeserializer(SchemaRegistryClient(registry_conf(stack_settings)), json.dumps(V1_DOSE))
    stock_v2 = AvroDeserializer(SchemaRegistryClient(registry_conf(stack_settings)), json.dumps(V2_DOSE))
    assert stock_v1(from_v2, ctx) == logical(V1_DOSE, v1_record)
    assert stock_v2(from_v1, ctx)["payload"]["vaccinator_id"] is None


def _without(schema: dict[str, Any], field: str) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    payload = out["fields"][-1]["type"]
    payload["fields"] = [f for f in payload["fields"] if f["name"] != field]
    return out


def _retyped(schema: dict[str, Any], field: str, new_type: Any) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    for f in out["fields"][-1]["type"]["fields"]:
        if f["name"] == field:
            f["type"] = new_type
    return out


def _post_schema(client: httpx.Client, subject: str, schema: dict[str, Any]) -> httpx.Response:
    return client.post(f"/subjects/{subject}/versions", json={"schema": json.dumps(schema)})


@pytest.mark.parametrize("level", ["FORWARD", "FULL"])
def test_registry_refuses_removing_a_required_field_under_forward_and_full(stack_settings, level):
    subject = f"test.catalog.{level.lower()}-{uuid.uuid4().hex[:10]}-{catalog.record_name('DoseAdministered')}"
    with httpx.Client(
        base_url=stack_settings.registry_url, headers=CT, timeout=30.0, auth=registry_auth(stack_settings)
    ) as reg:
        assert reg.put(f"/config/{subject}", json={"compatibility": level}).json() == {"compatibility": level}
        assert _post_schema(reg, subject, V2_DOSE).status_code == 200

        r = _post_schema(reg, subject, _without(V2_DOSE, "lot_number"))
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["error_code"] == 409
        assert "payload.lot_number" in body["message"] and level in body["message"], body
        assert "READER_FIELD_MISSING_DEFAULT_VALUE" in body["message"], body
        assert reg.get(f"/subjects/{subject}/versions").json() == [1]  # nothing was registered
        # The optional field may go: old readers have its default.
        assert _post_schema(reg, subject, _without(V2_DOSE, "vaccinator_id")).status_code == 200


def test_registry_refuses_a_changed_type_under_the_default_backward_transitive(stack_settings, registry):
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    url = stack_settings.registry_url
    subject = f"test.catalog.retype-{uuid.uuid4().hex[:10]}-{catalog.record_name('DoseAdministered')}"
    registry.register(subject, V1_DOSE)
    registry.register(subject, V2_DOSE)
    # No subject level set: the global default applies, and it is the contract's.
    level = httpx.get(
        f"{url}/config/{subject}", params={"defaultToGlobal": "true"}, auth=registry_auth(stack_settings)
    ).json()["compatibilityLevel"]
    assert level == "BACKWARD_TRANSITIVE"

    retyped = _retyped(V2_DOSE, "dose_number", "string")
    with pytest.raises(RegistryError) as info:
        registry.register(subject, retyped)
    assert info.value.status == 409 and info.value.error_code == 409
    message = str(info.value)
    assert "payload.dose_number" in message and "TYPE_MISMATCH" in message and "BACKWARD_TRANSITIVE" in message, message
    assert "version 1" in message and "version 2" in message, message  # transitive: checked against both

    # The stock client sees the same refusal.
    with pytest.raises(SchemaRegistryError) as stock:
        SchemaRegistryClient(registry_conf(stack_settings)).register_schema(
            subject, Schema(json.dumps(retyped), "AVRO")
        )
    assert stock.value.http_status_code == 409 and "dose_number" in stock.value.error_message

    # A type the old data can be promoted to is not a break (int -> long).
    widened = _retyped(V2_DOSE, "dose_number", "long")
    r = httpx.post(
        f"{url}/compatibility/subjects/{subject}/versions",
        json={"schema": json.dumps(widened)},
        headers=CT,
        auth=registry_auth(stack_settings),
    )
    assert r.json() == {"is_compatible": True}
    assert httpx.get(f"{url}/subjects/{subject}/versions", auth=registry_auth(stack_settings)).json() == [1, 2]


# -- 4. decoder fuzz behind a real registered id ----------------------------------------------


@pytest.fixture(scope="module")
def fuzz_codec(stack_settings) -> Codec:
    return Codec(RegistryClient.for_settings(stack_settings))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EVENT_TYPES), st.binary(max_size=200))
def test_random_body_behind_a_real_registered_id_is_a_codec_error(fuzz_codec, catalog_ids, event_type, body):
    data = b"\x00" + catalog_ids[event_type].to_bytes(4, "big") + body
    try:
        record = fuzz_codec.decode(data)
    except CodecError as e:
        assert e.schema_id == catalog_ids[event_type]
        return
    # Rarely the garbage is a well-formed datum (e.g. zeros: empty strings, nulls).
    # Then it must be a complete record that writes and reads back the same.
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(_strip_logical(current_schema(event_type))), record)
    assert fuzz_codec.decode(data[:5] + buf.getvalue()) == record


def test_an_id_the_registry_never_gave_is_a_codec_error(stack_settings, fuzz_codec, samples, catalog_ids):
    some_id = catalog_ids[samples[0][0]]
    max_id = httpx.get(
        f"{stack_settings.registry_url}/schemas/ids/{some_id}",
        params={"fetchMaxId": "true"},
        auth=registry_auth(stack_settings),
    ).json()["maxId"]
    good = fuzz_codec.encode(*samples[0])
    bad = b"\x00" + (max_id + 1_000_000).to_bytes(4, "big") + good[5:]
    with pytest.raises(CodecError, match="not in the registry"):
        fuzz_codec.decode(bad)
    out = fuzz_codec.decode_many_lenient([good, bad, good])
    assert out[0] == out[2] == samples[0][1] and isinstance(out[1], CodecError) and out[1].index == 1

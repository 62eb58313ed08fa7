"""`POST /v1/events` against the real stack (DESIGN §2, §5): the answer for every event,
exactly the accepted events in `health.events` once each, pseudonymised, decodable;
re-sends; requests that cannot be taken; Kafka stopped and started again under it.

Everything goes through the session stack's API over HTTP and is checked by reading
the topic back with a plain Kafka consumer, from the end offsets taken before the
request. Tests in one session run one at a time, so the range holds only what the
test's own requests published.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2 as kafka_murmur2

from infra import kafka as kafka_infra
from producers.client import GatewayClient, Tally
from schemas import catalog
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from schemas.topics import TOPIC_EVENTS

pytestmark = pytest.mark.stack

TRACE = "trace-" + uuid.uuid4().hex[:12]
CONFLICT = (
    "event_id: already accepted with different content; a correction is a RecordVoided of the "
    "original plus a new event with a new event_id"
)
REPEATED = "event_id: repeated in this request with different content"
HCM = timezone(timedelta(hours=7))


# -- helpers shared with test_ingest_cli.py and test_personal_data.py ----------------------------


_SYSTEM_RANDOM = random.SystemRandom()


def citizen_id(rng: random.Random = _SYSTEM_RANDOM) -> str:
    """A fresh 12-digit national id (12 digits: it will not turn up by chance in a byte scan)."""
    return f"{rng.randrange(10**11, 10**12)}"


def subject_of(settings, cid: str) -> str:
    """subject_id computed independently of producers/pseudonym.py: HMAC-SHA256 under the secret."""
    return hmac.new(settings.pseudonym_secret.encode(), cid.encode(), hashlib.sha256).hexdigest()


def ts(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def millis(text: str) -> int:
    """Epoch milliseconds, exactly (integer arithmetic, as Avro timestamp-millis stores them)."""
    return (datetime.fromisoformat(text) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def valid_event(event_type: str = "DoseAdministered", cid: str | None = None, **payload: Any) -> dict[str, Any]:
    """A valid JSON-form event of any type, with a fresh event_id."""
    cid = cid or citizen_id()
    at = datetime(2021, 8, 10, 9, 30, tzinfo=HCM) + timedelta(seconds=random.randrange(86_400))
    base: dict[str, dict[str, Any]] = {
        "HealthDeclarationSubmitted": {
            "citizen_id": cid,
            "symptoms": ["fever", "cough"],
            "contact_with_confirmed_case": False,
            "channel": "app",
        },
        "VaccinationRegistered": {
            "citizen_id": cid,
            "birth_year": 1980,
            "sex": "female",
            "priority_group": "elderly_65_plus",
            "channel": "web",
        },
        "AppointmentScheduled": {
            "citizen_id": cid,
            "appointment_id": "AP-" + uuid.uuid4().hex[:10],
            "site_id": "79-760-0001",
            "slot_start": ts(at + timedelta(days=1)),
            "slot_end": ts(at + timedelta(days=1, minutes=30)),
            "dose_number": 1,
        },
        "CheckedIn": {"citizen_id": cid, "site_id": "79-760-0001", "appointment_id": None},
        "DoseAdministered": {
            "citizen_id": cid,
            "site_id": "79-760-0001",
            "vaccine": "astrazeneca",
            "lot_number": "ABV5811",
            "dose_number": 1,
        },
        "AdverseEventReported": {
            "citizen_id": cid,
            "severity": "mild",
            "dose_event_id": str(uuid.uuid4()),
            "symptoms": ["headache"],
        },
        "VaccineAllocated": {
            "allocation_id": "AL-" + uuid.uuid4().hex[:10],
            "vaccine": "pfizer",
            "doses": 30_000,
            "recipient": "armed_forces",
        },
        "RecordVoided": {"voided_event_id": str(uuid.uuid4()), "reason": "entered in error: wrong person"},
    }
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": ts(at),
        "province_code": "79",
        "source": "site-79-760",
        "payload": {**base[event_type], **payload},
    }


def post(settings, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    content = raw if raw is not None else orjson.dumps(body)
    return httpx.post(
        f"{settings.api_url}/v1/events",
        content=content,
        timeout=120,
        headers={"content-type": "application/json", **(headers or {})},
    )


class TopicLog:
    """health.events read back with a plain consumer: end offsets, and every message between two positions."""

    def __init__(self, settings, topic: str = TOPIC_EVENTS):
        self.settings, self.topic = settings, topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False, request_timeout_ms=20_000
        )
        self.parts = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic))]

    def ends(self) -> dict[int, int]:
        return {tp.partition: o for tp, o in self.consumer.end_offsets(self.parts).items()}

    def read(self, start: dict[int, int], end: dict[int, int] | None = None, timeout_s: float = 60):
        end = end or self.ends()
        wanted = [tp for tp in self.parts if end[tp.partition] > start[tp.partition]]
        self.consumer.assign(wanted)
        for tp in wanted:
            self.consumer.seek(tp, start[tp.partition])
        out, deadline = [], time.monotonic() + timeout_s
        while any(self.consumer.position(tp) < end[tp.partition] for tp in wanted):
            assert time.monotonic() < deadline, f"could not read {self.topic} up to {end} in {timeout_s}s"
            for tp, msgs in self.consumer.poll(timeout_ms=500).items():
                out += [m for m in msgs if m.offset < end[tp.partition]]
        return out

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def log(stack_settings):
    topic_log = TopicLog(stack_settings)
    yield topic_log
    topic_log.close()


@pytest.fixture(scope="module")
def codec(stack_settings):
    return Codec(RegistryClient(stack_settings.registry_url))


def expected_key(event: dict[str, Any], settings) -> bytes:
    p = event["payload"]
    if event["event_type"] == "VaccineAllocated":
        return p["allocation_id"].encode()
    if "citizen_id" in p:
        return subject_of(settings, p["citizen_id"]).encode()
    return p["voided_event_id"].encode()


def assert_published_exactly(
    messages, events: list[dict[str, Any]], settings, codec: Codec, trace_id: str | None = None
) -> None:
    """messages are exactly `events`, once each, in the Confluent wire format, pseudonymised."""
    decoded = codec.decode_many([m.value for m in messages])
    counts = Counter(d["event_id"] for d in decoded)
    assert counts == Counter(e["event_id"] for e in events), "not exactly the accepted events, once each"
    by_id = {e["event_id"]: e for e in events}
    for m, d in zip(messages, decoded):
        e = by_id[d["event_id"]]
        payload = dict(e["payload"])
        cid = payload.pop("citizen_id", None)
        for name in ("slot_start", "slot_end"):
            if name in payload:
                payload[name] = millis(payload[name])
        assert m.value[0] == 0
        assert int.from_bytes(m.value[1:5], "big") == codec.schema_id(e["event_type"])
        # Optional fields the event left out (vaccinator_id since v2) come back as their default, None.
        payload = {**{k: None for k in d["payload"] if k not in payload}, **payload}
        assert d == {
            "event_id": e["event_id"],
            "event_type": e["event_type"],
            "occurred_at": millis(e["occurred_at"]),
            "province_code": e["province_code"],
            "source": e["source"],
            "subject_id": subject_of(settings, cid) if cid else None,
            "trace_id": d["trace_id"],
            "payload": payload,
        }
        assert "citizen_id" not in d["payload"]
        if cid:
            assert cid.encode() not in m.value and cid.encode() not in (m.key or b"")
        assert m.key == expected_key(e, settings)
        # The partition any Kafka client would pick for the key (Java's murmur2): a subject's
        # events share one partition whoever produced them.
        assert m.partition == (kafka_murmur2(m.key) & 0x7FFFFFFF) % settings.kafka_partitions
        headers = dict(m.headers)
        assert headers["source"] == b"gateway"
        if trace_id:
            assert d["trace_id"] == trace_id and headers["trace_id"] == trace_id.encode()


def test_the_sdks_shortcuts_compute_what_kafka_python_would():
    """producers/sdk.py picks partitions itself with a vectorised murmur2, writes record
    batches itself and gives kafka-python a compiled CRC-32C: each must give kafka-python's
    own results, byte for byte."""
    import os

    from kafka.record import default_records, util
    from kafka.record.memory_records import MemoryRecordsBuilder

    from producers.sdk import BATCH_BYTES, build_batches, encode_headers
    from schemas.topics import murmur2, murmur2_many

    rng = random.Random(4)
    keys = [os.urandom(rng.randrange(0, 80)) for _ in range(5000)]
    keys += [hashlib.sha256(str(i).encode()).hexdigest().encode() for i in range(5000)]  # subject_ids
    expected = [kafka_murmur2(k) for k in keys]
    assert [murmur2(k) for k in keys] == expected
    assert murmur2_many(keys).tolist() == expected
    for size in (0, 1, 7, 61, 4096, 100_003):
        data = os.urandom(size)
        assert default_records.calc_crc32c(memoryview(data)) == util.crc32c_py(data)

    # Enough rows for several batches, with values past the varint table's 16 KiB.
    rows, headers = [], []
    for i in range(2500):
        h = [("trace_id", os.urandom(rng.randrange(0, 40))), ("source", b"nhdp-sdk")]
        headers.append(h)
        rows.append(
            (i, os.urandom(rng.randrange(0, 70)), os.urandom(rng.choice([0, 200, 900, 20_000])), encode_headers(h))
        )
    for compression in (0, 3):  # none, lz4
        built = build_batches(rows, 1_624_000_000_000, {"message_version": 2, "compression_attrs": compression})
        assert len(built) > 1 and [i for members, _ in built for i in members] == list(range(len(rows)))
        sequence = 0
        for members, ours in built:
            theirs = MemoryRecordsBuilder(2, compression, BATCH_BYTES)
            for i in members:
                assert theirs.append(1_624_000_000_000, rows[i][1], rows[i][2], headers[i]) is not None
            for builder in (ours, theirs):
                builder.set_producer_state(7, 1, sequence, False)
                builder.close()
            assert bytes(ours.records().next_batch()._buffer) == bytes(theirs.records().next_batch()._buffer)
            sequence += len(members)


# -- 1. one request, every kind of answer ---------------------------------------------------------


def invalid_events() -> list[tuple[dict[str, Any], list[str]]]:
    """Invalid events with the exact errors the gateway must give for each."""

    def dose(**payload):
        return valid_event("DoseAdministered", **payload)

    unknown_type = valid_event()
    unknown_type["event_type"] = "VaccineTeleported"
    missing = dose()
    del missing["payload"]["lot_number"]
    no_source = dose()
    del no_source["source"]
    bad_province = dose()
    bad_province["province_code"] = "99"
    future = dose()
    future["occurred_at"] = ts(datetime.now(UTC) + timedelta(minutes=10))
    bad_uuid = dose()
    bad_uuid["event_id"] = "not-a-uuid"
    slot = valid_event(
        "AppointmentScheduled", slot_start="2021-08-12T09:30:00+07:00", slot_end="2021-08-12T09:00:00+07:00"
    )
    vaccines = "astrazeneca, pfizer, moderna, sinopharm, sputnik_v, janssen, abdala, hayat_vax, covaxin, novavax"
    return [
        (
            unknown_type,
            [
                "event_type: unknown event type 'VaccineTeleported'; expected one of "
                "HealthDeclarationSubmitted, VaccinationRegistered, AppointmentScheduled, CheckedIn, "
                "DoseAdministered, AdverseEventReported, VaccineAllocated, RecordVoided"
            ],
        ),
        (missing, ["payload.lot_number: field required"]),
        (no_source, ["source: field required"]),
        (dose(dose_number="2"), ["payload.dose_number: must be an integer"]),
        (dose(vaccine="sputnik"), [f"payload.vaccine: must be one of {vaccines}"]),
        (
            dose(vaccine="sputnik", dose_number=9),
            [f"payload.vaccine: must be one of {vaccines}", "payload.dose_number: must be between 1 and 5, got 9"],
        ),
        (
            bad_province,
            [
                "province_code: unknown province code '99'; expected one of the 63 two-digit codes of "
                "2008, e.g. '01' (Hà Nội) or '79' (Hồ Chí Minh City)"
            ],
        ),
        (future, ["occurred_at: is in the future (more than 5 minutes ahead of the server clock)"]),
        (slot, ["payload.slot_end: must be after slot_start"]),
        (bad_uuid, ["event_id: not a valid UUID"]),
        # 10 digits: one too many, and long enough that no random event_id in the answer holds it by chance
        (
            dose(citizen_id="0791234567"),
            ["payload.citizen_id: must be a 9- or 12-digit national identity number (digits only)"],
        ),
        ("not an object", ["event: must be a JSON object, got a string"]),
    ]


def test_mixed_batch_answers_every_event_and_publishes_exactly_the_valid_ones(stack_settings, log, codec):
    valid = [valid_event(t) for t in catalog.EVENT_TYPES] + [valid_event() for _ in range(4)]
    invalid = invalid_events()
    batch: list[Any] = []
    expected_rejected = []
    for k in range(max(len(valid), len(invalid))):  # interleaved
        if k < len(invalid):
            event, errors = invalid[k]
            event_id = event.get("event_id") if isinstance(event, dict) else None
            expected_rejected.append({"index": len(batch), "event_id": event_id, "errors": errors})
            batch.append(event)
        if k < len(valid):
            batch.append(valid[k])

    before = log.ends()
    resp = post(stack_settings, batch, headers={"x-trace-id": TRACE})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"accepted": len(valid), "duplicates": 0, "rejected": expected_rejected}
    # No answer echoes a national id, not even for a rejected event.
    for event, _ in invalid:
        if isinstance(event, dict) and "citizen_id" in event.get("payload", {}):
            assert event["payload"]["citizen_id"] not in resp.text

    messages = log.read(before)
    assert len(messages) == len(valid)
    assert_published_exactly(messages, valid, stack_settings, codec, trace_id=TRACE)

    # A stock Confluent deserializer pointed at the registry reads them too (DESIGN §3).
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    stock = AvroDeserializer(SchemaRegistryClient({"url": stack_settings.registry_url}))
    ctx = SerializationContext(TOPIC_EVENTS, MessageField.VALUE)
    assert sorted(str(stock(m.value, ctx)["event_id"]) for m in messages) == sorted(e["event_id"] for e in valid)


# -- 2. re-sends --------------------------------------------------------------------------------------


def respelled(event: dict[str, Any]) -> dict[str, Any]:
    """The same fact written differently: upper-case UUID, UTC offset Z, keys in another order."""
    out = {k: event[k] for k in reversed(list(event))}
    out["event_id"] = event["event_id"].upper()
    out["occurred_at"] = datetime.fromisoformat(event["occurred_at"]).astimezone(UTC).isoformat().replace("+00:00", "Z")
    out["payload"] = {k: event["payload"][k] for k in reversed(list(event["payload"]))}
    return out


def test_resending_accepted_events_answers_duplicates_and_publishes_nothing(stack_settings, log, codec):
    events = [
        valid_event(t)
        for t in ("VaccinationRegistered", "DoseAdministered", "DoseAdministered", "VaccineAllocated", "RecordVoided")
    ]
    before = log.ends()
    assert post(stack_settings, events).json() == {"accepted": 5, "duplicates": 0, "rejected": []}
    after_first = log.ends()

    assert post(stack_settings, events).json() == {"accepted": 0, "duplicates": 5, "rejected": []}
    assert post(stack_settings, [respelled(e) for e in events]).json() == {
        "accepted": 0,
        "duplicates": 5,
        "rejected": [],
    }
    # A different trace id (header) is not different content.
    assert post(stack_settings, events[:2], headers={"x-trace-id": "another"}).json() == {
        "accepted": 0,
        "duplicates": 2,
        "rejected": [],
    }
    assert log.ends() == after_first, "a re-send published something"

    # The same event_id with other content is a conflict, not a duplicate; the rest of the request goes on.
    changed = {**events[1], "payload": {**events[1]["payload"], "dose_number": 2}}
    fresh = valid_event()
    resp = post(stack_settings, [changed, fresh, events[2]])
    assert resp.json() == {
        "accepted": 1,
        "duplicates": 1,
        "rejected": [{"index": 0, "event_id": events[1]["event_id"], "errors": [CONFLICT]}],
    }

    assert_published_exactly(log.read(before), events + [fresh], stack_settings, codec)


def test_a_duplicate_inside_one_request(stack_settings, log, codec):
    a, b, c = valid_event(), valid_event("CheckedIn"), valid_event("HealthDeclarationSubmitted")
    b_changed = {**b, "payload": {**b["payload"], "site_id": "79-760-0002"}}
    before = log.ends()
    resp = post(stack_settings, [a, dict(a), b, b_changed, respelled(a), c])
    assert resp.json() == {
        "accepted": 3,
        "duplicates": 2,
        "rejected": [{"index": 3, "event_id": b["event_id"], "errors": [REPEATED]}],
    }
    messages = log.read(before)
    assert_published_exactly(messages, [a, b, c], stack_settings, codec)
    site = {d["event_id"]: d["payload"].get("site_id") for d in codec.decode_many([m.value for m in messages])}
    assert site[b["event_id"]] == "79-760-0001", "the first copy in the request is the one kept"


def test_an_empty_array_is_a_valid_request(stack_settings, log):
    before = log.ends()
    assert post(stack_settings, []).json() == {"accepted": 0, "duplicates": 0, "rejected": []}
    assert log.ends() == before


# -- 3. requests that cannot be taken -----------------------------------------------------------------


def raw_http(settings, head: str, chunks: list[bytes] = ()) -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket, for bodies an HTTP client would not send as asked."""
    sock = socket.create_connection((settings.api_host, settings.api_port), timeout=120)
    try:
        sock.sendall(head.encode())
        for chunk in chunks:
            sock.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, f"connection closed before a complete answer: {data!r}"
            data += more
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            more = sock.recv(65536)
            if not more:
                break
            body += more
        return int(lines[0].split()[1]), headers, body
    finally:
        sock.close()


def test_bodies_that_are_not_an_array_of_events_get_400(stack_settings):
    resp = post(stack_settings, None, raw=b'[{"event_id": "x", ')
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/json"
    assert re.fullmatch(r"body is not valid JSON: .+", resp.json()["error"])

    resp = post(stack_settings, {"events": [valid_event()]})
    assert resp.status_code == 400
    assert resp.json() == {"error": "body must be a JSON array of events, not an object"}


def test_too_many_events_or_too_many_bytes_get_413(stack_settings, log):
    from producers.gateway import MAX_BODY_BYTES, MAX_EVENTS

    assert (MAX_EVENTS, MAX_BODY_BYTES) == (10_000, 32 * 1024 * 1024)
    before = log.ends()
    resp = post(stack_settings, [valid_event() for _ in range(MAX_EVENTS + 1)])
    assert resp.status_code == 413
    assert resp.json() == {"error": "10,001 events in one request; the limit is 10,000"}
    assert log.ends() == before, "part of a refused request was published"

    # At the limit the request is taken and every event answered.
    resp = post(stack_settings, [{}] * MAX_EVENTS)
    assert resp.status_code == 200 and len(resp.json()["rejected"]) == MAX_EVENTS

    # Declared too large: refused from the headers, before the body is read.
    status, headers, body = raw_http(
        stack_settings,
        f"POST /v1/events HTTP/1.1\r\nHost: nhdp\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n",
    )
    assert (status, headers["content-type"]) == (413, "application/json")
    assert orjson.loads(body) == {"error": "body is 33,554,433 bytes; the limit is 33,554,432"}

    # Chunked, so no length up front: counted as it arrives.
    mib = b" " * (1024 * 1024)
    chunks = [b"%x\r\n[" % (len(mib) + 1) + mib + b"\r\n"]
    chunks += [b"%x\r\n" % len(mib) + mib + b"\r\n" for _ in range(30)]
    chunks += [b"%x\r\n" % len(mib) + mib + b"\r\n0\r\n\r\n"]  # crosses the limit, then ends the body
    status, headers, body = raw_http(
        stack_settings,
        "POST /v1/events HTTP/1.1\r\nHost: nhdp\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n",
        chunks,
    )
    assert status == 413
    assert orjson.loads(body) == {"error": "body is over 33,554,432 bytes, the limit"}
    assert log.ends() == before


def test_unknown_paths_get_404_json(stack_settings):
    for method, path in (("GET", "/v1/nowhere"), ("POST", "/v1/event"), ("GET", "/v2/events")):
        resp = httpx.request(method, f"{stack_settings.api_url}{path}", timeout=30)
        assert resp.status_code == 404
        assert resp.headers["content-type"] == "application/json"
        assert resp.json() == {"error": f"no such path: {method} {path}"}


def test_docs_and_openapi_are_served(stack_settings):
    docs = httpx.get(f"{stack_settings.api_url}/docs", timeout=30)
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text
    spec = httpx.get(f"{stack_settings.api_url}/openapi.json", timeout=30)
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert "post" in paths["/v1/events"]
    assert "10,000" in paths["/v1/events"]["post"]["description"]
    assert {"/v1/national/summary", "/v1/provinces/{code}/summary", "/healthz", "/metrics"} <= set(paths)


# -- 4. Kafka stopped under the gateway --------------------------------------------------------------


@pytest.fixture
def kafka_service(stack_settings):
    """The session stack's Kafka, running again after the test whatever happened in it;
    and the session's stream worker still the same process and caught up."""
    from nhdp import stack
    from tests.conftest import wait_caught_up

    svc = kafka_infra.service(stack_settings)
    worker = stack.worker_service(stack_settings)
    worker_pid = worker.pid()
    assert worker_pid is not None
    try:
        yield svc
    finally:
        svc.start(120)
    # The worker reconnected by itself: it projects what is published after the restart.
    resp, _ = wait_for_gateway(stack_settings, [valid_event()])
    assert resp.status_code == 200, resp.text
    wait_caught_up(stack_settings, timeout_s=240)
    assert worker.pid() == worker_pid, "the stream worker did not survive the Kafka restart"


def wait_for_gateway(settings, events, attempts: int = 90) -> tuple[httpx.Response, int]:
    """POST until the answer is not a 503 (bounded). Returns the last answer and the events
    that 503 answers said were accepted all the same (a broker still coming up can take
    part of a request: the re-send then answers those as duplicates)."""
    taken = 0
    for _ in range(attempts):
        resp = post(settings, events)
        if resp.status_code != 503:
            return resp, taken
        assert resp.headers["retry-after"] == "5"
        taken += resp.json().get("accepted", 0)
        time.sleep(2)
    pytest.fail(f"the gateway still answers 503 after {attempts} attempts: {resp.text}")


def seen(settings, events) -> int:
    with psycopg.connect(settings.postgres_url) as conn:
        return conn.execute(
            "SELECT count(*) FROM gateway.seen_events WHERE event_id = ANY(%s::uuid[])",
            ([e["event_id"] for e in events],),
        ).fetchone()[0]


def test_kafka_down_gets_503_then_the_same_request_succeeds_without_loss_or_duplicates(
    stack_settings, kafka_service, log, codec
):
    events = [valid_event(t) for t in catalog.EVENT_TYPES] + [valid_event() for _ in range(42)]
    invalid = dict(valid_event(), province_code="99")
    request = events + [invalid]
    before = log.ends()

    kafka_service.stop()
    resp = post(stack_settings, request)
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "5"
    assert resp.headers["content-type"] == "application/json"
    answer = resp.json()
    # Refused up front ("Kafka is unavailable; nothing … was published") or, if the broker went
    # away between the gateway's check and the send, after the delivery timeout; either way nothing taken.
    assert answer["error"].startswith("Kafka ") and "after 5 s" in answer["error"]
    assert answer.get("accepted", 0) == 0
    assert seen(stack_settings, events) == 0, "a refused request left reservations: its retry would be lost"

    kafka_service.start(120)
    resp, taken = wait_for_gateway(stack_settings, request)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "accepted": len(events) - taken,
        "duplicates": taken,
        "rejected": [
            {
                "index": len(events),
                "event_id": invalid["event_id"],
                "errors": [
                    "province_code: unknown province code '99'; expected one of the 63 two-digit codes of 2008, "
                    "e.g. '01' (Hà Nội) or '79' (Hồ Chí Minh City)"
                ],
            }
        ],
    }
    assert post(stack_settings, events).json() == {"accepted": 0, "duplicates": len(events), "rejected": []}
    assert_published_exactly(log.read(before), events, stack_settings, codec)


def test_gateway_client_rides_out_a_kafka_restart(stack_settings, kafka_service, log, codec):
    events = [valid_event(t) for t in catalog.EVENT_TYPES] + [valid_event() for _ in range(192)]
    before = log.ends()
    kafka_service.stop()
    restarted: list[BaseException] = []

    def restart_later():
        try:
            time.sleep(8)  # long enough for the client to meet at least one 503
            kafka_service.start(120)
        except BaseException as exc:
            restarted.append(exc)

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    client, tally = GatewayClient(stack_settings.api_url, max_wait_s=300), Tally()
    try:
        answer = client.post(events, tally)
    finally:
        client.close()
        thread.join(180)
    assert not restarted, restarted
    # Normally all accepted by the answer that succeeds; if a 503 during the broker's start-up
    # took part of the batch, the retry answers that part as duplicates. Never fewer, never twice:
    assert answer["accepted"] + answer["duplicates"] == len(events) and answer["rejected"] == []
    assert tally.retries >= 1
    assert_published_exactly(log.read(before), events, stack_settings, codec)

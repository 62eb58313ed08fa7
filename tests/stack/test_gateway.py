"""`POST /v1/events` against the real stack (DESIGN §2, §5): the answer for every event,
exactly the accepted events in `health.events` once each, pseudonymised, decodable;
re-sends; requests that cannot be taken; Kafka stopped and started again under it.

Everything goes through the session stack's API over HTTP and is checked by reading
the topic back with a plain Kafka consumer, from the end offsets taken before the
request. Tests in one session run one at a time, so the range holds only what the
test's own requests published. (The SDK's shortcuts, checked against kafka-python
without a broker, are in tests/unit/test_gateway.py.)
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from kafka.partitioner.default import murmur2 as kafka_murmur2

from infra import kafka as kafka_infra
from producers.client import GatewayClient, Tally
from schemas import catalog
from schemas.codec import Codec
from schemas.topics import TOPIC_EVENTS
from tests.helpers import CONFLICT, millis, post, registry_conf, subject_of, token, ts, valid_event, wait_caught_up

pytestmark = pytest.mark.stack

TRACE = "trace-" + uuid.uuid4().hex[:12]
REPEATED = "event_id: repeated in this request with different content"


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

    stock = AvroDeserializer(SchemaRegistryClient(registry_conf(stack_settings)))
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
    from producers.gateway import MAX_EVENTS

    MAX_BODY_BYTES = stack_settings.max_body_bytes
    assert (MAX_EVENTS, MAX_BODY_BYTES) == (10_000, 8 * 1024 * 1024)
    before = log.ends()
    resp = post(stack_settings, [valid_event() for _ in range(MAX_EVENTS + 1)])
    assert resp.status_code == 413
    assert resp.json() == {"error": "10,001 events in one request; the limit is 10,000"}
    assert log.ends() == before, "part of a refused request was published"

    # At the limit the request is taken and every event answered.
    resp = post(stack_settings, [{}] * MAX_EVENTS)
    assert resp.status_code == 200 and len(resp.json()["rejected"]) == MAX_EVENTS

    # Declared too large: refused from the headers, before the body is read.
    auth = f"Authorization: Bearer {token(stack_settings, 'producer', source='site-79-760')}\r\n"
    status, headers, body = raw_http(
        stack_settings,
        f"POST /v1/events HTTP/1.1\r\nHost: nhdp\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n",
    )
    assert (status, headers["content-type"]) == (413, "application/json")
    assert orjson.loads(body) == {"error": "body is 8,388,609 bytes; the limit is 8,388,608"}

    # Chunked, so no length up front: counted as it arrives.
    mib = b" " * (1024 * 1024)
    chunks = [b"%x\r\n[" % (len(mib) + 1) + mib + b"\r\n"]
    chunks += [b"%x\r\n" % len(mib) + mib + b"\r\n" for _ in range(MAX_BODY_BYTES // len(mib) - 2)]
    chunks += [b"%x\r\n" % len(mib) + mib + b"\r\n0\r\n\r\n"]  # crosses the limit, then ends the body
    status, headers, body = raw_http(
        stack_settings,
        f"POST /v1/events HTTP/1.1\r\nHost: nhdp\r\nContent-Type: application/json\r\n{auth}"
        "Transfer-Encoding: chunked\r\n\r\n",
        chunks,
    )
    assert status == 413
    assert orjson.loads(body) == {"error": "body is over 8,388,608 bytes, the limit"}
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
    # The gateway trusts a successful reachability probe for a second (EventProducer.reachable);
    # past it, the first request meets the stopped broker instead of riding out a short stop
    # inside delivery_timeout_ms, which a fast machine's restart fits in.
    time.sleep(1.5)
    restarted: list[BaseException] = []

    def restart_later():
        try:
            time.sleep(8)  # long enough for the client to meet at least one 503
            kafka_service.start(120)
        except BaseException as exc:
            restarted.append(exc)

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    tokens = lambda source: token(stack_settings, "producer", source=source)  # noqa: E731
    client, tally = GatewayClient(stack_settings.api_url, tokens, max_wait_s=300), Tally()
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

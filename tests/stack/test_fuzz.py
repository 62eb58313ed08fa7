"""Fuzzing at every boundary (issue 14): generated input, the real stack, no 500s, nothing stuck.

- the gateway's JSON: valid events with one part replaced by any JSON value,
  any JSON body, any bytes (3,000 cases);
- raw bytes on `health.events`: random bytes, valid messages cut or with bytes
  flipped, a catalog schema id over random bodies (3,000 cases); each is
  dead-lettered with a reason exactly when the router says so;
- the registry's schema bodies (1,500 cases);
- the query parameters of the summaries and the analytics (1,500 cases).

Each case gets a specific answer (a 2xx, or a 4xx naming the problem) or a DLQ
reason; then a valid event posted after them all appears in the summary and the
analytics. With tests/unit/test_fuzz_codec.py: more than 10,000 cases a run.
"""

from __future__ import annotations

import json
import time

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from schemas.topics import TOPIC_EVENTS
from streams.routing import Router
from tests.helpers import api, post, registry_auth, valid_event, wait_caught_up
from tests.stack.test_dlq import read_dlq
from tests.strategies import avro_records, broken_events, json_values

pytestmark = pytest.mark.stack

FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


# JSON numbers no 64-bit integer or double holds: a parser's edge, not the model's.
HUGE_NUMBERS = [b'[{"event_id": 1' + b"0" * 40 + b"}]", b"[1e999]", b"-" + b"9" * 400, b'{"a": ' * 2000]


def problems_of(answer: httpx.Response) -> list[str]:
    """What is wrong with one answer of the gateway to a fuzzed body; [] if it is a proper answer."""
    if answer.status_code >= 500:
        return [f"{answer.status_code}: {answer.text[:300]}"]
    body = answer.json()
    if answer.status_code != 200:
        return [] if body.get("error") else [f"{answer.status_code} without an error: {body}"]
    return [f"rejected without a reason: {r}" for r in body["rejected"] if not r.get("errors")]


def test_the_gateway_answers_every_generated_body(stack_settings):
    seen: list[str] = []

    @fuzz(2000)
    @given(st.lists(broken_events(), min_size=1, max_size=4))
    def json_bodies(batch):
        seen.extend(problems_of(post(stack_settings, batch)))

    @fuzz(1000)
    @given(st.binary(max_size=300) | json_values.map(orjson.dumps) | st.sampled_from(HUGE_NUMBERS))
    def raw_bodies(raw):
        seen.extend(problems_of(post(stack_settings, None, raw=raw)))

    json_bodies()
    raw_bodies()
    assert not seen, seen[:10]


@st.composite
def hostile_messages(draw, valid: list[bytes]) -> bytes:
    kind = draw(st.sampled_from(["random", "cut", "flipped", "body"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    good = draw(st.sampled_from(valid))
    if kind == "cut":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        return bytes(data)
    return good[:5] + draw(st.binary(max_size=120))


def test_raw_bytes_on_the_log_are_projected_or_dead_lettered_with_a_reason(stack_settings, codec):
    codec.register_catalog()
    valid: list[bytes] = []

    @fuzz(100)
    @given(avro_records())
    def collect(pair):
        valid.append(codec.encode(*pair))

    collect()
    messages: list[bytes] = []

    @fuzz(3000)
    @given(hostile_messages(valid))
    def generate(data):
        messages.append(data)

    generate()
    good, bad = Router(codec).split(messages)
    producer = KafkaProducer(**stack_settings.kafka_python_config(), acks="all", linger_ms=5)
    try:
        futures = [producer.send(TOPIC_EVENTS, key=b"fuzz", value=m) for m in messages]
        producer.flush()
        origins = [(TOPIC_EVENTS, f.get(30).partition, f.get(30).offset) for f in futures]
    finally:
        producer.close()
    a_valid_event_lands_after(stack_settings)
    # The valid event may sit in another partition than the fuzzed ones (key b"fuzz"), so its
    # landing does not say those were all routed: the tracking record does (DLQ sends are
    # acknowledged before it commits).
    wait_caught_up(stack_settings)
    dlq = read_dlq(stack_settings)
    expected = {origins[i]: reason for i, reason in bad}
    dead = {o: dict(dlq[o].headers)["dlq_reason"].decode() for o in origins if o in dlq}
    assert set(dead) == set(expected), "dead-lettered exactly the messages the router refuses"
    assert all(reason for reason in dead.values())
    assert len(good) + len(bad) == len(messages)


def test_the_registry_answers_every_generated_schema_body(stack_settings):
    seen: list[str] = []
    url = stack_settings.registry_url

    schemas = (
        json_values.map(json.dumps)
        | st.builds(
            lambda name, t: json.dumps({"type": "record", "name": name, "fields": [{"name": "f", "type": t}]}),
            st.text(max_size=30),
            json_values,
        )
        | st.text(max_size=200)
    )
    bodies = st.builds(lambda s: orjson.dumps({"schema": s}), schemas) | st.binary(max_size=200)

    with httpx.Client(timeout=30, auth=registry_auth(stack_settings)) as client:

        @fuzz(1500)
        @given(bodies, st.sampled_from(["versions", "", "compat"]))
        def one(body, path):
            target = {
                "versions": f"{url}/subjects/fuzz-value/versions",
                "": f"{url}/subjects/fuzz-value",
                "compat": f"{url}/compatibility/subjects/fuzz-value/versions/latest",
            }[path]
            answer = client.post(
                target, content=body, headers={"content-type": "application/vnd.schemaregistry.v1+json"}
            )
            if answer.status_code >= 500:
                seen.append(f"{answer.status_code} for {body[:80]!r}: {answer.text[:200]}")

        one()
    assert not seen, seen[:10]


def test_every_query_parameter_gets_an_answer_or_a_named_error(stack_settings):
    seen: list[str] = []
    params = st.text(max_size=30) | st.sampled_from(["2021-08-10", "2021-08-10T00:00:00+07:00", "79,01", "day", ""])
    paths = st.sampled_from(
        [
            ("/v1/national/summary", ["as_of"]),
            ("/v1/provinces", ["as_of"]),
            ("/v1/provinces/79/summary", ["as_of"]),
            ("/v1/analytics/doses", ["group_by", "from", "to", "province"]),
            ("/v1/analytics/coverage", ["by", "as_of"]),
        ]
    )

    with api(stack_settings, timeout=60) as client:

        @fuzz(1500)
        @given(paths, st.data())
        def one(path, data):
            route, names = path
            query = {n: data.draw(params) for n in names if data.draw(st.booleans())}
            answer = client.get(route, params=query)
            if answer.status_code >= 500:
                seen.append(f"{route} {query}: {answer.status_code} {answer.text[:200]}")
            elif answer.status_code >= 400 and not answer.json().get("error"):
                seen.append(f"{route} {query}: {answer.status_code} without a named error")

        one()
        path_codes = [
            client.get(f"/v1/provinces/{code}/summary").status_code for code in ["", "9", "99", "%00", "x" * 100]
        ]
    assert not seen, seen[:10]
    assert all(c < 500 for c in path_codes), path_codes


def a_valid_event_lands_after(settings_, timeout_s: float = 60) -> None:
    """A valid event posted now is in the live summary and the analytics within timeout_s."""
    event = valid_event("DoseAdministered")
    event["occurred_at"] = "2020-01-02T10:00:00+07:00"  # a day no other test writes
    before = api(settings_).get("/v1/national/summary", timeout=10).json()["doses_administered"]
    day = {"from": "2020-01-02", "to": "2020-01-02"}
    analytics_before = sum(
        r["doses"] for r in api(settings_).get("/v1/analytics/doses", params=day, timeout=10).json()["rows"]
    )
    answer = post(settings_, [event])
    assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
    deadline = time.monotonic() + timeout_s
    while True:
        live = api(settings_).get("/v1/national/summary", timeout=10).json()["doses_administered"]
        rows = api(settings_).get("/v1/analytics/doses", params=day, timeout=10).json()["rows"]
        if live >= before + 1 and sum(r["doses"] for r in rows) >= analytics_before + 1:
            return
        assert time.monotonic() < deadline, "a valid event after the fuzzed ones did not land"
        time.sleep(0.2)

"""The schema registry, as real processes against the session's real PostgreSQL.

Every test uses subjects of its own (uuid suffix): the database is shared by the
whole session. The global compatibility level is only read, never changed.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from infra.process import Managed
from infra.settings import CHECKOUT
from tests.helpers import private_data_dir, registry_auth, registry_conf

pytestmark = pytest.mark.stack

CT = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
NS = "vn.nhdp.test"


def record(name: str, fields: list[dict], **extra) -> str:
    return json.dumps({"type": "record", "name": name, "namespace": NS, "fields": fields, **extra})


def fresh(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}-value"


DOSE_V1 = [
    {"name": "event_id", "type": "string"},
    {"name": "subject_id", "type": "string"},
    {"name": "site_id", "type": "string"},
    {"name": "vaccine", "type": {"type": "enum", "name": "Vaccine", "symbols": ["pfizer", "moderna"]}},
    {"name": "dose_number", "type": "int"},
]


@pytest.fixture(scope="module")
def reg(stack_settings):
    with httpx.Client(
        base_url=stack_settings.registry_url, headers=CT, timeout=30.0, auth=registry_auth(stack_settings)
    ) as client:
        yield client


def post(client: httpx.Client, path: str, schema: str, **extra) -> httpx.Response:
    return client.post(path, json={"schema": schema, **extra})


def register(client: httpx.Client, subject: str, schema: str) -> dict:
    r = post(client, f"/subjects/{subject}/versions", schema)
    assert r.status_code == 200, r.text
    return r.json()


def set_level(client: httpx.Client, subject: str, level: str) -> None:
    r = client.put(f"/config/{subject}", json={"compatibility": level})
    assert r.status_code == 200 and r.json() == {"compatibility": level}, r.text


def assert_error(r: httpx.Response, status: int, code: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error_code"] == code, body
    for word in words:
        assert word in body["message"], body


# -- a second registry process on the same database -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def second_registry(stack_settings):
    """Another `python -m schemas.registry` on a free port, same PostgreSQL."""
    with private_data_dir("registry2") as home:
        yield from _second_registry(stack_settings, home)


def _second_registry(stack_settings, home: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = Managed(
        name="registry2",
        run_dir=home / "run",
        log_dir=home / "logs",
        command=[
            sys.executable,
            "-m",
            "schemas.registry",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--nhdp-data",
            str(home),
        ],
        marker=f"--nhdp-data {home}",
        ready=lambda: httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200,
        port=port,
        url=url,
        env={"NHDP_POSTGRES_DSN": stack_settings.postgres_url},
        cwd=CHECKOUT,
    )
    service.start(60)
    try:
        with httpx.Client(base_url=url, headers=CT, timeout=30.0, auth=registry_auth(stack_settings)) as client:
            yield client
    finally:
        service.stop()


# -- basics -------------------------------------------------------------------------------


def test_root_health_and_unknown_paths(reg):
    r = reg.get("/")
    assert r.status_code == 200 and r.json() == {}
    assert r.headers["content-type"].startswith("application/vnd.schemaregistry.v1+json")
    assert reg.get("/healthz").json()["status"] == "ok"
    assert_error(reg.get("/no/such/path"), 404, 404)
    assert reg.get("/schemas/types").json() == ["AVRO"]
    assert reg.get("/config").json()["compatibilityLevel"] == "BACKWARD_TRANSITIVE"


def test_register_is_idempotent_and_ids_follow_the_canonical_form(reg):
    subject, other = fresh(), fresh()
    schema = record("Dose", DOSE_V1)
    first = register(reg, subject, schema)
    assert first["version"] == 1
    assert register(reg, subject, schema)["id"] == first["id"]

    # Whitespace and key order do not matter...
    obj = json.loads(schema)
    shuffled = json.dumps(
        {
            "fields": [dict(reversed(list(f.items()))) for f in obj["fields"]],
            "namespace": NS,
            "name": "Dose",
            "type": "record",
        },
        indent=4,
    )
    again = register(reg, subject, shuffled)
    assert (again["id"], again["version"]) == (first["id"], 1)
    assert reg.get(f"/subjects/{subject}/versions").json() == [1]

    # ...the same schema under another subject has the same global id...
    assert register(reg, other, "\n " + schema)["id"] == first["id"]

    # ...but field order is part of the schema.
    swapped = record("Dose", [DOSE_V1[1], DOSE_V1[0], *DOSE_V1[2:]])
    second = register(reg, subject, swapped)
    assert second["id"] != first["id"] and second["version"] == 2

    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    assert reg.get(f"/schemas/ids/{first['id']}").json()["schema"] == canonical
    assert reg.get(f"/schemas/ids/{first['id']}/schema").json() == obj
    # (Other tests and runs may use the same schema: the database is shared.)
    pairs = reg.get(f"/schemas/ids/{first['id']}/versions").json()
    assert {(subject, 1), (other, 1)} <= {(p["subject"], p["version"]) for p in pairs}
    assert {subject, other} <= set(reg.get(f"/schemas/ids/{first['id']}/subjects").json())


def test_lookup_and_version_reads(reg):
    subject = fresh()
    v1 = record("Dose", DOSE_V1)
    v2 = record("Dose", DOSE_V1 + [{"name": "lot_number", "type": ["null", "string"], "default": None}])
    id1, id2 = register(reg, subject, v1)["id"], register(reg, subject, v2)["id"]

    r = post(reg, f"/subjects/{subject}", json.dumps(json.loads(v1), indent=2))
    assert r.status_code == 200
    assert r.json() == {
        "subject": subject,
        "version": 1,
        "id": id1,
        "schema": json.dumps(json.loads(v1), sort_keys=True, separators=(",", ":")),
    }
    assert post(reg, f"/subjects/{subject}?normalize=False&deleted=False", v2).json()["version"] == 2

    assert subject in reg.get("/subjects").json()
    assert subject in reg.get("/subjects", params={"subjectPrefix": subject[:10]}).json()
    assert reg.get("/subjects", params={"subjectPrefix": "no-such-prefix-" + uuid.uuid4().hex}).json() == []
    assert reg.get(f"/subjects/{subject}/versions").json() == [1, 2]
    latest = reg.get(f"/subjects/{subject}/versions/latest").json()
    assert (latest["version"], latest["id"], latest["subject"]) == (2, id2, subject)
    assert reg.get(f"/subjects/{subject}/versions/-1").json()["version"] == 2
    assert reg.get(f"/subjects/{subject}/versions/1").json()["id"] == id1
    assert reg.get(f"/subjects/{subject}/versions/1/schema").json() == json.loads(v1)
    assert reg.get(f"/subjects/{subject}/versions/2/referencedby").json() == []
    assert reg.get(f"/schemas/ids/{id2}", params={"subject": subject}).json()["schema"] == latest["schema"]
    assert reg.get(f"/schemas/ids/{id2}", params={"fetchMaxId": "true"}).json()["maxId"] >= id2


def test_error_codes(reg):
    subject = fresh()
    good = record("Dose", DOSE_V1)
    unknown = fresh("missing")

    assert_error(reg.get(f"/subjects/{unknown}/versions"), 404, 40401, unknown)
    assert_error(reg.get(f"/subjects/{unknown}/versions/latest"), 404, 40401)
    assert_error(post(reg, f"/subjects/{unknown}", good), 404, 40401, f"Subject '{unknown}' not found")
    assert_error(reg.delete(f"/subjects/{unknown}"), 404, 40401)
    assert_error(reg.get("/schemas/ids/2000000000"), 404, 40403)
    assert_error(reg.get("/schemas/ids/abc"), 404, 40403)

    register(reg, subject, good)
    other = record("Dose", DOSE_V1[:-1])
    assert_error(post(reg, f"/subjects/{subject}", other), 404, 40403)
    assert_error(reg.get(f"/subjects/{subject}/versions/99"), 404, 40402)
    for bad in ("0", "abc", "2147483648"):
        assert_error(reg.get(f"/subjects/{subject}/versions/{bad}"), 422, 42202)

    # Invalid schemas carry the parser's reason.
    bad_type = record("Dose", [{"name": "a", "type": "strnig"}])
    assert_error(post(reg, f"/subjects/{subject}/versions", bad_type), 422, 42201, "strnig")
    assert_error(post(reg, f"/subjects/{subject}/versions", "{not json"), 422, 42201, "not JSON")
    assert_error(post(reg, f"/subjects/{subject}", bad_type), 422, 42201)
    assert_error(reg.post(f"/subjects/{subject}/versions", json={}), 422, 42201)
    assert_error(reg.post(f"/subjects/{subject}/versions", content=b"{oops"), 400, 400)
    assert_error(
        post(reg, f"/subjects/{subject}/versions", 'syntax = "proto3"; message A {}', schemaType="PROTOBUF"),
        422,
        42201,
        "PROTOBUF",
    )
    assert_error(
        post(reg, f"/subjects/{subject}/versions", good, references=[{"name": "x", "subject": "y", "version": 1}]),
        422,
        42201,
        "references",
    )

    assert_error(reg.put(f"/config/{subject}", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    assert_error(reg.put("/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    assert_error(reg.get(f"/config/{subject}"), 404, 40408)
    assert_error(reg.delete(f"/config/{subject}"), 404, 40408)
    assert_error(post(reg, f"/compatibility/subjects/{unknown}/versions/latest", good), 404, 40401)
    assert_error(post(reg, f"/compatibility/subjects/{subject}/versions/7", good), 404, 40402)
    assert_error(reg.delete(f"/subjects/{subject}/versions/5"), 404, 40402)
    assert_error(reg.put("/mode", json={"mode": "IMPORT"}), 422, 42204)
    assert reg.get("/mode").json() == {"mode": "READWRITE"}


# -- compatibility ---------------------------------------------------------------------------

BASE = [{"name": "event_id", "type": "string"}, {"name": "dose_number", "type": "int"}]
CANDIDATES = {
    "add_optional": BASE + [{"name": "lot_number", "type": "string", "default": ""}],
    "add_required": BASE + [{"name": "vaccinator_id", "type": "string"}],
    "remove_required": BASE[:1],
    "change_type": [BASE[0], {"name": "dose_number", "type": "string"}],
}
EXPECTED = {  # level → candidates that must be accepted
    "BACKWARD": {"add_optional", "remove_required"},
    "FORWARD": {"add_optional", "add_required"},
    "FULL": {"add_optional"},
    "NONE": {"add_optional", "add_required", "remove_required", "change_type"},
}


@pytest.mark.parametrize("level", sorted(EXPECTED))
def test_compatibility_levels(reg, level):
    for name, fields in CANDIDATES.items():
        subject = fresh(f"compat-{level.lower()}")
        set_level(reg, subject, level)
        register(reg, subject, record("Dose", BASE))
        candidate = record("Dose", fields)
        ok = name in EXPECTED[level]

        r = post(reg, f"/compatibility/subjects/{subject}/versions/latest?verbose=true", candidate)
        assert r.status_code == 200 and r.json()["is_compatible"] is ok, (level, name, r.text)
        assert bool(r.json()["messages"]) is not ok
        assert post(reg, f"/compatibility/subjects/{subject}/versions/1", candidate).json() == {"is_compatible": ok}

        r = post(reg, f"/subjects/{subject}/versions", candidate)
        if ok:
            assert r.status_code == 200 and r.json()["version"] == 2, (level, name, r.text)
        else:
            assert_error(r, 409, 409, "incompatible", level)


def test_incompatible_messages_name_the_field(reg):
    subject = fresh()
    set_level(reg, subject, "BACKWARD")
    register(reg, subject, record("DoseAdministered", DOSE_V1))

    added = record("DoseAdministered", DOSE_V1 + [{"name": "vaccinator_id", "type": "string"}])
    r = post(reg, f"/subjects/{subject}/versions", added)
    assert_error(r, 409, 409, "READER_FIELD_MISSING_DEFAULT_VALUE", "vaccinator_id", "/fields/5")

    retyped = record("DoseAdministered", DOSE_V1[:4] + [{"name": "dose_number", "type": "string"}])
    r = post(reg, f"/subjects/{subject}/versions", retyped)
    assert_error(r, 409, 409, "TYPE_MISMATCH", "dose_number")

    fewer = record("DoseAdministered", DOSE_V1[:-1])
    set_level(reg, subject, "FORWARD")
    r = post(reg, f"/subjects/{subject}/versions", fewer)
    assert_error(r, 409, 409, "READER_FIELD_MISSING_DEFAULT_VALUE", "dose_number")

    r = post(reg, f"/compatibility/subjects/{subject}/versions/latest?verbose=true", fewer)
    assert r.json()["is_compatible"] is False
    assert any("dose_number" in m for m in r.json()["messages"])

    narrowed = record(
        "DoseAdministered",
        DOSE_V1[:3]
        + [{"name": "vaccine", "type": {"type": "enum", "name": "Vaccine", "symbols": ["pfizer"]}}, DOSE_V1[4]],
    )
    set_level(reg, subject, "BACKWARD")
    assert_error(post(reg, f"/subjects/{subject}/versions", narrowed), 409, 409, "MISSING_ENUM_SYMBOLS", "vaccine")


def test_transitive_levels_check_every_live_version(reg):
    v1 = [{"name": "a", "type": "string"}, {"name": "b", "type": "string"}]
    v2 = v1[:1]
    v3 = v1[:1] + [{"name": "b", "type": "int", "default": 0}]  # reads v2 but not v1's string b

    plain, transitive = fresh("backward"), fresh("backward-transitive")
    set_level(reg, plain, "BACKWARD")
    set_level(reg, transitive, "BACKWARD_TRANSITIVE")
    for subject in (plain, transitive):
        register(reg, subject, record("R", v1))
        register(reg, subject, record("R", v2))

    assert register(reg, plain, record("R", v3))["version"] == 3
    r = post(reg, f"/subjects/{transitive}/versions", record("R", v3))
    assert_error(r, 409, 409, "TYPE_MISMATCH", "'b'", "version 1")
    r = post(reg, f"/compatibility/subjects/{transitive}/versions?verbose=true", record("R", v3))
    assert r.json()["is_compatible"] is False and any("version 1" in m for m in r.json()["messages"])
    # Against one given version only that version counts.
    assert post(reg, f"/compatibility/subjects/{transitive}/versions/2", record("R", v3)).json()["is_compatible"]

    # A soft-deleted version no longer constrains the subject.
    assert reg.delete(f"/subjects/{transitive}/versions/1").json() == 1
    assert register(reg, transitive, record("R", v3))["version"] == 3


def test_subject_level_overrides_global_and_can_be_removed(reg):
    subject = fresh()
    global_level = reg.get("/config").json()["compatibilityLevel"]
    register(reg, subject, record("R", BASE))
    incompatible = record("R", CANDIDATES["change_type"])
    assert_error(post(reg, f"/subjects/{subject}/versions", incompatible), 409, 409, global_level)

    set_level(reg, subject, "NONE")
    assert reg.get(f"/config/{subject}").json() == {"compatibilityLevel": "NONE"}
    assert register(reg, subject, incompatible)["version"] == 2
    assert reg.get("/config").json()["compatibilityLevel"] == global_level

    assert reg.delete(f"/config/{subject}").json() == {"compatibilityLevel": "NONE"}
    assert_error(reg.get(f"/config/{subject}"), 404, 40408)
    assert reg.get(f"/config/{subject}?defaultToGlobal=true").json() == {"compatibilityLevel": global_level}
    # The accepted keys: Confluent's `compatibility` and the `compatibilityLevel` it answers with.
    r = reg.put(f"/config/{subject}", json={"compatibilityLevel": "full_transitive"})
    assert r.json() == {"compatibility": "FULL_TRANSITIVE"}
    # Writing the global level back unchanged exercises PUT /config without disturbing other tests.
    assert reg.put("/config", json={"compatibility": global_level}).json() == {"compatibility": global_level}


# -- deletes ---------------------------------------------------------------------------------


def test_soft_and_permanent_deletes(reg):
    subject = fresh()
    v1 = record("R", BASE)
    v2 = record("R", CANDIDATES["add_optional"])
    id1, id2 = register(reg, subject, v1)["id"], register(reg, subject, v2)["id"]

    assert reg.delete(f"/subjects/{subject}/versions/1").json() == 1
    assert reg.get(f"/subjects/{subject}/versions").json() == [2]
    assert reg.get(f"/subjects/{subject}/versions?deleted=true").json() == [1, 2]
    assert_error(reg.get(f"/subjects/{subject}/versions/1"), 404, 40402)
    assert reg.get(f"/subjects/{subject}/versions/1?deleted=true").json()["id"] == id1
    assert_error(post(reg, f"/subjects/{subject}", v1), 404, 40403)
    assert post(reg, f"/subjects/{subject}?deleted=true", v1).json()["version"] == 1
    assert_error(reg.delete(f"/subjects/{subject}/versions/1"), 404, 40406)
    assert_error(reg.delete(f"/subjects/{subject}/versions/2?permanent=true"), 404, 40407)
    assert reg.delete(f"/subjects/{subject}/versions/1?permanent=true").json() == 1
    assert reg.get(f"/subjects/{subject}/versions?deleted=true").json() == [2]
    # Ids are global and stable: a deleted version's schema stays readable by id.
    assert reg.get(f"/schemas/ids/{id1}").status_code == 200

    assert reg.delete(f"/subjects/{subject}").json() == [2]
    assert_error(reg.get(f"/subjects/{subject}/versions"), 404, 40401)
    assert_error(reg.get(f"/subjects/{subject}/versions/latest"), 404, 40401)
    assert subject not in reg.get("/subjects").json()
    assert subject in reg.get("/subjects?deleted=true").json()
    assert_error(reg.delete(f"/subjects/{subject}"), 404, 40404)

    # Registering again after a delete makes a new version with the same id.
    again = register(reg, subject, v2)
    assert (again["id"], again["version"]) == (id2, 3)
    assert_error(reg.delete(f"/subjects/{subject}?permanent=true"), 404, 40405)
    assert reg.delete(f"/subjects/{subject}").json() == [3]
    assert reg.delete(f"/subjects/{subject}?permanent=true").json() == [2, 3]
    assert_error(reg.get(f"/subjects/{subject}/versions?deleted=true"), 404, 40401)


def test_a_delete_reaches_the_other_instances_cache(reg, second_registry):
    subject = fresh()
    schema = record("R", BASE)
    register(reg, subject, schema)
    for _ in range(3):  # now cached in the second instance
        assert post(second_registry, f"/subjects/{subject}", schema).status_code == 200
    assert reg.delete(f"/subjects/{subject}/versions/1").json() == 1
    deadline = time.monotonic() + 3.0  # NOTIFY is asynchronous, but far faster than this
    while post(second_registry, f"/subjects/{subject}", schema).status_code == 200:
        assert time.monotonic() < deadline, "the second instance still answers from a stale cache"
        time.sleep(0.05)
    assert_error(post(second_registry, f"/subjects/{subject}", schema), 404, 40401)


# -- two instances at once ---------------------------------------------------------------------


def test_two_instances_register_concurrently_without_duplicates(reg, second_registry):
    tag = uuid.uuid4().hex[:8]
    subjects = [f"race-{tag}-{k}-value" for k in range(5)]
    for s in subjects:
        set_level(reg, s, "NONE")  # distinct random schemas are not meant to be compatible

    def schema(name: str) -> str:
        return record(f"E_{name}", [{"name": f"f_{name}", "type": "string"}])

    # Each instance: 50 schemas of its own, plus 10 that both register into the same subjects.
    jobs = {
        "a": [(subjects[i % 5], schema(f"a{i}")) for i in range(50)]
        + [(subjects[j % 5], schema(f"c{j}")) for j in range(10)],
        "b": [(subjects[i % 5], schema(f"b{i}")) for i in range(50)]
        + [(subjects[j % 5], schema(f"c{j}")) for j in range(10)],
    }
    # The same schema under a second subject must get the same id, too.
    jobs["a"] += [(subjects[(j + 1) % 5], schema(f"c{j}")) for j in range(10)]
    clients = {"a": reg, "b": second_registry}
    results: list[tuple[str, str, int, int]] = []
    errors: list[str] = []
    barrier = threading.Barrier(8)
    lock = threading.Lock()

    def run(who: str, part: int):
        mine = jobs[who][part::4]
        with httpx.Client(base_url=str(clients[who].base_url), headers=CT, timeout=60.0, auth=clients[who].auth) as c:
            barrier.wait()
            for subject, text in mine:
                r = post(c, f"/subjects/{subject}/versions", text)
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        results.append((subject, text, r.json()["id"], r.json()["version"]))

    threads = [threading.Thread(target=run, args=(who, part)) for who in "ab" for part in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(results) == sum(len(j) for j in jobs.values())

    id_of: dict[str, set[int]] = {}
    for _subject, text, sid, _v in results:
        id_of.setdefault(text, set()).add(sid)
    assert all(len(ids) == 1 for ids in id_of.values()), "one schema got several ids"
    assert len({next(iter(ids)) for ids in id_of.values()}) == len(id_of), "two schemas share an id"

    for s in subjects:
        expected = {text for subject, text, _, _ in results if subject == s}
        for client in (reg, second_registry):
            versions = client.get(f"/subjects/{s}/versions").json()
            assert versions == list(range(1, len(expected) + 1))
        rows = [second_registry.get(f"/subjects/{s}/versions/{v}").json() for v in versions]
        assert len({row["id"] for row in rows}) == len(rows), "a schema registered twice in one subject"
        assert {row["id"] for row in rows} == {next(iter(id_of[t])) for t in expected}
        # Every answer given during the race names the version that is stored.
        stored = {row["version"]: row["id"] for row in rows}
        for subject, text, sid, v in results:
            if subject == s:
                assert stored[v] == sid


# -- stock Confluent clients -----------------------------------------------------------------------


def test_confluent_schema_registry_client(stack_settings):
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient(registry_conf(stack_settings))
    subject = fresh("confluent")
    v1 = Schema(record("Dose", BASE), "AVRO")
    sid = client.register_schema(subject, v1)
    assert client.register_schema(subject, v1) == sid
    assert json.loads(client.get_schema(sid).schema_str) == json.loads(v1.schema_str)

    latest = client.get_latest_version(subject)
    assert (latest.schema_id, latest.version, latest.subject) == (sid, 1, subject)
    found = client.lookup_schema(subject, v1)
    assert (found.schema_id, found.version) == (sid, 1)
    assert client.get_version(subject, 1).schema_id == sid
    assert client.get_versions(subject) == [1]
    assert subject in client.get_subjects()

    assert client.get_compatibility() == reg_level(stack_settings)
    client.set_compatibility(subject, "FULL")
    assert client.get_compatibility(subject) == "FULL"
    assert client.test_compatibility(subject, Schema(record("Dose", CANDIDATES["add_optional"]), "AVRO"))
    assert not client.test_compatibility(subject, Schema(record("Dose", CANDIDATES["add_required"]), "AVRO"))
    assert not client.test_compatibility_all_versions(
        subject, Schema(record("Dose", CANDIDATES["change_type"]), "AVRO")
    )

    from confluent_kafka.schema_registry.error import SchemaRegistryError

    with pytest.raises(SchemaRegistryError) as info:
        client.register_schema(subject, Schema(record("Dose", CANDIDATES["add_required"]), "AVRO"))
    assert info.value.http_status_code == 409 and "vaccinator_id" in info.value.error_message

    assert client.delete_version(subject, 1) == 1
    assert client.delete_subject(subject, permanent=True) == [1]


def reg_level(stack_settings) -> str:
    return httpx.get(f"{stack_settings.registry_url}/config", auth=registry_auth(stack_settings)).json()[
        "compatibilityLevel"
    ]


def test_avro_serializer_round_trip(stack_settings):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient(registry_conf(stack_settings))
    topic = f"test.registry.{uuid.uuid4().hex[:10]}"
    schema = record("DoseAdministered", DOSE_V1 + [{"name": "lot_number", "type": ["null", "string"], "default": None}])
    serializer = AvroSerializer(client, schema)
    ctx = SerializationContext(topic, MessageField.VALUE)
    event = {
        "event_id": str(uuid.uuid4()),
        "subject_id": "s-1",
        "site_id": "79-001",
        "vaccine": "pfizer",
        "dose_number": 2,
        "lot_number": "AB123",
    }

    data = serializer(event, ctx)
    magic, schema_id = struct.unpack(">bI", data[:5])
    assert magic == 0
    latest = httpx.get(
        f"{stack_settings.registry_url}/subjects/{topic}-value/versions/latest", auth=registry_auth(stack_settings)
    )
    assert schema_id == latest.json()["id"]

    # A fresh client, so the writer schema really comes from GET /schemas/ids/{id}.
    deserializer = AvroDeserializer(SchemaRegistryClient(registry_conf(stack_settings)))
    assert deserializer(data, ctx) == event

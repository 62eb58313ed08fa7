"""Who may do what in the schema registry: HTTP basic auth against access.principals, rights by kind.

Against the session's real registry and PostgreSQL; the principals are the
stack's own service principals (`nhdp up` writes them, with generated passwords).
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.helpers import registry_auth, registry_conf

pytestmark = pytest.mark.stack

CT = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
SCHEMA = json.dumps({"type": "record", "name": "Access", "namespace": "vn.nhdp.test", "fields": []})

# Who asks: a reader (the worker), a producer (the SDK's), admin, nobody, admin with a wrong password.
WHO = ("reader", "producer", "admin", "none", "wrong")
PRINCIPAL = {"reader": "worker", "producer": "producer", "admin": "admin"}

# operation → expected status per WHO, in that order.
TABLE = {
    "list subjects": (200, 200, 200, 401, 401),
    "look up": (200, 200, 200, 401, 401),
    "register": (403, 200, 200, 401, 401),
    "test compatibility": (403, 200, 200, 401, 401),
    "delete subject": (403, 403, 200, 401, 401),
    "put config": (403, 403, 200, 401, 401),
    "put mode": (403, 403, 200, 401, 401),
}


def auth_of(settings, who: str) -> httpx.Auth | None:
    if who == "none":
        return None
    if who == "wrong":
        return httpx.BasicAuth("admin", settings.password_of("admin") + "x")
    return registry_auth(settings, PRINCIPAL[who])


def request(client: httpx.Client, operation: str, subject: str) -> httpx.Response:
    body = {"schema": SCHEMA}
    return {
        "list subjects": lambda: client.get("/subjects"),
        "look up": lambda: client.post(f"/subjects/{subject}", json=body),
        "register": lambda: client.post(f"/subjects/{subject}/versions", json=body),
        "test compatibility": lambda: client.post(f"/compatibility/subjects/{subject}/versions", json=body),
        "delete subject": lambda: client.delete(f"/subjects/{subject}"),
        "put config": lambda: client.put(f"/config/{subject}", json={"compatibility": "FULL"}),
        "put mode": lambda: client.put("/mode", json={"mode": "READWRITE"}),
    }[operation]()


@pytest.mark.parametrize("operation", TABLE)
@pytest.mark.parametrize("who", WHO)
def test_principal_by_operation(stack_settings, who, operation):
    subject = f"access-{uuid.uuid4().hex[:12]}-value"
    url = stack_settings.registry_url
    # Every operation finds the subject there, so a success is the right's, not a 404.
    with httpx.Client(base_url=url, headers=CT, timeout=30, auth=registry_auth(stack_settings)) as admin:
        assert admin.post(f"/subjects/{subject}/versions", json={"schema": SCHEMA}).status_code == 200
    with httpx.Client(base_url=url, headers=CT, timeout=30, auth=auth_of(stack_settings, who)) as client:
        answer = request(client, operation, subject)
    expected = TABLE[operation][WHO.index(who)]
    assert answer.status_code == expected, (who, operation, answer.text)
    if expected == 401:
        assert answer.headers["www-authenticate"] == 'Basic realm="nhdp-registry"'
        body = answer.json()
        assert body["error_code"] == 40101
        assert ("no credentials" if who == "none" else "wrong user name or password") in body["message"]
    elif expected == 403:
        body = answer.json()
        needs = "needs admin" if TABLE[operation][1] == 403 else "needs producer or admin"
        assert body["error_code"] == 40301 and needs in body["message"], body
        assert repr(PRINCIPAL[who]) in body["message"]
    # The subject is still there unless admin deleted it.
    with httpx.Client(base_url=url, headers=CT, timeout=30, auth=registry_auth(stack_settings)) as admin:
        versions = admin.get(f"/subjects/{subject}/versions")
    assert versions.status_code == (404 if (operation, who) == ("delete subject", "admin") else 200)


def test_health_stays_open_and_nothing_else_does(stack_settings):
    assert httpx.get(f"{stack_settings.registry_url}/healthz", timeout=10).json()["status"] == "ok"
    for path in ("/", "/subjects", "/schemas/ids/1", "/config", "/schemas/types"):
        assert httpx.get(f"{stack_settings.registry_url}{path}", timeout=10).status_code == 401, path


def test_stock_client_with_basic_auth_reads_and_a_non_admin_delete_is_refused(stack_settings):
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    subject = f"access-stock-{uuid.uuid4().hex[:12]}-value"
    schema_id = SchemaRegistryClient(registry_conf(stack_settings, "producer")).register_schema(
        subject, Schema(SCHEMA, "AVRO")
    )

    reader = SchemaRegistryClient(registry_conf(stack_settings, "worker"))
    assert json.loads(reader.get_schema(schema_id).schema_str) == json.loads(SCHEMA)
    assert reader.get_latest_version(subject).schema_id == schema_id
    with pytest.raises(SchemaRegistryError) as refused:
        reader.delete_subject(subject)
    assert refused.value.http_status_code == 403 and refused.value.error_code == 40301
    assert "needs admin" in refused.value.error_message

    producer = SchemaRegistryClient(registry_conf(stack_settings, "producer"))
    with pytest.raises(SchemaRegistryError) as also:
        producer.delete_subject(subject, permanent=True)
    assert also.value.http_status_code == 403

    nobody = SchemaRegistryClient({"url": stack_settings.registry_url})
    with pytest.raises(SchemaRegistryError) as unauthenticated:
        nobody.get_subjects()
    assert unauthenticated.value.http_status_code == 401

    admin = SchemaRegistryClient(registry_conf(stack_settings))
    assert admin.delete_subject(subject) == [1]

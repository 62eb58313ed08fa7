"""Who may call what on the API (issue 15, part 2; DESIGN §8), against the real stack.

One table: each role (and no token) × each endpoint → the status it gets. Then
the rules a table cannot show: a province sees only its own rows, a producer
publishes only as its source and for its provinces, a void only from the
target's source or an auditor, bad tokens are 401 with a reason, revocation
holds within seconds, and every request is in the access log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from infra.settings import CHECKOUT
from schemas.access import Caller
from schemas.tokens import TokenKeys
from tests.helpers import api, bearer, post, subject_of, valid_event, wait_caught_up

pytestmark = pytest.mark.stack

SITE = "site-79-760"  # valid_event's source, province 79
CALLERS = {
    "none": None,
    "national": ("national", {}),
    "province:79": ("province", {"province": "79"}),
    "province:01": ("province", {"province": "01"}),
    "auditor": ("auditor", {}),
    "producer": ("producer", {"source": SITE, "provinces": ["79"]}),
    "admin": ("admin", {}),
    "site": ("site", {"source": SITE, "provinces": ["79"]}),
    "citizen_app": ("citizen_app", {}),
}
# the columns of EXPECTED, in CALLERS' order
ROLES = list(CALLERS)


@pytest.fixture(scope="module")
def world(stack_settings):
    """One dose in province 79, projected, so the record and figures exist."""
    cid = str(uuid.uuid4().int)[:12]
    dose = valid_event("DoseAdministered", cid=cid)
    assert post(stack_settings, [dose]).json()["accepted"] == 1
    wait_caught_up(stack_settings)
    with api(stack_settings, "citizen_app") as app:
        code = app.post("/v1/health-book/qr", json={"citizen_id": cid}).json()["token"]
    return {"subject": subject_of(stack_settings, cid), "dose": dose, "cid": cid, "code": code}


def _headers(settings, who: str) -> dict[str, str]:
    spec = CALLERS[who]
    return {} if spec is None else bearer(settings, spec[0], **spec[1])


def _token_body() -> dict:
    return {"name": "table-test", "role": "national", "ttl": "5m"}


#            path                                         none nat  p79  p01  aud  prod adm  site app
EXPECTED = [
    ("GET", "/v1/national/summary", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/provinces", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/provinces/79/summary", None, (401, 200, 200, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/provinces/79/summary?as_of=2030-01-01T00:00:00Z", None, (401, 200, 200, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/national/summary?as_of=2030-01-01T00:00:00Z", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/analytics/doses?group_by=province", None, (401, 200, 200, 200, 200, 403, 200, 403, 403)),
    ("GET", "/v1/analytics/doses?province=01", None, (401, 200, 403, 200, 200, 403, 200, 403, 403)),
    ("GET", "/v1/analytics/coverage?by=province", None, (401, 200, 200, 200, 200, 403, 200, 403, 403)),
    ("GET", "/v1/analytics/coverage?by=region", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    # the 2025 units add other provinces' figures to a province's own: national and audit only
    ("GET", "/v1/provinces?scheme=2025", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/provinces/79/summary?scheme=2025", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/analytics/doses?scheme=2025", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/analytics/coverage?scheme=2025", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/citizens/{subject}/record", None, (401, 200, 200, 403, 200, 403, 200, 403, 403)),
    ("POST", "/v1/events", "events", (401, 403, 403, 403, 200, 200, 200, 200, 403)),
    ("GET", "/metrics", None, (401, 200, 403, 403, 200, 403, 200, 403, 403)),
    ("GET", "/v1/access-log", None, (401, 403, 403, 403, 200, 403, 200, 403, 403)),
    ("POST", "/v1/tokens", "token", (401, 403, 403, 403, 403, 403, 201, 403, 403)),
    ("POST", "/v1/health-book/qr", "citizen", (401, 403, 403, 403, 403, 403, 403, 403, 200)),
    ("POST", "/v1/certificates", "certificate", (401, 403, 403, 403, 403, 403, 403, 403, 200)),
    ("POST", "/v1/checkins", "checkin", (401, 403, 403, 403, 403, 403, 403, 200, 403)),
    ("GET", "/v1/trust-list", None, (200,) * 9),  # public: any verifier, offline afterwards
    ("GET", "/v1/certificates/revoked", None, (200,) * 9),  # public, as the EU DCC revocation lists
    ("GET", "/v1/me", None, (401, 200, 200, 200, 200, 200, 200, 200, 200)),  # any token: who it is
    ("GET", "/healthz", None, (200,) * 9),
    ("GET", "/docs", None, (200,) * 9),
]


@pytest.mark.parametrize(("method", "path", "body", "statuses"), EXPECTED, ids=[f"{m} {p}" for m, p, _, _ in EXPECTED])
def test_each_role_gets_exactly_its_rights_on_each_endpoint(stack_settings, world, method, path, body, statuses):
    url = stack_settings.api_url + path.format(subject=world["subject"])
    got = {}
    for who in ROLES:
        payload = {
            "events": [valid_event()],
            "token": _token_body(),
            "citizen": {"citizen_id": world["cid"]},
            "certificate": {"citizen_id": world["cid"], "family_name": "Lê", "date_of_birth": "1990-01-02"},
            "checkin": {"code": world["code"], "site_id": "79-760-0001", "province_code": "79"},
            None: None,
        }[body]
        resp = httpx.request(method, url, json=payload, headers=_headers(stack_settings, who), timeout=60)
        got[who] = resp.status_code
        if resp.status_code == 401:
            assert resp.headers["www-authenticate"].startswith("Bearer"), resp.headers
            assert "bearer token" in resp.json()["error"]
        if resp.status_code == 403:
            answer = resp.json()
            assert answer["missing_right"] in answer["error"], answer
            assert "this token is " in answer["error"], answer
    assert got == dict(zip(ROLES, statuses, strict=True))


def test_a_province_sees_only_its_own_rows(stack_settings, world):
    with api(stack_settings, "province", province="79") as client:
        doses = client.get("/v1/analytics/doses", params={"group_by": "province", "wait": 30}).json()["rows"]
        assert doses and {r["province"] for r in doses} == {"79"}
        coverage = client.get("/v1/analytics/coverage").json()
        assert [r["province_code"] for r in coverage["rows"]] == ["79"]
        assert coverage["national"]  # the nation stays, as the yardstick its rank is against
        record = client.get(f"/v1/citizens/{world['subject']}/record").json()
        assert record["doses"][0]["event_id"] == world["dose"]["event_id"]
    with api(stack_settings, "province", province="01") as other:
        refused = other.get(f"/v1/citizens/{world['subject']}/record")
        unknown = other.get(f"/v1/citizens/{'0' * 64}/record")
    # the same answer for a record elsewhere and no record at all: a province learns nothing of others
    assert refused.status_code == unknown.status_code == 403
    assert refused.json()["error"].replace(world["subject"], "") == unknown.json()["error"].replace("0" * 64, "")


def test_a_producer_publishes_only_as_its_source_and_for_its_provinces(stack_settings):
    mine = valid_event()
    other_source = valid_event() | {"source": "someone-else"}
    other_province = valid_event() | {"province_code": "01"}
    resp = httpx.post(
        f"{stack_settings.api_url}/v1/events",
        json=[mine, other_source, other_province],
        headers=bearer(stack_settings, "producer", source=SITE, provinces=["79"]),
        timeout=60,
    )
    answer = resp.json()
    assert resp.status_code == 200 and answer["accepted"] == 1, answer
    errors = {r["index"]: r["errors"] for r in answer["rejected"]}
    assert errors == {
        1: [f"source: must be '{SITE}', the source of this token (got 'someone-else')"],
        2: ["province_code: '01' is not among this token's provinces (79)"],
    }


def _void(target: dict, source: str) -> dict:
    return valid_event("RecordVoided", voided_event_id=target["event_id"]) | {"source": source}


def test_a_void_is_accepted_only_from_the_targets_source_or_an_auditor(stack_settings):
    dose_a, dose_b = valid_event(), valid_event()
    assert post(stack_settings, [dose_a, dose_b]).json()["accepted"] == 2

    stranger = post(stack_settings, [_void(dose_a, "another-site")], source="another-site").json()
    assert stranger["accepted"] == 0
    assert stranger["rejected"][0]["errors"] == [
        f"payload.voided_event_id: event {dose_a['event_id']} was written by source '{SITE}'; only that source, "
        "an auditor or an admin may void it"
    ]
    assert post(stack_settings, [_void(dose_a, SITE)]).json()["accepted"] == 1

    auditor = bearer(stack_settings, "auditor")
    name = "test-auditor-all"  # tests.helpers.token's name for an auditor
    url = f"{stack_settings.api_url}/v1/events"
    correction = httpx.post(url, json=[_void(dose_b, f"audit:{name}")], headers=auditor, timeout=60).json()
    assert correction["accepted"] == 1, correction
    wrong = httpx.post(url, json=[_void(dose_b, SITE), valid_event()], headers=auditor, timeout=60).json()
    assert wrong["accepted"] == 0
    assert [r["errors"] for r in wrong["rejected"]] == [
        [f"source: an auditor's correction carries source 'audit:{name}' (got '{SITE}')"],
        ["event_type: an auditor token may post only RecordVoided (corrections), not DoseAdministered"],
    ]


def test_bad_tokens_are_401_with_the_reason(stack_settings):
    url = f"{stack_settings.api_url}/v1/national/summary"
    national = Caller(name="t", role="national")
    own = TokenKeys(stack_settings.token_secret())
    cases = {
        "not a token": "the bearer token is not a JWT",
        TokenKeys("another platform's key").issue(national, timedelta(hours=1)).token: "a key this API does not know",
        own.issue(national, timedelta(minutes=5), now=datetime.now(UTC) - timedelta(hours=1)).token: "has expired",
        own.issue(national, timedelta(hours=1)).token[:-4] + "AAAA": "not valid: Signature verification failed",
    }
    for bad, reason in cases.items():
        resp = httpx.get(url, headers={"authorization": f"Bearer {bad}"}, timeout=30)
        assert resp.status_code == 401 and reason in resp.json()["error"], (reason, resp.text)
    missing = httpx.get(url, timeout=30)
    assert missing.status_code == 401
    assert missing.json() == {
        "error": "this endpoint needs a bearer token: Authorization: Bearer <token from nhdp token issue>"
    }


def _nhdp(settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")} | settings.as_env()
    return subprocess.run(
        [sys.executable, "-m", "nhdp.cli", *args], env=env, cwd=CHECKOUT, capture_output=True, text=True, timeout=120
    )


def test_nhdp_token_issue_and_revoke(stack_settings):
    issued = _nhdp(stack_settings, "token", "issue", "--role", "province", "--province", "79", "--ttl", "10m")
    assert issued.returncode == 0, issued.stderr
    tok = issued.stdout.strip()
    assert tok.count(".") == 2 and "\n" not in tok  # the token alone on stdout: TOKEN=$(nhdp token issue …)
    jti = issued.stderr.split("token id (for revoke): ")[1].split(";")[0]
    url = f"{stack_settings.api_url}/v1/provinces/79/summary"
    headers = {"authorization": f"Bearer {tok}"}
    assert httpx.get(url, headers=headers, timeout=30).status_code == 200

    revoked = _nhdp(stack_settings, "token", "revoke", jti)
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 10
    while (resp := httpx.get(url, headers=headers, timeout=30)).status_code == 200:
        assert time.monotonic() < deadline, "a revoked token still works after 10 s"
        time.sleep(0.2)
    assert resp.status_code == 401 and f"{jti} has been revoked" in resp.json()["error"]

    refused = _nhdp(stack_settings, "token", "issue", "--role", "producer", "--source", "audit:me", "--province", "79")
    assert refused.returncode == 2 and "reserved for corrections" in refused.stderr
    no_scope = _nhdp(stack_settings, "token", "issue", "--role", "producer", "--source", "x")
    assert no_scope.returncode == 2 and "names the provinces it writes for" in no_scope.stderr


def test_admin_issues_and_revokes_tokens_over_http(stack_settings):
    with api(stack_settings, "admin") as admin:
        made = admin.post(
            "/v1/tokens", json={"name": "site-7", "role": "producer", "source": "s7", "provinces": ["79"]}
        )
        assert made.status_code == 201, made.text
        bad_scope = admin.post("/v1/tokens", json={"name": "x", "role": "province"})
        assert bad_scope.status_code == 400 and "exactly one province" in bad_scope.json()["error"]
        assert admin.delete(f"/v1/tokens/{made.json()['jti']}").status_code == 200
        assert admin.delete(f"/v1/tokens/{made.json()['jti']}").status_code == 404


def test_every_request_is_in_the_access_log_refusals_too(stack_settings):
    marker = uuid.uuid4().hex
    with api(stack_settings, "province", province="01") as province:
        assert province.get(f"/v1/provinces/79/summary?probe={marker}").status_code == 403
        # a NUL in a path (PostgreSQL text cannot hold one) is logged, and does not block the log
        assert province.get(f"/v1/provinces/%00/summary?probe={marker}").status_code == 403
    assert httpx.get(f"{stack_settings.api_url}/v1/provinces?probe={marker}", timeout=30).status_code == 401
    with api(stack_settings, "auditor") as auditor:
        rows = [r for r in auditor.get("/v1/access-log", params={"limit": 1000}).json() if marker in r["query"]]
    seen = {(r["name"], r["role"], r["method"], r["path"], r["status"]) for r in rows}
    assert seen == {
        ("test-province-01", "province:01", "GET", "/v1/provinces/79/summary", 403),
        ("test-province-01", "province:01", "GET", "/v1/provinces/\\x00/summary", 403),
        (None, None, "GET", "/v1/provinces", 401),
    }


def test_openapi_shows_the_bearer_scheme(stack_settings):
    spec = httpx.get(f"{stack_settings.api_url}/openapi.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/national/summary"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]

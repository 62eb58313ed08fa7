"""The health book against the real stack (issue 17): the citizen's QR, check-in by scan, certificates.

Round trip: a QR issued to the citizen app is scanned at a site, CheckedIn lands in the log and in the
subject's record; a certificate is issued, its QR PNG decoded with zxing-cpp and verified with the
published trust list, by `nhdp verify-cert` and by a second implementation written from the HCERT
specification (tests/hcert_spec.py), its payload valid against the EU DCC schema and value sets.
Refused, each for its own reason: one byte changed, expired, an unknown key, a voided dose.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
import zlib

import base45
import cbor2
import pytest

from infra.settings import CHECKOUT
from schemas import hcert, qr
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from tests import hcert_spec
from tests.helpers import SOURCE, TopicLog, api, citizen_id, post, subject_of, valid_event, wait_caught_up

pytestmark = pytest.mark.stack

SITE_ID = "79-760-0001"
HOLDER = {"family_name": "Trần", "given_name": "Thị Bích Ngọc", "date_of_birth": "1962-11-05"}


@pytest.fixture(scope="module")
def app(stack_settings):
    with api(stack_settings, "citizen_app") as client:
        yield client


@pytest.fixture(scope="module")
def site(stack_settings):
    with api(stack_settings, "site", source=SOURCE, provinces=["79"]) as client:
        yield client


def vaccinated(settings, doses: int = 2, vaccine: str = "pfizer") -> tuple[str, list[dict]]:
    cid = citizen_id()
    events = [
        valid_event("DoseAdministered", cid=cid, vaccine=vaccine, dose_number=n, lot_number=f"LOT-{n}")
        | {"occurred_at": f"2021-0{7 + n}-15T09:00:00.000+07:00"}
        for n in range(1, doses + 1)
    ]
    assert post(settings, events).json()["accepted"] == doses
    wait_caught_up(settings)
    return cid, events


def trust_list(app) -> dict[bytes, bytes]:
    """kid → DER, as an independent verifier reads the published list (the kid recomputed from the DER)."""
    keys = app.get("/v1/trust-list").json()["keys"]
    out = {}
    for k in keys:
        der = base64.b64decode(k["certificate"])
        assert base64.b64decode(k["kid"]) == hcert_spec.kid_of(der)
        out[hcert_spec.kid_of(der)] = der
    return out


def verify_cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")} | settings.as_env()
    return subprocess.run(
        [sys.executable, "-m", "nhdp.cli", "verify-cert", *args],
        env=env,
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_scanned_health_book_code_checks_the_citizen_in(stack_settings, app, site):
    cid, doses = vaccinated(stack_settings, 1)
    appointment = valid_event("AppointmentScheduled", cid=cid, dose_number=2, site_id=SITE_ID)
    now = time.time()
    appointment["payload"] |= {
        "slot_start": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now + 600)),
        "slot_end": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now + 2400)),
    }
    serious = valid_event("AdverseEventReported", cid=cid, severity="serious", dose_event_id=doses[0]["event_id"])
    assert post(stack_settings, [appointment, serious]).json()["accepted"] == 2
    wait_caught_up(stack_settings)

    issued = app.post("/v1/health-book/qr", json={"citizen_id": cid})
    assert issued.status_code == 200, issued.text
    body = issued.json()
    subject = subject_of(stack_settings, cid)
    assert body["subject_id"] == subject and cid not in issued.text
    assert body["token"].startswith("HB1:") and body["qr"]["mode"] == "alphanumeric" and body["qr"]["error"] == "Q"
    scanned = qr.read(base64.b64decode(body["qr"]["png"]))
    assert scanned == [body["token"]]
    png = app.post("/v1/health-book/qr", json={"citizen_id": cid}, params={"format": "png"})
    assert png.headers["content-type"] == "image/png" and qr.read(png.content)[0].startswith("HB1:")
    svg = app.post("/v1/health-book/qr", json={"citizen_id": cid}, params={"format": "svg"})
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<svg" in svg.text

    log = TopicLog(stack_settings)
    start = log.ends()
    scan_id = str(uuid.uuid4())
    answer = site.post(
        "/v1/checkins", json={"code": scanned[0], "site_id": SITE_ID, "province_code": "79", "event_id": scan_id}
    )
    assert answer.status_code == 200, answer.text
    staff = answer.json()
    assert staff["checked_in"] == staff["checked_in"] | {"event_id": scan_id, "new": True, "site_id": SITE_ID}
    assert staff["checked_in"]["appointment_id"] == appointment["payload"]["appointment_id"]
    assert staff["valid_doses"] == 1 and staff["dose_due"] == 2 and not staff["fully_vaccinated"]
    assert [d["event_id"] for d in staff["doses"]] == [doses[0]["event_id"]]
    assert staff["appointment"]["appointment_id"] == appointment["payload"]["appointment_id"]
    assert [e["event_id"] for e in staff["serious_adverse_events"]] == [serious["event_id"]]
    assert any("serious adverse event" in w for w in staff["warnings"])
    again = site.post(
        "/v1/checkins", json={"code": scanned[0], "site_id": SITE_ID, "province_code": "79", "event_id": scan_id}
    )
    assert again.status_code == 200 and again.json()["checked_in"]["new"] is False  # a retried scan counts once

    codec = Codec(RegistryClient.for_settings(stack_settings))
    published = [d for d in codec.decode_many([m.value for m in log.read(start)]) if d["event_id"] == scan_id]
    log.close()
    assert len(published) == 1
    event = published[0]
    assert event["event_type"] == "CheckedIn" and event["subject_id"] == subject and event["source"] == SOURCE
    assert event["payload"] == {"site_id": SITE_ID, "appointment_id": appointment["payload"]["appointment_id"]}

    wait_caught_up(stack_settings)
    with api(stack_settings, "national") as national:
        record = national.get(f"/v1/citizens/{subject}/record").json()
    assert [c["event_id"] for c in record["check_ins"]] == [scan_id]
    assert record["appointments"][0]["appointment_id"] == appointment["payload"]["appointment_id"]
    assert record["doses"][0]["lot_number"] == "LOT-1" and record["adverse_events"] == 1


def test_bad_codes_are_refused_each_for_its_reason(stack_settings, app, site):
    cid, _ = vaccinated(stack_settings, 1)
    code = app.post("/v1/health-book/qr", json={"citizen_id": cid}).json()["token"]
    message = zlib.decompress(base45.b45decode(code[4:]))
    tampered = bytearray(message)
    tampered[-70] ^= 0x01  # inside the claims (the subject): the signature no longer matches
    forged = "HB1:" + base45.b45encode(zlib.compress(bytes(tampered))).decode()
    certificate = issue_certificate(stack_settings, app)["certificate"]
    cases = {
        "nonsense": "prefix",
        "HB1:" + "Ä": "base45",
        "HB1:" + base45.b45encode(b"not zlib").decode(): "zlib",
        "HB1:" + base45.b45encode(zlib.compress(b"\x01\x02")).decode(): "cose",
        forged: "signature",
        "HB1:" + certificate[4:]: "unknown-key",  # a certificate's key is not a health-book key
    }
    for text, reason in cases.items():
        resp = site.post("/v1/checkins", json={"code": text, "site_id": SITE_ID, "province_code": "79"})
        assert resp.status_code == 400 and resp.json()["reason"] == reason, (reason, resp.text)
    other_province = site.post("/v1/checkins", json={"code": code, "site_id": SITE_ID, "province_code": "01"})
    assert other_province.status_code == 403 and "not among this token's provinces" in other_province.text


def issue_certificate(settings, app, doses: int = 2, vaccine: str = "pfizer") -> dict:
    cid, events = vaccinated(settings, doses, vaccine)
    resp = app.post("/v1/certificates", json={"citizen_id": cid, **HOLDER})
    assert resp.status_code == 200, resp.text
    return resp.json() | {"citizen_id": cid, "events": events}


def test_a_certificate_round_trip_through_its_qr_verified_twice(stack_settings, app, tmp_path):
    issued = issue_certificate(stack_settings, app)
    text = issued["certificate"]
    assert text.startswith("HC1:") and issued["qr"]["mode"] == "alphanumeric"
    png = tmp_path / "certificate.png"
    png.write_bytes(base64.b64decode(issued["qr"]["png"]))
    assert qr.read(png) == [text]

    # the second implementation, from the specification, with the published trust list
    checked = hcert_spec.verify_hc1(text, trust_list(app), int(time.time()))
    payload = checked["hcert"]
    hcert_spec.validate_payload(payload)
    assert checked["iss"] == "VN" and checked["exp"] - checked["iat"] == 365 * 86400
    assert payload["nam"] == {"fn": "Trần", "fnt": "TRAN", "gn": "Thị Bích Ngọc", "gnt": "THI<BICH<NGOC"}
    assert payload["dob"] == "1962-11-05"
    v = payload["v"][0]
    assert (v["mp"], v["ma"], v["vp"], v["dn"], v["sd"]) == ("EU/1/20/1528", "ORG-100030215", "1119349007", 2, 2)
    assert (v["dt"], v["co"], v["ci"]) == ("2021-09-15", "VN", issued["ci"])

    # ours, from the PNG, as a user runs it
    done = verify_cli(stack_settings, str(png))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VALID" in done.stdout and "2/2 of EU/1/20/1528" in done.stdout and "lot LOT-2" in done.stdout


def test_refused_changed_expired_unknown_key_and_voided(stack_settings, app, tmp_path):
    issued = issue_certificate(stack_settings, app)
    text, trusted = issued["certificate"], trust_list(app)
    now = int(time.time())

    message = cbor2.loads(zlib.decompress(base45.b45decode(text[4:])))
    sign1 = message.value if isinstance(message, cbor2.CBORTag) else message
    sign1[2] = sign1[2][:-1] + bytes([sign1[2][-1] ^ 0x01])  # one byte of the payload changed
    changed = "HC1:" + base45.b45encode(zlib.compress(cbor2.dumps(cbor2.CBORTag(18, sign1)))).decode()
    with pytest.raises(hcert_spec.HcertRefused) as spec:
        hcert_spec.verify_hc1(changed, trusted, now)
    assert spec.value.reason == "signature"
    with pytest.raises(hcert_spec.HcertRefused) as spec:
        hcert_spec.verify_hc1(text, trusted, now + 366 * 86400)
    assert spec.value.reason == "expired"
    with pytest.raises(hcert_spec.HcertRefused) as spec:
        hcert_spec.verify_hc1(text, {}, now)
    assert spec.value.reason == "unknown-kid"

    lists = tmp_path / "lists.json"
    saved = subprocess.run(
        [sys.executable, "-m", "nhdp.cli", "trust-list", "save", str(lists), "--api", stack_settings.api_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert saved.returncode == 0, saved.stderr
    for cert, extra, reason in [
        (changed, (), "signature"),
        (text, ("--now", "2031-01-01T00:00:00+00:00"), "expired"),
        (text[:-1] + ("0" if text[-1] != "0" else "1"), (), None),  # a character of the text: damaged
    ]:
        out = verify_cli(stack_settings, cert, "--lists", str(lists), "--json", *extra)
        assert out.returncode == 1, out.stdout + out.stderr
        if reason:
            assert f'"reason":"{reason}"' in out.stdout, out.stdout
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"trust_list": {"keys": []}, "revoked": {"hashes": []}}')
    unknown = verify_cli(stack_settings, text, "--lists", str(foreign), "--json")
    assert unknown.returncode == 1 and '"reason":"unknown-key"' in unknown.stdout

    # a voided dose: the certificate resting on it is revoked, and the citizen's new one leaves it out
    void = valid_event("RecordVoided", voided_event_id=issued["events"][1]["event_id"])
    assert post(stack_settings, [void]).json()["accepted"] == 1
    wait_caught_up(stack_settings)
    revoked = app.get("/v1/certificates/revoked").json()
    assert hcert_spec.uci_hash(issued["ci"]) in revoked["hashes"] and revoked["hash_type"] == "UCI"
    now_revoked = verify_cli(stack_settings, text, "--json")
    assert now_revoked.returncode == 1 and '"reason":"revoked"' in now_revoked.stdout
    renewed = app.post("/v1/certificates", json={"citizen_id": issued["citizen_id"], **HOLDER}).json()
    assert renewed["dose"]["event_id"] == issued["events"][0]["event_id"] and renewed["dose"]["dn"] == 1


def test_a_void_arriving_just_before_the_request_is_never_certified(stack_settings, app):
    """The certificate waits for the projections to apply the log as it was on arrival: no race to win."""
    cid, events = vaccinated(stack_settings, 1)
    void = valid_event("RecordVoided", voided_event_id=events[0]["event_id"])
    assert post(stack_settings, [void]).json()["accepted"] == 1
    resp = app.post("/v1/certificates", json={"citizen_id": cid, **HOLDER})  # no wait for the projections first
    assert resp.status_code == 404 and "no valid dose" in resp.json()["error"]


def test_certificate_requests_are_checked(stack_settings, app):
    cid, _ = vaccinated(stack_settings, 1)
    cases = [
        ({"citizen_id": "12345", **HOLDER}, 400, "citizen_id"),
        ({"citizen_id": cid, **HOLDER, "date_of_birth": "1962-13-01"}, 400, "date_of_birth"),
        ({"citizen_id": cid, **HOLDER, "date_of_birth": "1850"}, 400, "between 1900 and 2099"),
        ({"citizen_id": cid, **HOLDER, "family_name": "123"}, 400, "ICAO"),
        ({"citizen_id": citizen_id(), **HOLDER}, 404, "no valid dose"),
    ]
    for body, status, words in cases:
        resp = app.post("/v1/certificates", json=body)
        assert resp.status_code == status and words in resp.json()["error"], (body, resp.text)
        assert HOLDER["family_name"] not in resp.text and "1962" not in resp.text  # never echoed


def test_key_rotation_keeps_old_certificates_valid(stack_settings, app):
    before = issue_certificate(stack_settings, app)
    rotated = subprocess.run(
        [sys.executable, "-m", "nhdp.cli", "keys", "rotate", "--purpose", "hcert"],
        env={k: v for k, v in os.environ.items() if not k.startswith("NHDP_")} | stack_settings.as_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "BEGIN" not in rotated.stdout + rotated.stderr  # no key material printed
    deadline = time.monotonic() + 10  # a rotation reaches every API process within seconds (schemas/signing_keys.py)
    while (after := issue_certificate(stack_settings, app))["kid"] == before["kid"]:
        assert time.monotonic() < deadline, "certificates still signed with the old key"
        time.sleep(0.5)
    trusted = trust_list(app)
    assert {base64.b64decode(before["kid"]), base64.b64decode(after["kid"])} <= set(trusted)
    now = int(time.time())
    for issued in (before, after):
        checked = hcert_spec.verify_hc1(issued["certificate"], trusted, now)
        assert base64.b64encode(checked["kid"]).decode() == issued["kid"]
    assert hcert.PREFIX == "HC1:"
    secrets = stack_settings.secrets.folder
    keys = [p for p in secrets.iterdir() if p.name.startswith("signing-hcert-")]
    assert len(keys) >= 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in keys)

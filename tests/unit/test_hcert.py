"""The health book's pure logic: names, dose numbering, the EU codes, signing and every refusal, the staff view.

Keys are made in memory here; the stack tests (tests/stack/test_healthbook.py) use the platform's own.
"""

from __future__ import annotations

import json
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import base45
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from projections.health_records import matching_appointment, staff_view
from schemas import hcert, healthbook
from schemas.cose_tokens import Refused
from schemas.models import VACCINES
from schemas.signing_keys import PublicKey, new_certificate
from tests import hcert_spec

EU_DCC = Path(__file__).parent.parent / "data" / "eu-dcc"
SUBJECT = "ab" * 32


def make_key(purpose: str, now: datetime | None = None) -> tuple[PublicKey, ec.EllipticCurvePrivateKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    return PublicKey.from_der(new_certificate(private, purpose, now or datetime.now(UTC)), purpose), private


@pytest.mark.parametrize(
    ("name", "machine"),
    [
        ("Nguyễn", "NGUYEN"),
        ("Trần Thị Bích-Ngọc", "TRAN<THI<BICH<NGOC"),
        ("Đặng  Ưng", "DANG<UNG"),
        ("Phạm Ngũ Lão", "PHAM<NGU<LAO"),
        ("d'Červenková Panklová", "DCERVENKOVA<PANKLOVA"),  # the EU schema's own example
        ("Müller", "MUELLER"),
        ("123", ""),
    ],
)
def test_icao_transliteration(name, machine):
    assert hcert.icao(name) == machine


@pytest.mark.parametrize(
    ("ordinal", "vaccine", "expected"),
    [(1, "pfizer", (1, 2)), (2, "pfizer", (2, 2)), (3, "pfizer", (3, 3)), (1, "janssen", (1, 1))]
    + [(2, "janssen", (2, 1)), (3, "abdala", (3, 3)), (4, "abdala", (4, 4))],
)
def test_dose_and_series_numbers_follow_the_eu_encoding_instructions(ordinal, vaccine, expected):
    assert hcert.series_numbers(ordinal, hcert.PRODUCTS[vaccine]) == expected


def test_every_certifiable_vaccine_has_active_eu_codes_that_belong_together():
    """Each product's (mp, ma, vp) is an entry of the EU encoding instructions, every code active."""
    instructions = json.loads((EU_DCC / "vaccine-encoding-instructions.json").read_text())["valueSetValues"]
    sets = {
        name: json.loads((EU_DCC / f"{name}.json").read_text())["valueSetValues"]
        for name in ("vaccine-medicinal-product", "vaccine-mah-manf", "vaccine-prophylaxis")
    }
    for vaccine, product in hcert.PRODUCTS.items():
        entry = next(e for e in instructions.values() if e["vaccine-code"] == product.mp)
        assert entry["vaccine-manufacturer"] == product.ma and product.vp in entry["sct-codes"], vaccine
        assert sets["vaccine-medicinal-product"][product.mp]["active"], vaccine
        assert sets["vaccine-mah-manf"][product.ma]["active"], vaccine
        assert sets["vaccine-prophylaxis"][product.vp]["active"], vaccine
    assert set(VACCINES) == set(hcert.PRODUCTS)  # every vaccine the edge accepts is certifiable


def dose(vaccine: str = "pfizer", at: str = "2021-08-03T20:15:00Z") -> dict:
    return {"event_id": "5c1580f8-eefc-49ea-ae3e-34a5966163e3", "occurred_at": at, "vaccine": vaccine}


def test_the_payload_is_valid_eu_dcc_with_the_local_date():
    holder = hcert.Holder("Nguyễn", "Văn An", "1980-02-29")
    payload = hcert.payload(holder, dose(at="2021-08-03T20:15:00Z"), 2, hcert.new_uvci())
    hcert_spec.validate_payload(payload)
    assert payload["v"][0]["dt"] == "2021-08-04"  # 03:15 the next morning in Vietnam
    assert payload["nam"] == {"fn": "Nguyễn", "fnt": "NGUYEN", "gn": "Văn An", "gnt": "VAN<AN"}
    only_family = hcert.payload(hcert.Holder("Lê", "", "1950"), dose(), 1, hcert.new_uvci())
    hcert_spec.validate_payload(only_family)
    assert only_family["nam"] == {"fn": "Lê", "fnt": "LE"}
    with pytest.raises(Refused, match="no EU DCC product code"):
        hcert.payload(holder, dose("unknown"), 1, hcert.new_uvci())


def test_uvcis_are_unique_and_well_formed():
    ids = {hcert.new_uvci() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("URN:UVCI:01:VN:") and len(i) == 41 and i[15:].isalnum() for i in ids)


def test_sign_and_verify_and_each_refusal():
    key, private = make_key("hcert")
    payload = hcert.payload(hcert.Holder("Lê", "Văn Tám", "1930"), dose(), 1, hcert.new_uvci())
    text, iat, exp = hcert.sign(payload, "AB1234", key, private)
    trusted = {key.kid: key}.get
    now = int(time.time())
    cert = hcert.verify(text, trusted, now)
    assert cert.dcc == payload and cert.lot == "AB1234" and cert.kid == key.kid and exp - iat == 365 * 86400
    # the independent implementation agrees
    assert hcert_spec.verify_hc1(text, {key.kid: key.der}, now)["hcert"] == payload

    other, _ = make_key("hcert")
    message = zlib.decompress(base45.b45decode(text[4:]))
    changed = bytearray(message)
    changed[-80] ^= 0x01
    refusals = {
        "HC2:" + text[4:]: "prefix",
        "HC1:Ä": "base45",
        "HC1:" + base45.b45encode(b"xx").decode(): "zlib",
        "HC1:" + base45.b45encode(zlib.compress(b"\xa0")).decode(): "cose",
        "HC1:" + base45.b45encode(zlib.compress(bytes(changed))).decode(): "signature",
    }
    for bad, reason in refusals.items():
        with pytest.raises(Refused) as refused:
            hcert.verify(bad, trusted, now)
        assert refused.value.reason == reason, bad
    for key_for, at, reason in [
        ({other.kid: other}.get, now, "unknown-key"),
        (trusted, exp + 1, "expired"),
        (trusted, iat - 3600, "not-yet-valid"),
    ]:
        with pytest.raises(Refused) as refused:
            hcert.verify(text, key_for, at)
        assert refused.value.reason == reason
    with pytest.raises(Refused) as refused:
        hcert.verify(text, trusted, now, revoked={hcert.uci_hash(payload["v"][0]["ci"])})
    assert refused.value.reason == "revoked"
    assert hcert.uci_hash(payload["v"][0]["ci"]) == hcert_spec.uci_hash(payload["v"][0]["ci"])


def test_a_key_expired_before_the_signature_refuses():
    old, private = make_key("hcert", datetime.now(UTC) - timedelta(days=800))
    payload = hcert.payload(hcert.Holder("Lê", "", "1930"), dose(), 1, hcert.new_uvci())
    text, _, _ = hcert.sign(payload, None, old, private)
    with pytest.raises(Refused) as refused:
        hcert.verify(text, {old.kid: old}.get, int(time.time()))
    assert refused.value.reason == "signature" and "not valid at the code's issue time" in refused.value.message


def test_health_book_codes_name_the_subject_only_and_keys_do_not_cross_purposes():
    key, private = make_key("healthbook")
    text, token = healthbook.issue(SUBJECT, key, private)
    assert text.startswith("HB1:") and len(text) < 250
    assert healthbook.verify(text, {key.kid: key}.get, int(time.time())) == token
    cert_key, cert_private = make_key("hcert")
    cert, _, _ = hcert.sign(hcert.payload(hcert.Holder("A", "", "1990"), dose(), 1, "x"), None, cert_key, cert_private)
    with pytest.raises(Refused) as refused:
        healthbook.verify("HB1:" + cert[4:], {key.kid: key}.get, int(time.time()))
    assert refused.value.reason == "unknown-key"
    with pytest.raises(ValueError, match="subject_id"):
        healthbook.issue("079201012345", key, private)  # a national id is never put in a code


@pytest.mark.parametrize(
    ("text", "problem"),
    [("1980-02-29", None), ("1980-02", None), ("1980", None), ("1981-02-29", "YYYY-MM-DD"), ("80-01-01", "YYYY")]
    + [("1899", "between 1900"), ("2999-01-01", "between 1900"), ("", "YYYY"), ("1980/01/01", "YYYY")],
)
def test_birth_dates(text, problem):
    found = hcert.birth_date_problem(text)
    assert (found is None) if problem is None else (problem in found)


def appointment(site: str, start: datetime, n: int = 2) -> dict:
    iso = start.isoformat().replace("+00:00", "Z")
    return {"appointment_id": f"AP-{site}-{iso}", "site_id": site, "slot_start": iso, "slot_end": iso, "dose_number": n}


def test_the_matching_appointment_is_at_this_site_today_nearest_now():
    now = datetime(2021, 8, 10, 3, 0, tzinfo=UTC)  # 10:00 in Vietnam
    here_later = appointment("S1", now + timedelta(hours=4))
    here_sooner = appointment("S1", now + timedelta(minutes=30))
    elsewhere = appointment("S2", now)
    tomorrow = appointment("S1", now + timedelta(hours=16))  # 02:00 UTC the 11th is 09:00 local the 11th
    assert matching_appointment([here_later, here_sooner, elsewhere, tomorrow], "S1", now) == here_sooner
    assert matching_appointment([elsewhere, tomorrow], "S1", now) is None


def test_the_staff_view_warns_of_serious_adverse_events_and_a_mismatched_appointment():
    now = datetime(2021, 8, 10, 3, 0, tzinfo=UTC)
    record = {
        "doses": [dose()],
        "fully_vaccinated": False,
        "serious_adverse_events": [{"event_id": "e", "occurred_at": "2021-08-04T00:00:00Z", "province_code": "79"}],
        "appointments": [appointment("S1", now, n=3)],
    }
    view = staff_view(record, SUBJECT, "S1", now)
    assert view["dose_due"] == 2 and view["valid_doses"] == 1 and view["appointment"]["dose_number"] == 3
    assert len(view["warnings"]) == 2
    nobody = staff_view(None, SUBJECT, "S1", now)
    assert nobody["valid_doses"] == 0 and nobody["dose_due"] == 1 and nobody["appointment"] is None
    assert nobody["warnings"] == []

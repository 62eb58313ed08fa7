"""tests/hcert_spec.py, the independent HCERT verifier, against the specifications' own examples.

No product code: the certificates here are built by hand in the test, from the RFCs.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import zlib

import cbor2
import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.hcert_spec import (
    BASE45_ALPHABET,
    HcertRefused,
    base45_decode,
    kid_of,
    uci_hash,
    validate_payload,
    verify_hc1,
)

NOW = 1_700_000_000
DAY = 86_400

# The shape of the schema's examples/vaccination/simple.json, as Comirnaty.
PAYLOAD = {
    "ver": "1.3.0",
    "nam": {"fn": "Smith-Jones", "fnt": "SMITH<JONES", "gn": "Charles Edward", "gnt": "CHARLES<EDWARD"},
    "dob": "1964-01-01",
    "v": [
        {
            "tg": "840539006",
            "vp": "1119349007",
            "mp": "EU/1/20/1528",
            "ma": "ORG-100030215",
            "dn": 1,
            "sd": 2,
            "dt": "2021-06-11",
            "co": "NL",
            "is": "Ministry of Health Welfare and Sport",
            "ci": "URN:UVCI:01:NL:DADFCC47C7334E45A906DB12FD859FB7#1",
        }
    ],
}


def base45_encode(data: bytes) -> str:
    """RFC 9285 section 4: two bytes -> three characters (least significant first), a last byte -> two."""
    out = []
    for i in range(0, len(data), 2):
        n, size = int.from_bytes(data[i : i + 2], "big"), 3 if len(data) - i >= 2 else 2
        for _ in range(size):
            n, digit = divmod(n, 45)
            out.append(BASE45_ALPHABET[digit])
    return "".join(out)


def self_signed(key, *, days: int = 3 * 365) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"), x509.NameAttribute(NameOID.COMMON_NAME, "DSC")])
    start = dt.datetime.fromtimestamp(NOW - 365 * DAY, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def dsc() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, self_signed(key)


def sign_hc1(key, kid: bytes, claims: dict, *, flip_signature: bool = False, kid_unprotected: bool = False) -> str:
    """COSE_Sign1 by hand (RFC 9052 section 4): ES256 for an EC key (raw r || s), PS256 for an RSA key."""
    alg = -37 if isinstance(key, rsa.RSAPrivateKey) else -7
    protected = cbor2.dumps({1: alg} if kid_unprotected else {1: alg, 4: kid})
    payload = cbor2.dumps(claims)
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    if alg == -37:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        signature = bytearray(key.sign(to_be_signed, pss, hashes.SHA256()))
    else:
        r, s = decode_dss_signature(key.sign(to_be_signed, ec.ECDSA(hashes.SHA256())))
        signature = bytearray(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    if flip_signature:
        signature[10] ^= 0x01
    unprotected = {4: kid} if kid_unprotected else {}
    cose = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, bytes(signature)]))
    return "HC1:" + base45_encode(zlib.compress(cose, 9))


def claims(*, iat: int = NOW - DAY, exp: int = NOW + 30 * DAY) -> dict:
    return {1: "VN", 4: exp, 6: iat, -260: {1: PAYLOAD}}


def refusal(text: str, trust_list: dict[bytes, bytes]) -> str:
    with pytest.raises(HcertRefused) as e:
        verify_hc1(text, trust_list, NOW)
    return e.value.reason


@pytest.mark.parametrize(
    ("text", "data"),
    [("BB8", b"AB"), ("%69 VD92EX0", b"Hello!!"), ("UJCLQE7W581", b"base-45"), ("QED8WEX0", b"ietf!"), ("", b"")],
)
def test_base45_rfc9285_examples(text: str, data: bytes) -> None:
    assert base45_decode(text) == data
    assert base45_encode(data) == text


@pytest.mark.parametrize("text", ["A", "ABCD", "GGW", "ZZ", "bb8", "BB#", "BB8\n"])
def test_base45_refuses_bad_characters_lengths_and_overflow(text: str) -> None:
    # "GGW" is 16 + 16*45 + 32*2025 = 65536, "ZZ" is 35 + 35*45 = 1610: neither fits.
    with pytest.raises(ValueError):
        base45_decode(text)


def test_kid_is_the_first_eight_bytes_of_the_certificates_sha256(dsc) -> None:
    _, der = dsc
    assert kid_of(der) == hashlib.sha256(der).digest()[:8] and len(kid_of(der)) == 8


def test_uci_hash_is_truncated_sha256_in_base64() -> None:
    # sha256(b"abc") = ba7816bf 8f01cfea 414140de 5dae2223 ...: its first 16 bytes, base64.
    assert uci_hash("abc") == "ungWv48Bz+pBQUDeXa4iIw=="


def test_a_well_formed_certificate_is_accepted(dsc) -> None:
    key, der = dsc
    kid = kid_of(der)
    result = verify_hc1(sign_hc1(key, kid, claims()), {kid: der}, NOW)
    assert result == {"kid": kid, "iss": "VN", "iat": NOW - DAY, "exp": NOW + 30 * DAY, "hcert": PAYLOAD}


def test_one_flipped_signature_bit_is_refused(dsc) -> None:
    key, der = dsc
    assert refusal(sign_hc1(key, kid_of(der), claims(), flip_signature=True), {kid_of(der): der}) == "signature"


def test_an_unknown_kid_is_refused(dsc) -> None:
    key, der = dsc
    assert refusal(sign_hc1(key, b"\x00" * 8, claims()), {kid_of(der): der}) == "unknown-kid"


def test_an_expired_certificate_is_refused(dsc) -> None:
    key, der = dsc
    assert refusal(sign_hc1(key, kid_of(der), claims(exp=NOW)), {kid_of(der): der}) == "expired"


def test_ps256_with_the_kid_in_the_unprotected_header_is_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = self_signed(key)
    result = verify_hc1(sign_hc1(key, kid_of(der), claims(), kid_unprotected=True), {kid_of(der): der}, NOW)
    assert result["kid"] == kid_of(der) and result["hcert"] == PAYLOAD


def test_a_dsc_expired_at_verification_time_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = self_signed(key, days=365 - 2)  # valid from NOW - 365 days until NOW - 2 days
    text = sign_hc1(key, kid_of(der), claims(iat=NOW - 3 * DAY))
    assert refusal(text, {kid_of(der): der}) == "unknown-kid"
    assert verify_hc1(text, {kid_of(der): der}, NOW - 3 * DAY)


def test_a_certificate_issued_in_the_future_is_refused(dsc) -> None:
    key, der = dsc
    assert refusal(sign_hc1(key, kid_of(der), claims(iat=NOW + 301)), {kid_of(der): der}) == "not-yet-valid"
    assert verify_hc1(sign_hc1(key, kid_of(der), claims(iat=NOW + 300)), {kid_of(der): der}, NOW)


def test_a_missing_prefix_is_refused(dsc) -> None:
    key, der = dsc
    text = sign_hc1(key, kid_of(der), claims())
    assert refusal(text.removeprefix("HC1:"), {kid_of(der): der}) == "prefix"


def test_broken_transport_layers_are_refused(dsc) -> None:
    key, der = dsc
    trust = {kid_of(der): der}
    assert refusal("HC1:bb8", trust) == "base45"
    assert refusal("HC1:" + base45_encode(b"not zlib"), trust) == "zlib"
    assert refusal("HC1:" + base45_encode(zlib.compress(cbor2.dumps([1, 2, 3]))), trust) == "cose"


def test_the_payload_fits_schema_and_value_sets() -> None:
    validate_payload(PAYLOAD)


@pytest.mark.parametrize("dob", ["1964-1-1", "1899-01-01", "01.01.1964"])
def test_a_bad_dob_is_refused_by_the_schema(dob: str) -> None:
    bad = copy.deepcopy(PAYLOAD) | {"dob": dob}
    with pytest.raises(jsonschema.ValidationError):
        validate_payload(bad)


@pytest.mark.parametrize(
    ("field", "code"),
    [
        ("mp", "NVX-CoV2373"),  # in the value set, "active": false
        ("mp", "EU/9/99/9999"),  # not in the value set
        ("ma", "ORG-100031184"),  # Moderna: active, but not Comirnaty's manufacturer
        ("vp", "1157024006"),  # inactivated vaccine: active, but not a type Comirnaty is encoded with
        ("tg", "840539007"),
    ],
)
def test_a_code_outside_the_value_sets_is_refused(field: str, code: str) -> None:
    bad = copy.deepcopy(PAYLOAD)
    bad["v"][0][field] = code
    with pytest.raises(ValueError, match=f"^{field}:"):
        validate_payload(bad)

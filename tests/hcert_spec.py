"""An independent second implementation of EU Digital COVID Certificate (HCERT) verification, for tests.

Written from the specifications alone -- the eHealth Network's "Electronic Health Certificate
Specification" v1.0.5 (HCERT), RFC 9052 (COSE_Sign1), RFC 8392 (CWT) and RFC 9285 (Base45) -- so
that tests can hold the certificates our own code produces against a second opinion. It
deliberately shares no code with the product: it imports nothing from nhdp, schemas, producers,
projections, streams or infra, and no COSE/CWT/Base45 library; only zlib, cbor2, cryptography
and jsonschema.

The JSON schema (tag 1.3.0) and value sets it validates against are vendored, with their
licence and provenance, in tests/data/eu-dcc/.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jsonschema import Draft202012Validator

DATA = Path(__file__).resolve().parent / "data" / "eu-dcc"

# RFC 9285 section 4.
BASE45_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_BASE45_VALUE = {c: i for i, c in enumerate(BASE45_ALPHABET)}

PREFIX = "HC1:"
ES256, PS256 = -7, -37  # the only algorithms HCERT allows (section 3.3.2)
ALG, KID = 1, 4  # COSE header labels (RFC 9052 section 3.1)
ISS, EXP, IAT, HCERT = 1, 4, 6, -260  # CWT claim keys (RFC 8392, HCERT section 3.3.1)
EU_DGC_V1 = 1  # key of the certificate inside the hcert claim
CLOCK_SKEW = 300  # seconds an iat may lie in the future
MAX_INFLATED = 1 << 20  # a QR code holds < 3 kB; refuse zlib bombs


class HcertRefused(Exception):
    """A certificate the verifier refuses; `reason` is a short machine string."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def base45_decode(text: str) -> bytes:
    """RFC 9285: three characters c, d, e are n = c + 45*d + 45*45*e, two bytes big-endian; two trailing
    characters are one byte."""
    if len(text) % 3 == 1:
        raise ValueError(f"base45: invalid length {len(text)}")
    out = bytearray()
    for i in range(0, len(text), 3):
        chunk = text[i : i + 3]
        try:
            digits = [_BASE45_VALUE[c] for c in chunk]
        except KeyError as e:
            raise ValueError(f"base45: invalid character {e.args[0]!r}") from None
        n = sum(d * 45**k for k, d in enumerate(digits))
        size = 2 if len(chunk) == 3 else 1
        if n >= 256**size:
            raise ValueError(f"base45: {chunk!r} overflows {size} byte(s)")
        out += n.to_bytes(size, "big")
    return bytes(out)


def kid_of(der: bytes) -> bytes:
    """HCERT section 3.3.1: the kid is the first 8 bytes of the SHA-256 of the DSC's DER encoding."""
    return hashlib.sha256(der).digest()[:8]


def uci_hash(ci: str) -> str:
    """EU DCC revocation, hash type UCI: the first 128 bits of SHA-256 of the UVCI, in standard base64."""
    return base64.b64encode(hashlib.sha256(ci.encode("utf-8")).digest()[:16]).decode("ascii")


def _cbor_whole(data: bytes) -> Any:
    """Decode exactly one CBOR item that spans all of `data`."""
    stream = io.BytesIO(data)
    item = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    return item


def _cose_sign1(raw: bytes) -> tuple[bytes, dict, dict, bytes, bytes]:
    """RFC 9052 section 4.2: COSE_Sign1 = [protected: bstr, unprotected: map, payload: bstr, signature: bstr],
    tag 18 or untagged (optionally inside the CWT tag 61 of RFC 8392 section 6)."""
    try:
        item = _cbor_whole(raw)
        if isinstance(item, cbor2.CBORTag) and item.tag == 61:
            item = item.value
        if isinstance(item, cbor2.CBORTag) and item.tag == 18:
            item = item.value
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError("not a 4-element COSE_Sign1 array")
        protected_bstr, unprotected, payload, signature = item
        if not all(isinstance(b, bytes) for b in (protected_bstr, payload, signature)):
            raise ValueError("protected, payload and signature must be byte strings")
        if not isinstance(unprotected, dict):
            raise ValueError("unprotected header is not a map")
        protected = _cbor_whole(protected_bstr) if protected_bstr else {}  # empty bstr = empty map
        if not isinstance(protected, dict):
            raise ValueError("protected header is not a map")
    except (ValueError, cbor2.CBORDecodeError) as e:
        raise HcertRefused("cose", str(e)) from e
    return protected_bstr, protected, unprotected, payload, signature


def _verify_signature(cert: x509.Certificate, alg: int, to_be_signed: bytes, signature: bytes) -> None:
    key = cert.public_key()
    try:
        if alg == ES256 and isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
            if len(signature) != 64:  # RFC 9053 section 2.1: r || s, 32 bytes each
                raise HcertRefused("signature", f"ES256 signature of {len(signature)} bytes")
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            key.verify(der, to_be_signed, ec.ECDSA(hashes.SHA256()))
        elif alg == PS256 and isinstance(key, rsa.RSAPublicKey):
            # RFC 8230 section 2: RSASSA-PSS, SHA-256, MGF1 with SHA-256, salt as long as the hash.
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            key.verify(signature, to_be_signed, pss, hashes.SHA256())
        else:
            raise HcertRefused("signature", f"alg {alg} does not fit the DSC's {type(key).__name__}")
    except InvalidSignature as e:
        raise HcertRefused("signature", "does not verify") from e


def verify_hc1(text: str, trust_list: dict[bytes, bytes], now: int) -> dict:
    """Verify an `HC1:` string against `trust_list` (kid -> DER DSC) at unix time `now`; raise HcertRefused."""
    if not text.startswith(PREFIX):
        raise HcertRefused("prefix", repr(text[:4]))
    try:
        compressed = base45_decode(text[len(PREFIX) :])
    except ValueError as e:
        raise HcertRefused("base45", str(e)) from e
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, MAX_INFLATED)
    except zlib.error as e:
        raise HcertRefused("zlib", str(e)) from e
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise HcertRefused("zlib", "truncated, oversized or trailing data")

    protected_bstr, protected, unprotected, payload, signature = _cose_sign1(raw)
    kid = protected.get(KID, unprotected.get(KID))  # HCERT 3.3.1: protected first, else unprotected
    alg = protected.get(ALG)
    if not isinstance(kid, bytes):
        raise HcertRefused("cose", "no kid")
    if alg not in (ES256, PS256):
        raise HcertRefused("cose", f"alg {alg!r} is not ES256 or PS256")

    if kid not in trust_list:
        raise HcertRefused("unknown-kid", kid.hex())
    cert = x509.load_der_x509_certificate(trust_list[kid])
    if cert.not_valid_after_utc.timestamp() < now:
        raise HcertRefused("unknown-kid", f"DSC {kid.hex()} expired at {cert.not_valid_after_utc.isoformat()}")

    to_be_signed = cbor2.dumps(["Signature1", protected_bstr, b"", payload])  # RFC 9052 section 4.4
    _verify_signature(cert, alg, to_be_signed, signature)

    try:
        claims = _cbor_whole(payload)
    except (ValueError, cbor2.CBORDecodeError) as e:
        raise HcertRefused("claims", str(e)) from e
    if not isinstance(claims, dict):
        raise HcertRefused("claims", "payload is not a map")
    exp, iat = claims.get(EXP), claims.get(IAT)
    for name, value in (("exp", exp), ("iat", iat)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HcertRefused("claims", f"{name} is not a NumericDate: {value!r}")
    if iat > cert.not_valid_after_utc.timestamp():
        raise HcertRefused("signature", "signed after the DSC expired")
    if exp <= now:
        raise HcertRefused("expired", f"exp {exp} <= now {now}")
    if iat > now + CLOCK_SKEW:
        raise HcertRefused("not-yet-valid", f"iat {iat} > now {now} + {CLOCK_SKEW}")
    hcert = claims.get(HCERT)
    if not isinstance(hcert, dict) or not isinstance(hcert.get(EU_DGC_V1), dict):
        raise HcertRefused("claims", "no hcert claim -260 with eu_dgc_v1 (1)")
    return {"kid": kid, "iss": claims.get(ISS), "iat": iat, "exp": exp, "hcert": hcert[EU_DGC_V1]}


@cache
def _json(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@cache
def _validator() -> Draft202012Validator:
    schema = _json("DCC.combined-schema.json")
    Draft202012Validator.check_schema(schema)
    # "format" is only an annotation in 2020-12 unless asserted; assert it (checks "date", not "date-time"
    # without the optional rfc3339-validator package).
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _check_code(entry: dict, field: str, value_set: str) -> None:
    value = _json(f"{value_set}.json")["valueSetValues"].get(entry[field])
    if value is None or value.get("active") is not True:
        raise ValueError(f"{field}: {entry[field]!r} is not an active code of {value_set}")


def validate_payload(hcert: dict) -> None:
    """The eu_dgc_v1 payload against schema 1.3.0 (jsonschema.ValidationError) and the value sets (ValueError)."""
    _validator().validate(hcert)
    for group in ("v", "t", "r"):
        for entry in hcert.get(group, []):
            _check_code(entry, "tg", "disease-agent-targeted")
    for entry in hcert.get("v", []):
        _check_code(entry, "vp", "vaccine-prophylaxis")
        _check_code(entry, "mp", "vaccine-medicinal-product")
        _check_code(entry, "ma", "vaccine-mah-manf")
        instructions = _json("vaccine-encoding-instructions.json")["valueSetValues"].values()
        same_mp = [i for i in instructions if i["vaccine-code"] == entry["mp"]]
        if not same_mp:
            raise ValueError(f"mp: {entry['mp']!r} has no vaccine encoding instruction")
        same_ma = [i for i in same_mp if i["vaccine-manufacturer"] == entry["ma"]]
        if not same_ma:
            raise ValueError(f"ma: {entry['ma']!r} is not the manufacturer encoded with mp {entry['mp']!r}")
        if not any(entry["vp"] in i["sct-codes"] for i in same_ma):
            raise ValueError(f"vp: {entry['vp']!r} is not a vaccine type encoded with mp {entry['mp']!r}")

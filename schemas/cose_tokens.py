"""Signed CBOR Web Tokens in QR-sized text: COSE_Sign1 (ES256), zlib, Base45, a prefix.

The one encoding both of the platform's QR codes use (schemas/hcert.py for
vaccination certificates, `HC1:`; schemas/healthbook.py for the citizen's
health-book code, `HB1:`), as the HCERT specification lays it out:

    claims --CBOR--> COSE_Sign1 --zlib--> Base45 --prefix--> QR (alphanumeric mode)

The `kid` sits in the protected header, so it is covered by the signature
(HCERT §3.3.1); `cwt`'s defaults would put it in the unprotected one. Base45
uses exactly the QR alphanumeric alphabet, which is what keeps the code small.

`open_signed` refuses with a reason a person can act on, in the order the
steps fail: prefix, encoding, structure, unknown key, signature; the caller
then checks the claims (time, revocation) it cares about.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

import base45
import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cwt import COSE, COSEKey, load_pem_hcert_dsc
from cwt.exceptions import CWTError

from schemas.signing_keys import PublicKey

COSE_SIGN1_TAG = 18
ALG_ES256 = -7
HDR_ALG, HDR_KID = 1, 4
# CWT claims (RFC 8392)
ISS, EXP, IAT = 1, 4, 6
# The longest a compressed token may be: a QR code at level Q holds at most 3,057 alphanumeric characters.
MAX_TEXT = 3057


class Refused(ValueError):
    """A code that does not verify; `reason` is a stable word for programs, the message is for people."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class _Keys:
    """COSE keys made once per kid (a PEM round trip costs more than the signature)."""

    def __init__(self) -> None:
        self._signing: dict[bytes, COSEKey] = {}
        self._verifying: dict[bytes, COSEKey] = {}
        self._lock = threading.Lock()

    def signing(self, kid: bytes, private: ec.EllipticCurvePrivateKey) -> COSEKey:
        with self._lock:
            key = self._signing.get(kid)
            if key is None:
                pem = private.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                key = self._signing[kid] = COSEKey.from_pem(pem, alg="ES256", kid=kid)
            return key

    def verifying(self, key: PublicKey) -> COSEKey:
        with self._lock:
            cose = self._verifying.get(key.kid)
            if cose is None:
                pem = key.certificate.public_bytes(serialization.Encoding.PEM)
                cose = self._verifying[key.kid] = load_pem_hcert_dsc(pem)
            return cose


_KEYS = _Keys()
_COSE = COSE.new(alg_auto_inclusion=True)


def seal(prefix: str, claims: dict, kid: bytes, private: ec.EllipticCurvePrivateKey) -> str:
    """The claims signed and packed into QR text: prefix + Base45(zlib(COSE_Sign1))."""
    signed = _COSE.encode(cbor2.dumps(claims), _KEYS.signing(kid, private), protected={HDR_KID: kid})
    return prefix + base45.b45encode(zlib.compress(signed, 9)).decode("ascii")


def cose_message(prefix: str, text: str) -> bytes:
    """The COSE_Sign1 bytes inside QR text, or Refused (prefix, base45, zlib)."""
    text = text.strip()
    if not text.startswith(prefix):
        raise Refused("prefix", f"not a code of this kind: it must start with {prefix!r}")
    if len(text) > MAX_TEXT:
        raise Refused("size", f"the code is {len(text)} characters; no QR code of ours is longer than {MAX_TEXT}")
    try:
        packed = base45.b45decode(text[len(prefix) :])
    except (ValueError, KeyError) as exc:
        raise Refused("base45", f"the code is damaged: not Base45 after {prefix!r} ({exc})") from None
    try:
        inflater = zlib.decompressobj()
        message = inflater.decompress(packed, 64 * 1024)
        if inflater.unconsumed_tail:
            raise Refused("zlib", "the code inflates to more than 64 KiB")
    except zlib.error as exc:
        raise Refused("zlib", f"the code is damaged: its zlib stream does not inflate ({exc})") from None
    return message


def kid_in(message: bytes) -> bytes:
    """The kid of a COSE_Sign1 (protected header first, as HCERT verifiers look), or Refused."""
    try:
        obj = cbor2.loads(message)
        if isinstance(obj, cbor2.CBORTag):
            if obj.tag != COSE_SIGN1_TAG:
                raise ValueError(f"CBOR tag {obj.tag}, not COSE_Sign1 ({COSE_SIGN1_TAG})")
            obj = obj.value
        if not (isinstance(obj, list) and len(obj) == 4):
            raise ValueError("not a 4-element COSE_Sign1 array")
        protected = cbor2.loads(obj[0]) if obj[0] else {}
        unprotected = obj[1] if isinstance(obj[1], dict) else {}
    except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
        raise Refused("cose", f"the code is not a signed COSE message: {exc}") from None
    kid = protected.get(HDR_KID, unprotected.get(HDR_KID))
    if not isinstance(kid, bytes):
        raise Refused("cose", "the code names no signing key (no kid)")
    if protected.get(HDR_ALG) != ALG_ES256:
        raise Refused("cose", f"the code is signed with algorithm {protected.get(HDR_ALG)!r}; only ES256 (-7) is used")
    return kid


def open_signed(prefix: str, text: str, key_for: Callable[[bytes], PublicKey | None]) -> tuple[PublicKey, dict]:
    """(the key that signed it, its claims) if the signature verifies; Refused otherwise.

    key_for(kid): the trusted key of that id, or None."""
    message = cose_message(prefix, text)
    kid = kid_in(message)
    key = key_for(kid)
    if key is None:
        raise Refused("unknown-key", f"signed by key {kid.hex()}, which is not in the trust list (foreign or expired)")
    try:
        payload = _COSE.decode(message, _KEYS.verifying(key))
    except CWTError as exc:
        raise Refused(
            "signature", f"the signature does not verify with key {kid.hex()}: forged or altered ({exc})"
        ) from None
    try:
        claims = cbor2.loads(payload)
    except (ValueError, cbor2.CBORDecodeError) as exc:
        raise Refused("claims", f"the signed content is not CBOR: {exc}") from None
    if not isinstance(claims, dict):
        raise Refused("claims", "the signed content is not a map of claims")
    return key, claims


def check_times(claims: dict, key: PublicKey, now: int, leeway_s: int = 300) -> tuple[int, int]:
    """(iat, exp) if the code is current and its key was valid when it signed; Refused otherwise."""
    iat, exp = claims.get(IAT), claims.get(EXP)
    if not isinstance(iat, int) or not isinstance(exp, int):
        raise Refused("claims", "the code has no issue time or expiry")
    if exp <= now:
        raise Refused("expired", f"the code expired at {exp} (now {now})")
    if iat > now + leeway_s:
        raise Refused("not-yet-valid", f"the code is issued in the future ({iat}; now {now})")
    if not key.not_before.timestamp() <= iat <= key.not_after.timestamp():
        raise Refused("signature", f"key {key.kid.hex()} was not valid at the code's issue time")
    return iat, exp

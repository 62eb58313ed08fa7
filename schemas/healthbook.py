"""The citizen's health-book QR: a signed token naming a subject, scanned at the site.

The token is a CWT sealed like a certificate (schemas/cose_tokens.py) with the
prefix `HB1:`. It carries the subject_id (the keyed pseudonym, as 32 raw bytes
in a private-use claim: half the characters of its hex form), the issuer, an
issue time and an expiry; never the national id, a name or a birth date. A
leaked code reveals nothing about its holder without the platform's records.

It is signed with the `healthbook` keys, not the certificate keys: a
certificate presented at check-in (or a health-book code presented as a
certificate) names a key of the wrong purpose and is refused as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.cose_tokens import EXP, IAT, ISS, Refused, check_times, open_signed, seal
from schemas.ids import is_subject_id
from schemas.signing_keys import PublicKey

PREFIX = "HB1:"
ISSUER = "nhdp"
CLAIM_SUBJECT = -65538  # private use (RFC 8392 §9.1): the subject_id's 32 bytes
TTL = timedelta(days=365)  # printed in the health book: long-lived, re-issued by the citizen app


@dataclass(frozen=True)
class Token:
    subject_id: str
    kid: bytes
    issued_at: int
    expires_at: int


def issue(subject_id: str, key: PublicKey, private, now: datetime | None = None) -> tuple[str, Token]:
    if not is_subject_id(subject_id):
        raise ValueError("a health-book code names a subject_id (64 hex digits)")
    now = now or datetime.now(UTC)
    iat, exp = int(now.timestamp()), int((now + TTL).timestamp())
    claims = {ISS: ISSUER, IAT: iat, EXP: exp, CLAIM_SUBJECT: bytes.fromhex(subject_id)}
    return seal(PREFIX, claims, key.kid, private), Token(subject_id, key.kid, iat, exp)


def verify(text: str, key_for, now: int) -> Token:
    """The token if its signature verifies with a healthbook key and it is current; Refused otherwise."""
    key, claims = open_signed(PREFIX, text, key_for)
    iat, exp = check_times(claims, key, now)
    raw = claims.get(CLAIM_SUBJECT)
    if claims.get(ISS) != ISSUER or not isinstance(raw, bytes) or len(raw) != 32:
        raise Refused("claims", "the code is signed but is not a health-book code (issuer or subject missing)")
    return Token(raw.hex(), key.kid, iat, exp)

"""The API's bearer tokens: signed JWTs (EdDSA, Ed25519) naming a caller's role and scope, and their revocation.

Why signed tokens rather than opaque ones looked up per request: the API
checks a signature in memory (~60 µs, no round trip), so authentication costs
the gateway nothing measurable, and a token says by itself what it allows.
Revocation before expiry is the one thing a signature cannot say: revoked ids
live in `access.tokens`, which the API polls (schemas/api_auth.py), so a
revocation holds within a second or two, everywhere.

Ed25519 because its keys are 32 bytes derived from one secret, its signatures
are small and deterministic, and PyJWT verifies it with `cryptography`; the
key id (`kid`) names the public key, so a rotated key fails as "unknown key",
not as a forgery. A token is short-lived (default 1 h) and carries `jti`, the
id revocation names.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
import orjson
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.access import Caller, ScopeError

ISSUER = "nhdp"
ALGORITHM = "EdDSA"
MAX_TTL = timedelta(days=400)  # a site system's credential, renewed yearly at most
_TTL = re.compile(r"^([0-9]{1,6})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

DDL = """
CREATE SCHEMA IF NOT EXISTS access;
CREATE TABLE IF NOT EXISTS access.tokens (
    jti        uuid PRIMARY KEY,
    name       text NOT NULL,
    role       text NOT NULL,
    scope      jsonb NOT NULL,
    issued_at  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS tokens_revoked ON access.tokens (expires_at) WHERE revoked_at IS NOT NULL;
"""


class TokenError(ValueError):
    """A token that does not authenticate anyone; the message says why (for the 401)."""


def parse_ttl(text: str) -> timedelta:
    """`90s`, `15m`, `1h`, `30d` → a timedelta, at most MAX_TTL."""
    m = _TTL.fullmatch(text.strip())
    if not m:
        raise ValueError(f"ttl {text!r}: a number and a unit, s m h or d (e.g. 15m, 1h, 30d)")
    ttl = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    if not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise ValueError(f"ttl {text!r}: must be between 1 s and {MAX_TTL.days} days")
    return ttl


@dataclass(frozen=True)
class Issued:
    token: str
    jti: str
    expires_at: datetime


class TokenKeys:
    """The signing key, derived from one secret (NHDP_API_TOKEN_SECRET or the local store's)."""

    def __init__(self, secret: str):
        seed = hashlib.sha256(b"nhdp api token key\0" + secret.encode()).digest()
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self._public = self._private.public_key()
        raw = self._public.public_bytes_raw()
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    def issue(self, caller: Caller, ttl: timedelta, now: datetime | None = None) -> Issued:
        now = now or datetime.now(UTC)
        jti = str(uuid.uuid4())
        claims = {
            "iss": ISSUER,
            "sub": caller.name,
            "role": caller.role,
            "iat": int(now.timestamp()),
            "exp": int((now + ttl).timestamp()),
            "jti": jti,
            **scope_claims(caller),
        }
        token = jwt.encode(claims, self._private, algorithm=ALGORITHM, headers={"kid": self.kid})
        return Issued(token, jti, now + ttl)

    def verify(self, token: str) -> Caller:
        """The caller a token names, or TokenError saying why it names no one."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"the bearer token is not a JWT ({exc})") from None
        if header.get("kid") != self.kid:
            raise TokenError("the bearer token was signed with a key this API does not know (rotated or foreign)")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "jti", "iss"]},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the bearer token has expired; ask for a new one (nhdp token issue)") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"the bearer token is not valid: {exc}") from None
        try:
            return Caller(
                name=str(claims["sub"]),
                role=str(claims.get("role")),
                province=claims.get("province"),
                source=claims.get("source"),
                provinces=frozenset(claims.get("provinces") or ()),
                token_id=str(claims["jti"]),
                expires_at=float(claims["exp"]),
            )
        except ScopeError as exc:
            raise TokenError(f"the bearer token's scope is not valid: {exc}") from None


def scope_claims(caller: Caller) -> dict:
    claims: dict = {}
    if caller.province:
        claims["province"] = caller.province
    if caller.source:
        claims["source"] = caller.source
        claims["provinces"] = sorted(caller.provinces)
    return claims


# -- the record of issued tokens, and revocation ------------------------------------------------


def ensure(conn: psycopg.Connection) -> None:
    conn.execute(DDL)


def record(conn: psycopg.Connection, caller: Caller, issued: Issued) -> None:
    conn.execute(
        "INSERT INTO access.tokens (jti, name, role, scope, issued_at, expires_at) VALUES (%s, %s, %s, %s, now(), %s)",
        (issued.jti, caller.name, caller.role, orjson.dumps(scope_claims(caller)).decode(), issued.expires_at),
    )


def revoke(conn: psycopg.Connection, jti: str) -> bool:
    """Revoke a token by its id; False if no such token was issued (or it is already revoked)."""
    try:
        uuid.UUID(jti)
    except ValueError:
        raise ValueError(f"token id {jti!r} must be a UUID (the jti that `nhdp token issue` printed)") from None
    return (
        conn.execute(
            "UPDATE access.tokens SET revoked_at = now() WHERE jti = %s AND revoked_at IS NULL", (jti,)
        ).rowcount
        > 0
    )


def revoked(conn: psycopg.Connection) -> set[str]:
    """The ids of revoked tokens that have not expired yet (an expired one fails on its own)."""
    return {
        str(r[0])
        for r in conn.execute(
            "SELECT jti FROM access.tokens WHERE revoked_at IS NOT NULL AND expires_at > now() - interval '1 minute'"
        )
    }

"""Who may connect to Kafka and the schema registry: principals, their kind, their password hashes.

One principal per service, each with the least it needs (DESIGN §8), plus one
`province_CODE` per province granted with `nhdp province grant`. Kafka keeps
its own SCRAM credentials and ACLs (infra/kafka_access.py); the schema
registry checks HTTP basic auth against this table, which keeps an argon2 hash
of each password and never the password itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# What a kind of principal may do in the schema registry.
ADMIN, PRODUCER, READER = "admin", "producer", "reader"
KINDS = (ADMIN, PRODUCER, READER)

# The platform's own principals. `gateway` is the API process; `producer` is the SDK's
# (internal services, the simulator); `nhdp` itself runs as `admin`.
SERVICES: dict[str, str] = {
    "admin": ADMIN,
    "gateway": PRODUCER,
    "producer": PRODUCER,
    "worker": READER,
    "sink": READER,
    "replay": READER,
}

_PROVINCE_CODE = re.compile(r"^[0-9]{2}$")
PROVINCE_PREFIX = "province_"

DDL = """
CREATE SCHEMA IF NOT EXISTS access;
CREATE TABLE IF NOT EXISTS access.principals (
    name          text PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('admin', 'producer', 'reader')),
    password_hash text NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
"""

# argon2id with the library's defaults (RFC 9106's second recommendation), ~50 ms a hash:
# the registry caches a verified credential (schemas/registry/auth.py) rather than pay it per request.
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    name: str
    kind: str
    password_hash: str

    def verify(self, password: str) -> bool:
        try:
            return _hasher.verify(self.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False


def province_principal(code: str) -> str:
    if not _PROVINCE_CODE.fullmatch(code):
        raise ValueError(f"province code {code!r} must be two digits, as in the reference data")
    return f"{PROVINCE_PREFIX}{code}"


def ensure(conn: psycopg.Connection) -> None:
    conn.execute(DDL)


def put(conn: psycopg.Connection, name: str, kind: str, password: str) -> None:
    """Create or rotate a principal's password (the hash only is stored)."""
    if kind not in KINDS:
        raise ValueError(f"principal kind {kind!r} must be one of {KINDS}")
    conn.execute(
        "INSERT INTO access.principals (name, kind, password_hash) VALUES (%s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, password_hash = excluded.password_hash, "
        "updated_at = now()",
        (name, kind, _hasher.hash(password)),
    )


def remove(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("DELETE FROM access.principals WHERE name = %s", (name,)).rowcount > 0


_LOOKUP = "SELECT name, kind, password_hash FROM access.principals WHERE name = %s"


def lookup(conn: psycopg.Connection, name: str) -> Principal | None:
    row = conn.execute(_LOOKUP, (name,)).fetchone()
    return Principal(*row) if row else None


async def lookup_async(conn: psycopg.AsyncConnection, name: str) -> Principal | None:
    """`lookup` for the registry's async pool."""
    row = await (await conn.execute(_LOOKUP, (name,))).fetchone()
    return Principal(*row) if row else None


def ensure_services(conn: psycopg.Connection, password_of) -> list[str]:
    """Every SERVICES principal with `password_of(name)`; rehashes only a changed password or kind
    (argon2 is ~50 ms a hash, so a second `nhdp up` costs a verify each). Returns the names written."""
    ensure(conn)
    written = []
    for name, kind in SERVICES.items():
        password = password_of(name)
        known = lookup(conn, name)
        if known is None or known.kind != kind or not known.verify(password):
            put(conn, name, kind, password)
            written.append(name)
    return written

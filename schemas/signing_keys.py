"""The platform's ES256 signing keys: one ring per purpose, rotated, published by key id.

Two purposes: `hcert` signs vaccination certificates (EU DCC), `healthbook`
signs the citizen's QR token. Each key is a P-256 key with a self-signed
X.509 certificate (the Document Signer Certificate of the HCERT spec); its
`kid` is the first 8 bytes of the SHA-256 of that certificate's DER bytes,
so anyone holding the certificate can recompute it.

Where each part lives, and why:
* the private key: a 0600 file in the secrets folder (infra/secrets.py), never
  in the database and never printed; a deployment mounts that folder from its
  vault or HSM bridge on every API host;
* the certificate (public) and its validity: `certs.keys` in PostgreSQL, so
  every API process signs with the same newest key, and the trust list and
  every verifier see a rotation at once.

Signing uses the newest key whose certificate outlives what it signs (its
`not_after` is at least the signed item's expiry), so no certificate ever
names a key that expires first. `rotate` adds a new key; older keys stay in
the trust list until their certificates expire, so what they signed still
verifies.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from infra.secrets import Secrets

PURPOSES = ("hcert", "healthbook")
# How long a key's certificate is valid, and the longest-lived thing it may sign.
KEY_VALIDITY = timedelta(days=730)
# HCERT spec §5.1: a DSC may restrict what it signs by extended key usage; 1.3.6.1.4.1.1847.2021.1.2 is vaccination.
HCERT_VACCINATION_EKU = ObjectIdentifier("1.3.6.1.4.1.1847.2021.1.2")
_REFRESH_S = 1.0  # an unknown kid makes the ring re-read the table at most this often
_STALE_S = 2.0  # how long a rotation by another process may take to reach this one's signing

DDL = """
CREATE SCHEMA IF NOT EXISTS certs;
CREATE TABLE IF NOT EXISTS certs.keys (
    kid        bytea PRIMARY KEY,
    purpose    text NOT NULL,
    der        bytea NOT NULL,        -- the X.509 certificate: public, the trust list publishes it
    not_before timestamptz NOT NULL,
    not_after  timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS keys_by_purpose ON certs.keys (purpose, created_at);
"""


class SigningKeyError(LookupError):
    """No key can sign or verify this; the message says what to do."""


def kid_of(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()[:8]


@dataclass(frozen=True)
class PublicKey:
    kid: bytes
    purpose: str
    der: bytes
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_der(cls, der: bytes, purpose: str) -> PublicKey:
        """The key a certificate holds, its kid recomputed and its validity read from the certificate itself."""
        cert = x509.load_der_x509_certificate(der)
        return cls(kid_of(der), purpose, der, cert.not_valid_before_utc, cert.not_valid_after_utc)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    def trust_entry(self) -> dict:
        return {
            "kid": base64.b64encode(self.kid).decode(),
            "purpose": self.purpose,
            "certificate": base64.b64encode(self.der).decode(),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
        }


def _secret_name(purpose: str, kid: bytes) -> str:
    return f"signing-{purpose}-{kid.hex()}"


def new_certificate(private: ec.EllipticCurvePrivateKey, purpose: str, now: datetime) -> bytes:
    """A self-signed certificate for the key, valid KEY_VALIDITY from now (DER)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NHDP"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"NHDP {purpose} signer {now:%Y-%m-%d %H:%M:%S}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + KEY_VALIDITY)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
    )
    if purpose == "hcert":
        builder = builder.add_extension(x509.ExtendedKeyUsage([HCERT_VACCINATION_EKU]), critical=False)
    return builder.sign(private, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class KeyRing:
    """The keys of every purpose: sign with the newest, verify with any unexpired one.

    Thread-safe; the public keys are cached and re-read when a kid is not known
    (a rotation by another process), at most once a second."""

    def __init__(self, postgres_url: str, secrets: Secrets):
        self.url, self.secrets = postgres_url, secrets
        self._lock = threading.Lock()
        self._keys: dict[bytes, PublicKey] = {}
        self._private: dict[bytes, ec.EllipticCurvePrivateKey] = {}
        self._read_at = float("-inf")

    # -- the table ---------------------------------------------------------------------------
    def ensure(self, conn: psycopg.Connection) -> None:
        conn.execute(DDL)

    def _read(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            self.ensure(conn)
            rows = conn.execute(
                "SELECT kid, purpose, der, not_before, not_after FROM certs.keys ORDER BY created_at"
            ).fetchall()
        self._keys = {bytes(k): PublicKey(bytes(k), p, bytes(d), nb, na) for k, p, d, nb, na in rows}
        self._read_at = time.monotonic()

    def keys(self, purpose: str, *, refresh: bool = False) -> list[PublicKey]:
        """Every key of the purpose, oldest first (expired ones included)."""
        with self._lock:
            if refresh or time.monotonic() - self._read_at >= _STALE_S:
                self._read()
            return [k for k in self._keys.values() if k.purpose == purpose]

    def rotate(self, purpose: str, now: datetime | None = None) -> PublicKey:
        """A new key for the purpose; it signs from now on. The private key is written before the
        certificate is published, so a published kid always has its key."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose {purpose!r} must be one of {', '.join(PURPOSES)}")
        now = now or datetime.now(UTC)
        private = ec.generate_private_key(ec.SECP256R1())
        der = new_certificate(private, purpose, now)
        key = PublicKey.from_der(der, purpose)
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.secrets.put(_secret_name(purpose, key.kid), pem.decode())
        with psycopg.connect(self.url, autocommit=True) as conn:
            self.ensure(conn)
            conn.execute(
                "INSERT INTO certs.keys (kid, purpose, der, not_before, not_after) VALUES (%s, %s, %s, %s, %s)",
                (key.kid, purpose, der, key.not_before, key.not_after),
            )
        with self._lock:
            self._read()
        return self._keys[key.kid]

    # -- signing -----------------------------------------------------------------------------
    def signer(self, purpose: str, lifetime: timedelta) -> tuple[PublicKey, ec.EllipticCurvePrivateKey]:
        """The newest key whose certificate outlives `lifetime` from now; the first is made on first use
        (one process at a time: an advisory lock, so two API processes starting together make one)."""
        key = self._current(purpose, lifetime)
        if key is None:
            with psycopg.connect(self.url, autocommit=True) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"nhdp.signing.{purpose}",))
                key = self._current(purpose, lifetime, refresh=True)
                if key is None:
                    key = self.rotate(purpose)
        return key, self._private_key(key)

    def _current(self, purpose: str, lifetime: timedelta, refresh: bool = False) -> PublicKey | None:
        due = datetime.now(UTC) + lifetime
        usable = [k for k in self.keys(purpose, refresh=refresh) if k.not_after >= due]
        return usable[-1] if usable else None

    def _private_key(self, key: PublicKey) -> ec.EllipticCurvePrivateKey:
        with self._lock:
            private = self._private.get(key.kid)
        if private is None:
            name = _secret_name(key.purpose, key.kid)
            if not self.secrets.exists(name):
                raise SigningKeyError(
                    f"the private key of {key.purpose} key {key.kid.hex()} is not in {self.secrets.folder} "
                    "on this host; mount the signing keys folder, or rotate (nhdp keys rotate)"
                )
            loaded = serialization.load_pem_private_key(self.secrets.get(name).encode(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise SigningKeyError(f"{name} is not an EC private key")
            private = loaded
            with self._lock:
                self._private[key.kid] = private
        return private

    # -- verifying ---------------------------------------------------------------------------
    def public(self, purpose: str, kid: bytes) -> PublicKey | None:
        """The key that kid names, if it is of this purpose; re-reads the table for a kid not seen yet."""
        with self._lock:
            key = self._keys.get(kid)
            if key is None and time.monotonic() - self._read_at >= _REFRESH_S:
                self._read()
                key = self._keys.get(kid)
        return key if key is not None and key.purpose == purpose else None

    def trust_list(self, purpose: str = "hcert", now: datetime | None = None) -> list[dict]:
        """Every key of the purpose whose certificate has not expired: what verifiers trust."""
        now = now or datetime.now(UTC)
        return [k.trust_entry() for k in self.keys(purpose, refresh=True) if k.not_after > now]

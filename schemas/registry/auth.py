"""HTTP basic auth of the registry, as Confluent's clients send it (`basic.auth.user.info`).

Credentials are checked against `access.principals` (schemas/principals.py).
An argon2id verify costs ~50 ms, so a verified (name, sha256(password)) is
remembered for `ttl_s`: a rotated or revoked password stops working within
that time. Only successes are remembered, keyed by the password's digest, so
a wrong password always goes to argon2 and can never match a cached entry.

Rights by kind (DESIGN §8): every authenticated principal reads (GET, and
POST /subjects/{s}, which is Confluent's lookup); producers and admin register
and test compatibility; only admin deletes and changes config or mode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import orjson

from schemas.principals import ADMIN, PRODUCER, Principal

REALM = "nhdp-registry"
OPEN_PATHS = frozenset({"/healthz"})  # the stack's readiness probe


class VerifiedCache:
    """(name, sha256(password)) → kind for `ttl_s` after a successful verify; bounded, thread-safe."""

    def __init__(self, ttl_s: float = 60.0, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(name: str, password: str) -> tuple[str, bytes]:
        return name, hashlib.sha256(password.encode()).digest()

    def get(self, name: str, password: str) -> str | None:
        key = self._key(name, password)
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            kind, expires = hit
            if self.clock() >= expires:
                del self._entries[key]
                return None
            return kind

    def put(self, name: str, password: str, kind: str) -> None:
        with self._lock:
            self._entries[self._key(name, password)] = (kind, self.clock() + self.ttl_s)
            self._entries.move_to_end(self._key(name, password))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class Denied(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_basic(header: bytes | None) -> tuple[str, str]:
    """(user, password) from an `Authorization: Basic …` header, or Denied(401) saying what is wrong."""
    if not header:
        raise Denied(401, 40101, "Unauthorized: no credentials; send HTTP basic auth (basic.auth.user.info)")
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "basic":
        raise Denied(401, 40101, f"Unauthorized: the {scheme!r} scheme is not accepted; use HTTP basic auth")
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Denied(401, 40101, "Unauthorized: the basic credentials are not valid base64 of user:password") from None
    if not sep or not user:
        raise Denied(401, 40101, "Unauthorized: the basic credentials must be user:password")
    return user, password


class Authenticator:
    """Who a request's basic credentials name, and their kind; argon2 runs off the event loop."""

    def __init__(self, lookup: Callable[[str], Awaitable[Principal | None]], cache: VerifiedCache | None = None):
        self.lookup = lookup
        self.cache = cache or VerifiedCache()

    async def kind_of(self, user: str, password: str) -> str:
        kind = self.cache.get(user, password)
        if kind is not None:
            return kind
        principal = await self.lookup(user)
        # An unknown name and a wrong password get the same answer, so names cannot be probed.
        if principal is None or not await asyncio.to_thread(principal.verify, password):
            raise Denied(401, 40101, f"Unauthorized: wrong user name or password for {user!r}")
        self.cache.put(user, password, principal.kind)
        return principal.kind


def needed_kinds(method: str, path: str) -> tuple[frozenset[str] | None, str]:
    """Which kinds may make this request (None: every authenticated principal), and the right's name."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return None, "read"
    if method == "POST" and path.startswith("/subjects/") and not path.rstrip("/").endswith("/versions"):
        return None, "read"  # Confluent's lookup: is this schema registered under the subject?
    if method == "POST":
        return frozenset({PRODUCER, ADMIN}), "register"
    return frozenset({ADMIN}), "admin"


class BasicAuth:
    """ASGI middleware in front of the registry's routes (and its FastPath): 401 or 403 in Confluent's shape."""

    def __init__(self, app, authenticator: Authenticator):
        self.app, self.authenticator = app, authenticator

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            user, password = parse_basic(dict(scope["headers"]).get(b"authorization"))
            kind = await self.authenticator.kind_of(user, password)
            allowed, right = needed_kinds(scope["method"], scope["path"])
            if allowed is not None and kind not in allowed:
                needs = "admin" if right == "admin" else "producer or admin"
                raise Denied(
                    403,
                    40301,
                    f"Forbidden: {scope['method']} {scope['path']} needs {needs}; principal {user!r} is a {kind}",
                )
        except Denied as exc:
            return await _refuse(send, exc)
        scope.setdefault("state", {})["principal"] = (user, kind)
        return await self.app(scope, receive, send)


async def _refuse(send, exc: Denied) -> None:
    payload = orjson.dumps({"error_code": exc.code, "message": exc.message})
    headers = [
        (b"content-type", b"application/vnd.schemaregistry.v1+json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if exc.status == 401:
        headers.append((b"www-authenticate", f'Basic realm="{REALM}"'.encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})

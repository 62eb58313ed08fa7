"""Authentication and rights for the API: who a bearer token names, and whether that caller may do this.

Every route declares what it needs with `Depends(require(Right.X))` (or reads
`caller` and checks a scoped right itself: a province, a source); the rights of
each role are in schemas/access.py, their one home. A missing or bad token is
a 401 with `WWW-Authenticate: Bearer`; a token without the right is a 403 that
names the missing right and the token's role, so a person knows what to ask for.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Body, Depends, Request
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from infra.settings import Settings
from schemas import tokens
from schemas.access import ROLES, Caller, Right, ScopeError

log = logging.getLogger("nhdp.auth")

REFRESH_S = 1.0  # how long a revocation may take to reach this process
_CACHE_MAX = 4096


class AccessDenied(Exception):
    """401 (who are you?) or 403 (you may not); nhdp.app turns it into a JSON error."""

    def __init__(self, status: int, message: str, missing: str | None = None):
        super().__init__(message)
        self.status, self.message, self.missing = status, message, missing

    def body(self) -> dict[str, Any]:
        return {"error": self.message} | ({"missing_right": self.missing} if self.missing else {})

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": 'Bearer realm="nhdp"'} if self.status == 401 else None


class Gatekeeper:
    """Verifies tokens in memory and keeps the set of revoked ones current (polled from PostgreSQL)."""

    def __init__(self, settings: Settings):
        self.keys = tokens.TokenKeys(settings.token_secret())
        self._url = settings.postgres_url
        self._revoked: frozenset[str] = frozenset()
        self._cache: dict[str, Caller] = {}
        self._stop = threading.Event()
        with psycopg.connect(self._url, autocommit=True) as conn:
            tokens.ensure(conn)
            self._revoked = frozenset(tokens.revoked(conn))
        self._thread = threading.Thread(target=self._poll, name="nhdp-revocations", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        conn = None
        while not self._stop.wait(REFRESH_S):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self._url, autocommit=True)
                self._revoked = frozenset(tokens.revoked(conn))
            except psycopg.Error as exc:  # keep the last known set; the next poll retries
                log.warning("revocation list not refreshed: %s", exc)
                conn = None
        if conn is not None:
            conn.close()

    def authenticate(self, token: str) -> Caller:
        caller = self._cache.get(token)
        if caller is None or caller.expires_at <= time.time():
            caller = self.keys.verify(token)  # TokenError, also for one that expired since it was cached
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[token] = caller
        if caller.token_id in self._revoked:
            raise tokens.TokenError(f"the bearer token {caller.token_id} has been revoked")
        return caller

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def gatekeeper(request: Request) -> Gatekeeper:
    return request.app.state.gatekeeper


class Bearer(HTTPBearer):
    """The one dependency of a protected route: the verified caller, if it holds any of `rights`
    (none: any caller). An HTTPBearer, so OpenAPI shows the scheme and /docs can authorize.

    One dependency rather than a chain (bearer → caller → check): each level of FastAPI's
    dependency solving costs ~10 µs a request, as much as a cached summary's whole answer."""

    def __init__(self, *rights: Right):
        super().__init__(
            auto_error=False,
            scheme_name="bearer",
            bearerFormat="JWT",
            description="A token from `nhdp token issue --role …` (or POST /v1/tokens as admin).",
        )
        self.rights = rights

    async def __call__(self, request: Request) -> Caller:  # type: ignore[override]
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AccessDenied(
                401, "this endpoint needs a bearer token: Authorization: Bearer <token from nhdp token issue>"
            )
        try:
            who = request.app.state.gatekeeper.authenticate(token.strip())
        except tokens.TokenError as exc:
            raise AccessDenied(401, str(exc)) from None
        request.state.caller = who  # for the access log
        if self.rights and not any(who.has(r) for r in self.rights):
            raise forbidden(who, self.rights[0], f"{request.method} {request.url.path}")
        return who


def roles_with(right: Right) -> str:
    return ", ".join(role for role, rights in ROLES.items() if right in rights)


def forbidden(who: Caller, right: Right, what: str) -> AccessDenied:
    return AccessDenied(
        403,
        f"{what} needs the right {right.value} (roles: {roles_with(right)}); this token is {who.label}",
        missing=right.value,
    )


def require(*rights: Right) -> Bearer:
    """A route's dependency: the caller, if it holds any of these rights; else 403 naming the first."""
    return Bearer(*rights)


# Any verified caller; the route then checks a scoped right itself (a province, a source).
Authenticated = Annotated[Caller, Depends(Bearer())]


# -- tokens over HTTP (admin) ---------------------------------------------------------------------


class TokenRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}$", description="who the token is for")
    role: str = Field(description=f"one of {', '.join(ROLES)}")
    province: str | None = Field(None, description="role province: its province code")
    source: str | None = Field(None, description="role producer: the source its events carry")
    provinces: list[str] = Field(default_factory=list, description="role producer: where it may write ('*': all)")
    ttl: str = Field("1h", description="lifetime: 90s, 15m, 1h, 30d")


def issue(conn: psycopg.Connection, keys: tokens.TokenKeys, request: TokenRequest) -> tokens.Issued:
    """Issue and record a token; ValueError (ScopeError) if the role and scope do not fit."""
    who = Caller(
        name=request.name,
        role=request.role,
        province=request.province,
        source=request.source,
        provinces=frozenset(request.provinces),
    )
    issued = keys.issue(who, tokens.parse_ttl(request.ttl))
    tokens.ensure(conn)
    tokens.record(conn, who, issued)
    return issued


router = APIRouter(tags=["access"])
Admin = Annotated[Caller, Depends(require(Right.ADMIN))]


@router.post("/v1/tokens", summary="Issue a token (admin)", status_code=201)
async def post_token(request: Request, body: Annotated[TokenRequest, Body()], _: Admin):
    def run() -> tokens.Issued:
        with psycopg.connect(request.app.state.settings.postgres_url, autocommit=True) as conn:
            return issue(conn, gatekeeper(request).keys, body)

    try:
        issued = await run_in_threadpool(run)
    except (ScopeError, ValueError) as exc:
        raise AccessDenied(400, str(exc)) from None
    return {"token": issued.token, "jti": issued.jti, "expires_at": issued.expires_at.isoformat()}


@router.get("/v1/me", summary="Who this token is: its role, scope and rights (the dashboard adapts to it)")
async def me(who: Authenticated):
    return {
        "name": who.name,
        "role": who.role,
        "province": who.province,
        "rights": sorted(r.value for r in who.rights),
        "expires_at": datetime.fromtimestamp(who.expires_at, UTC).isoformat() if who.expires_at < 1e12 else None,
    }


@router.delete("/v1/tokens/{jti}", summary="Revoke a token before it expires (admin)")
async def delete_token(jti: str, request: Request, _: Admin):
    def run() -> bool:
        with psycopg.connect(request.app.state.settings.postgres_url, autocommit=True) as conn:
            return tokens.revoke(conn, jti)

    try:
        done = await run_in_threadpool(run)
    except ValueError as exc:
        raise AccessDenied(400, str(exc)) from None
    if not done:
        raise AccessDenied(404, f"no unrevoked token {jti} was ever issued")
    return {"revoked": jti, "at": datetime.now(UTC).isoformat()}


def issue_token(settings: Settings, name: str, role: str, *, ttl: str = "1h", **scope: Any) -> tokens.Issued:
    """Issue a token with this machine's signing key (the `nhdp` command, the demo, tests, benchmarks)."""
    request = TokenRequest(name=name, role=role, ttl=ttl, **scope)
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        return issue(conn, tokens.TokenKeys(settings.token_secret()), request)


class SourceTokens:
    """token_for(source) for a client posting on behalf of many sources (the simulator, `nhdp import`):
    one producer token per source, for every province, issued on first use with this machine's key."""

    def __init__(self, settings: Settings, ttl: str = "12h"):
        self.settings, self.ttl = settings, ttl
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, source: str) -> str:
        with self._lock:
            token = self._tokens.get(source)
            if token is None:
                name = f"import:{source}"[:64]
                token = issue_token(self.settings, name, "producer", ttl=self.ttl, source=source, provinces=["*"]).token
                self._tokens[source] = token
            return token

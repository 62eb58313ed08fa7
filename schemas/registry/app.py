"""The Confluent Schema Registry REST API (AVRO only) over `Store`.

Paths, JSON shapes and error codes follow Confluent's, so stock clients
(confluent-kafka's SchemaRegistryClient, AvroSerializer/AvroDeserializer,
the Java serdes) work unchanged. Bodies are parsed by hand rather than by
pydantic models so malformed input gets Confluent's error codes.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra.settings import get_settings
from schemas import principals
from schemas.registry import compat
from schemas.registry.auth import Authenticator, BasicAuth, VerifiedCache
from schemas.registry.store import RegistryError, Store, check_candidate

log = logging.getLogger("nhdp.registry")

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
MAX_VERSION = 2**31 - 1


class JSON(Response):
    media_type = MEDIA_TYPE

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _error(status: int, code: int, message: str) -> JSON:
    return JSON({"error_code": code, "message": message}, status_code=status)


def _flag(request: Request, *names: str) -> bool:
    """Query booleans; Python clients send `True`/`False` as well as `true`/`false`."""
    for name in names:
        value = request.query_params.get(name)
        if value is not None:
            return value.strip().lower() in ("true", "1", "yes")
    return False


def _version(subject: str, raw: str) -> int | None:
    """A version path segment: a number in [1, 2^31-1], or latest/-1 (→ None)."""
    if raw == "latest" or raw == "-1":
        return None
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if not 1 <= v <= MAX_VERSION:
        raise RegistryError(
            422,
            42202,
            f"The specified version '{raw}' is not a valid version id. "
            f'Allowed values are between [1, {MAX_VERSION}] and the string "latest"',
        )
    return v


def _schema_id(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise RegistryError(404, 40403, f"Schema {raw} not found") from None


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise RegistryError(400, 400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RegistryError(422, 422, "Request body must be a JSON object")
    return body


async def _candidate(request: Request) -> compat.Canonical:
    """The schema in a register/lookup/compatibility request, validated and canonical."""
    body = await _body(request)
    schema_type = body.get("schemaType") or "AVRO"
    if str(schema_type).upper() != "AVRO":
        raise RegistryError(
            422, 42201, f"Invalid schema: schemaType {schema_type!r} is not supported; this registry stores AVRO only"
        )
    if body.get("references"):
        raise RegistryError(422, 42201, "Invalid schema: schema references are not supported by this registry")
    if body.get("id") is not None:
        raise RegistryError(422, 42205, "Overriding the schema id (IMPORT mode) is not supported by this registry")
    # metadata and ruleSet (data contracts) are accepted and ignored.
    text = body.get("schema")
    if not isinstance(text, str):
        raise RegistryError(422, 42201, "Invalid schema: the request has no 'schema' string")
    try:
        return compat.canonicalize(text)
    except compat.InvalidSchema as exc:
        raise RegistryError(422, 42201, str(exc)) from None


def _level_from(body: dict) -> str:
    raw = body.get("compatibility", body.get("compatibilityLevel"))
    level = compat.normalize_level(raw)
    if level is None:
        raise RegistryError(
            422,
            42203,
            f"Invalid compatibility level {raw!r}. Valid values are none, backward, forward, full, "
            "backward_transitive, forward_transitive, and full_transitive",
        )
    return level


def _version_json(v) -> dict:
    # Confluent leaves schemaType out for AVRO.
    return {"subject": v.subject, "version": v.version, "id": v.id, "schema": v.schema}


def create_app(dsn: str, *, max_body_bytes: int | None = None, auth_ttl_s: float = 60.0) -> FastAPI:
    """`max_body_bytes`: default NHDP_REGISTRY_MAX_BODY_BYTES (1 MiB: a schema is a few KiB).
    `auth_ttl_s`: how long a verified credential is trusted without a new argon2 verify."""
    store = Store(dsn)

    async def lookup(name: str) -> principals.Principal | None:
        async with store.pool.connection() as conn:
            return await principals.lookup_async(conn, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await store.open()
        log.info("registry: ready, storing in PostgreSQL")
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(
        title="NHDP schema registry",
        default_response_class=JSON,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.store = store
    app.add_middleware(FastPath, store=store)
    # Outside FastPath, so a cache hit is answered only to an authenticated principal.
    app.add_middleware(BasicAuth, authenticator=Authenticator(lookup, VerifiedCache(auth_ttl_s)))
    # Added last, so outermost: it bounds FastPath's reads as well as the routes'.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or get_settings().registry_max_body_bytes)

    # -- errors in Confluent's shape --------------------------------------------------
    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        phrase = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, exc.status_code, f"HTTP {exc.status_code} {phrase}")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(422, 422, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(PoolTimeout)
    async def _timeout(request: Request, exc: PoolTimeout):
        return _error(500, 50002, f"Operation timed out: no PostgreSQL connection available ({exc})")

    @app.exception_handler(psycopg.Error)
    async def _store_error(request: Request, exc: psycopg.Error):
        log.exception("registry: store error")
        return _error(500, 50001, f"Error in the backend data store: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("registry: unexpected error")
        return _error(500, 500, f"Internal error: {type(exc).__name__}: {exc}")

    # -- root and health ---------------------------------------------------------------
    @app.get("/")
    async def root():
        return {}

    @app.get("/healthz")
    async def healthz():
        try:
            await store.ping()
        except Exception as exc:
            return JSON({"status": "down", "postgres": str(exc)}, status_code=503)
        return {"status": "ok", "postgres": "ok", "change_listener": store.listening}

    # -- schemas by id -------------------------------------------------------------------
    @app.get("/schemas/types")
    async def schema_types():
        return ["AVRO"]

    @app.get("/schemas/ids/{schema_id}")
    async def schema_by_id(schema_id: str, request: Request):
        # ?subject= names a context in Confluent; ids are global here, so it is ignored.
        sid = _schema_id(schema_id)
        out = {"schema": await store.schema_by_id(sid)}
        if _flag(request, "fetchMaxId"):
            out["maxId"] = await store.max_id()
        return out

    @app.get("/schemas/ids/{schema_id}/schema")
    async def raw_schema_by_id(schema_id: str):
        return Response(await store.schema_by_id(_schema_id(schema_id)), media_type=MEDIA_TYPE)

    @app.get("/schemas/ids/{schema_id}/versions")
    async def versions_by_id(schema_id: str, request: Request):
        rows = await store.versions_of_id(_schema_id(schema_id), _flag(request, "deleted"))
        return [{"subject": s, "version": v} for s, v in rows]

    @app.get("/schemas/ids/{schema_id}/subjects")
    async def subjects_by_id(schema_id: str, request: Request):
        rows = await store.versions_of_id(_schema_id(schema_id), _flag(request, "deleted"))
        return sorted({s for s, _ in rows})

    # -- subjects ------------------------------------------------------------------------
    @app.get("/subjects")
    async def subjects(request: Request):
        names = await store.subjects(
            _flag(request, "deleted"),
            _flag(request, "deleted_only", "deletedOnly"),
            request.query_params.get("subjectPrefix", ""),
        )
        return _page(names, request)

    @app.post("/subjects/{subject}/versions")
    async def register(subject: str, request: Request):
        # ?normalize is accepted: every schema is stored in canonical form anyway.
        canon = await _candidate(request)
        schema_id, version = await store.register(subject, canon)
        return {"id": schema_id, "version": version, "subject": subject}

    @app.post("/subjects/{subject}")
    async def lookup(subject: str, request: Request):
        canon = await _candidate(request)
        v = await store.lookup(subject, canon, _flag(request, "deleted"))
        return _version_json(v)

    @app.get("/subjects/{subject}/versions")
    async def versions(subject: str, request: Request):
        out = await store.versions(subject, _flag(request, "deleted"), _flag(request, "deleted_only", "deletedOnly"))
        return _page(out, request)

    @app.get("/subjects/{subject}/versions/{version}")
    async def get_version(subject: str, version: str, request: Request):
        v = await store.get_version(subject, _version(subject, version), _flag(request, "deleted"))
        return _version_json(v)

    @app.get("/subjects/{subject}/versions/{version}/schema")
    async def get_version_schema(subject: str, version: str, request: Request):
        v = await store.get_version(subject, _version(subject, version), _flag(request, "deleted"))
        return Response(v.schema, media_type=MEDIA_TYPE)

    @app.get("/subjects/{subject}/versions/{version}/referencedby")
    async def referenced_by(subject: str, version: str):
        await store.get_version(subject, _version(subject, version))
        return []  # references are not supported, so nothing refers to anything

    @app.delete("/subjects/{subject}/versions/{version}")
    async def delete_version(subject: str, version: str, request: Request):
        return await store.delete_version(subject, _version(subject, version), _flag(request, "permanent"))

    @app.delete("/subjects/{subject}")
    async def delete_subject(subject: str, request: Request):
        return await store.delete_subject(subject, _flag(request, "permanent"))

    # -- compatibility -------------------------------------------------------------------
    async def _test(subject: str, version: int | None, all_versions: bool, request: Request):
        canon = await _candidate(request)
        level = await store.level(subject)
        if all_versions:
            previous = await store.previous_for_check(subject, None, True)
        else:
            previous = await store.previous_for_check(subject, version, False)
            # Against one given version only the direction of the level counts.
            level = level.removesuffix("_TRANSITIVE")
        messages = await asyncio.to_thread(check_candidate, level, canon.text, previous)
        out: dict = {"is_compatible": not messages}
        if _flag(request, "verbose"):
            out["messages"] = messages
        return out

    @app.post("/compatibility/subjects/{subject}/versions/{version}")
    async def test_compatibility(subject: str, version: str, request: Request):
        return await _test(subject, _version(subject, version), False, request)

    @app.post("/compatibility/subjects/{subject}/versions")
    async def test_compatibility_all(subject: str, request: Request):
        return await _test(subject, None, True, request)

    # -- config --------------------------------------------------------------------------
    @app.get("/config")
    async def get_config():
        return {"compatibilityLevel": await store.level(None)}

    @app.put("/config")
    async def put_config(request: Request):
        level = _level_from(await _body(request))
        await store.set_level(None, level)
        return {"compatibility": level}

    @app.delete("/config")
    async def delete_config():
        old = await store.delete_level(None)
        return {"compatibilityLevel": old or compat.DEFAULT_LEVEL}

    @app.get("/config/{subject}")
    async def get_subject_config(subject: str, request: Request):
        level = await store.subject_level(subject)
        if level is None:
            if _flag(request, "defaultToGlobal"):
                level = await store.level(None)
            else:
                raise RegistryError(
                    404, 40408, f"Subject '{subject}' does not have subject-level compatibility configured"
                )
        return {"compatibilityLevel": level}

    @app.put("/config/{subject}")
    async def put_subject_config(subject: str, request: Request):
        level = _level_from(await _body(request))
        await store.set_level(subject, level)
        return {"compatibility": level}

    @app.delete("/config/{subject}")
    async def delete_subject_config(subject: str):
        old = await store.delete_level(subject)
        if old is None:
            raise RegistryError(404, 40408, f"Subject '{subject}' does not have subject-level compatibility configured")
        return {"compatibilityLevel": old}

    # -- mode: always READWRITE (no IMPORT/READONLY support) -----------------------------
    @app.get("/mode")
    @app.get("/mode/{subject}")
    async def get_mode(subject: str | None = None):
        return {"mode": "READWRITE"}

    @app.put("/mode")
    @app.put("/mode/{subject}")
    async def put_mode(request: Request, subject: str | None = None):
        mode = str((await _body(request)).get("mode", "")).upper()
        if mode != "READWRITE":
            raise RegistryError(422, 42204, f"Invalid mode {mode!r}: this registry supports only READWRITE")
        return {"mode": mode}

    return app


class _TooLarge(Exception):
    """Raised by BodyLimit's receive; no handler of the app knows it, so it comes back out to BodyLimit."""


class BodyLimit:
    """Refuses a body over max_bytes with 413: from its Content-Length before it is read,
    else (chunked) as soon as the bytes received pass the limit, whoever is reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, f"body is {int(length):,} bytes")
        received = 0
        started = False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send, f"body is over {self.max_bytes:,} bytes")

    async def _refuse(self, send, what: str) -> None:
        payload = orjson.dumps(
            {"error_code": 413, "message": f"Request body too large: {what}; the limit is {self.max_bytes:,}"}
        )
        # Connection: close, or the server would read the rest of the body to throw it away.
        headers = _HEADERS + [(b"content-length", str(len(payload)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class FastPath:
    """Answers the hot calls from the in-process caches without FastAPI's routing.

    `POST /subjects/{s}` (lookup) and `POST /subjects/{s}/versions` (register) of
    a schema already known in that subject, and `GET /schemas/ids/{id}`, are what
    every serializer and deserializer calls; on a cache hit they need neither
    the database nor the framework. Anything else, or a miss, goes on to the app
    with the body replayed.
    """

    def __init__(self, app, store: Store):
        self.app, self.store = app, store

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").lower()
        if method == "GET" and path.startswith("/schemas/ids/") and b"fetchmaxid" not in query:
            text = self.store.cached_schema(_int_or_none(path[13:]))
            if text is not None:
                return await _send(send, orjson.dumps({"schema": text}))
        elif method == "POST" and path.startswith("/subjects/") and b"deleted=true" not in query:
            rest = path[10:]
            subject, _, tail = rest.partition("/")
            if subject and tail in ("", "versions"):
                body, receive = await _read_body(receive)
                out = self._hit(subject, tail == "versions", body)
                if out is not None:
                    return await _send(send, out)
        return await self.app(scope, receive, send)

    def _hit(self, subject: str, register: bool, body: bytes) -> bytes | None:
        try:
            req = orjson.loads(body)
            text = req["schema"]
            if req.get("references") or req.get("id") is not None or (req.get("schemaType") or "AVRO") != "AVRO":
                return None
            canon = compat.canonicalize(text)
        except Exception:
            return None  # the app will answer with the proper error
        hit = self.store.cached_version(subject, canon.fingerprint)
        if hit is None:
            return None
        version, schema_id = hit
        if register:
            return orjson.dumps({"id": schema_id, "version": version, "subject": subject})
        return orjson.dumps({"subject": subject, "version": version, "id": schema_id, "schema": canon.text})


def _int_or_none(raw: str) -> int | None:
    return int(raw) if raw.isdigit() else None


async def _read_body(receive):
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnect: let the app see it

            async def replay_disconnect(message=message):
                return message

            return b"", replay_disconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


_HEADERS = [(b"content-type", MEDIA_TYPE.encode())]


async def _send(send, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": _HEADERS + [(b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _page(items: list, request: Request) -> list:
    try:
        offset = max(0, int(request.query_params.get("offset", 0)))
        limit = int(request.query_params.get("limit", -1))
    except ValueError:
        return items
    items = items[offset:]
    return items if limit < 0 else items[:limit]

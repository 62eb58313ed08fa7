"""A small synchronous client for a Confluent-compatible schema registry.

Only the calls the codec needs: register a schema under a subject, look one
up, fetch a schema by id. Every answer is cached for the life of the client
(ids and schemas never change once assigned), so encoding and decoding cost no
HTTP round-trip per message: one per schema, ever.

Transport failures and 5xx answers are retried with backoff (registering the
same schema twice returns the same id, so retrying POSTs is safe). What is
left is raised as :class:`RegistryError` with the HTTP status and Confluent
``error_code``; callers treat an unreachable registry as back-pressure, not as
a bad message.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from urllib.parse import quote

import httpx

from schemas.catalog import canonical

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(Exception):
    """The registry refused a request or could not be reached.

    ``status`` is the HTTP status (None when no answer arrived) and
    ``error_code`` the Confluent error code from the body (e.g. 40403 schema
    not found, 409 incompatible schema, 42201 invalid schema), when given.
    """

    def __init__(self, message: str, *, status: int | None = None, error_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def unreachable(self) -> bool:
        """No usable answer (connection failed, or 5xx after retries): worth retrying later."""
        return self.status is None or self.status >= 500


class RegistryClient:
    """Sync client for ``base_url`` (e.g. ``http://127.0.0.1:8081``); thread-safe."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        client: httpx.Client | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        """client: an httpx.Client to share (its headers are not changed; the
        requests carry the registry content type and credentials themselves).
        auth: (principal, password) for the registry's HTTP basic auth."""
        self.base_url = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(*auth) if auth else None
        self._retries = max(0, retries)
        self._backoff_s = backoff_s
        self._http = client or httpx.Client(timeout=timeout)
        self._owns_http = client is None
        self._lock = threading.Lock()
        self._ids: dict[tuple[str, str], int] = {}  # (subject, canonical schema) -> id
        self._schemas: dict[int, dict[str, Any]] = {}

    @classmethod
    def for_settings(cls, settings, **kwargs: Any) -> RegistryClient:
        """The registry of `settings`, as its principal (settings.principal / settings.password)."""
        return cls(settings.registry_url, auth=(settings.principal, settings.password), **kwargs)

    # -- public API ----------------------------------------------------------

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register schema under subject (idempotent) and return its global id."""
        key = (subject, canonical(schema))
        found = self._ids.get(key)
        if found is not None:
            return found
        body = self._request("POST", f"/subjects/{_q(subject)}/versions", {"schema": key[1]})
        schema_id = _id_of(body, "register")
        with self._lock:
            self._ids[key] = schema_id
            self._schemas.setdefault(schema_id, json.loads(key[1]))
        return schema_id

    def lookup(self, subject: str, schema: dict[str, Any]) -> int:
        """Id of schema if already registered under subject; RegistryError(404) if not."""
        key = (subject, canonical(schema))
        found = self._ids.get(key)
        if found is not None:
            return found
        body = self._request("POST", f"/subjects/{_q(subject)}", {"schema": key[1]})
        schema_id = _id_of(body, "lookup")
        with self._lock:
            self._ids[key] = schema_id
            self._schemas.setdefault(schema_id, json.loads(key[1]))
        return schema_id

    def get_schema(self, schema_id: int) -> dict[str, Any]:
        """The schema with this global id, parsed from its JSON text."""
        found = self._schemas.get(schema_id)
        if found is not None:
            return found
        body = self._request("GET", f"/schemas/ids/{int(schema_id)}")
        text = body.get("schema") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise RegistryError(f"registry answer for schema id {schema_id} has no 'schema' text: {body!r}")
        kind = body.get("schemaType", "AVRO")
        if kind != "AVRO":
            raise RegistryError(f"schema id {schema_id} is a {kind} schema, not Avro")
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise RegistryError(f"schema id {schema_id} is not valid JSON: {e}") from e
        with self._lock:
            self._schemas.setdefault(schema_id, schema)
        return self._schemas[schema_id]

    def subjects_of(self, schema_id: int) -> list[str]:
        """The subjects that list this schema id (Confluent's GET /schemas/ids/{id}/subjects)."""
        body = self._request("GET", f"/schemas/ids/{int(schema_id)}/subjects")
        if not isinstance(body, list) or not all(isinstance(x, str) for x in body):
            raise RegistryError(f"registry answer for the subjects of schema id {schema_id} is not a list: {body!r}")
        return body

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        content = json.dumps(payload).encode() if payload is not None else None
        headers = {"Accept": CONTENT_TYPE}
        if content is not None:
            headers["Content-Type"] = CONTENT_TYPE
        last: RegistryError | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff_s * (2 ** (attempt - 1)))
            try:
                resp = self._http.request(
                    method,
                    self.base_url + path,
                    content=content,
                    headers=headers,
                    auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as e:
                last = RegistryError(f"registry {self.base_url} unreachable ({method} {path}): {e!r}")
                continue
            if resp.status_code < 400:
                try:
                    return resp.json()
                except ValueError as e:
                    raise RegistryError(
                        f"registry answered {method} {path} with non-JSON: {resp.text[:200]!r}",
                        status=resp.status_code,
                    ) from e
            err = _error_of(resp, method, path)
            if resp.status_code < 500:
                raise err
            last = err
        assert last is not None
        raise last


def _q(subject: str) -> str:
    return quote(subject, safe="")


def _id_of(body: Any, what: str) -> int:
    if isinstance(body, dict) and isinstance(body.get("id"), int):
        return body["id"]
    raise RegistryError(f"registry {what} answer has no integer 'id': {body!r}")


def _error_of(resp: httpx.Response, method: str, path: str) -> RegistryError:
    code: int | None = None
    message = resp.text[:500]
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("error_code") if isinstance(body.get("error_code"), int) else None
        message = str(body.get("message", message))
    return RegistryError(
        f"registry refused {method} {path}: HTTP {resp.status_code}"
        + (f", error_code {code}" if code is not None else "")
        + f": {message}",
        status=resp.status_code,
        error_code=code,
    )

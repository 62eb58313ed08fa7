"""`POST /v1/events`: validate, pseudonymise, deduplicate, publish, then answer.

The answer comes only after Kafka has acknowledged (acks=all) every accepted
event, so "accepted" means durable. Re-sends are recognised by event_id in a
bounded PostgreSQL table (`gateway.seen_events`):

- the ids of a request are *reserved* by inserting them inside one
  transaction that stays open while Kafka acknowledges. A concurrent request
  carrying the same id blocks on that uncommitted row, then sees it: an event
  is never published twice by two racing requests;
- ids whose publish failed are deleted before commit, and a crash aborts the
  transaction, so a failed publish never leaves an id that would make the
  retry look like a duplicate (no loss);
- the same id with different content is a conflict, rejected with its reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import orjson
import psycopg
from fastapi import APIRouter, Depends, Request
from fastapi.responses import ORJSONResponse
from kafka.errors import MessageSizeTooLargeError
from prometheus_client import Counter, Histogram
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from infra.settings import Settings
from producers.pseudonym import Pseudonymiser, checked_edge_record
from producers.sdk import EventProducer, PublishError
from schemas.access import VOID_EVENT, Caller, Right, may_void
from schemas.api_auth import require
from schemas.bounds import TRACE_ID, TRACE_ID_MAX

log = logging.getLogger("nhdp.gateway")

MAX_EVENTS = 10_000
RETRY_AFTER_S = 5
# How the SDK names an event too large for one Kafka request, whether its own check
# before sending found it or the broker refused it: permanent, so a rejection, never a 503.
TOO_LARGE = MessageSizeTooLargeError.__name__
SEEN_RETENTION = "7 days"

REFUSED = Counter("nhdp_gateway_backpressure_refusals_total", "Requests refused because the consumers are behind")
# The consumers apply tens of thousands of events a second: a second is enough to make room.
BACKPRESSURE_RETRY_AFTER_S = 1
PACED = Histogram(
    "nhdp_gateway_pace_seconds", "How long requests waited because the consumers were behind (paced ones only)"
)
EVENTS = Counter("nhdp_gateway_events_total", "Events posted to the gateway, by outcome", ["outcome"])
REQUEST_SECONDS = Histogram(
    "nhdp_gateway_request_seconds",
    "POST /v1/events latency",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

DDL = """
CREATE SCHEMA IF NOT EXISTS gateway;
CREATE TABLE IF NOT EXISTS gateway.seen_events (
    event_id     uuid PRIMARY KEY,
    content_hash bytea NOT NULL,
    accepted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS seen_events_accepted_at ON gateway.seen_events (accepted_at);
-- who wrote it: a void is checked against it (schemas/access.py)
ALTER TABLE gateway.seen_events ADD COLUMN IF NOT EXISTS source text;
"""


def content_hash(event: dict[str, Any]) -> bytes:
    return hashlib.sha256(orjson.dumps(event, option=orjson.OPT_SORT_KEYS)).digest()[:16]


class Gateway:
    """The gateway's state: one producer, one pool, one pseudonymiser."""

    def __init__(
        self,
        settings: Settings,
        producer: EventProducer | None = None,
        refusal: Callable[[], str | None] = lambda: None,
        pace: Callable[[], float] = lambda: 0.0,
    ):
        """refusal: why nothing is accepted now (back-pressure from the consumers), or None;
        pace: how long a request waits before it is read (the consumers are falling behind)."""
        self.settings = settings
        self.refusal, self.pace = refusal, pace
        self.pseudonymiser = Pseudonymiser.from_settings(settings)
        self.pool = ConnectionPool(
            settings.postgres_url, min_size=1, max_size=16, open=True, check=ConnectionPool.check_connection
        )
        with self.pool.connection() as conn:
            conn.execute(DDL)
        # Fail fast when Kafka is down: a 503 in seconds beats a blocked request.
        self.producer = producer or EventProducer(
            settings,
            source="gateway",
            delivery_timeout_ms=15_000,
            max_block_ms=5_000,
            max_request_size=settings.kafka_max_message_bytes,
        )
        self._pruned_at = 0.0
        self._prune_lock = threading.Lock()

    def close(self) -> None:
        self.producer.close()
        self.pool.close()

    def prune(self) -> None:
        """Keep the re-send record bounded; at most once an hour."""
        with self._prune_lock:
            if time.monotonic() - self._pruned_at < 3600:
                return
            self._pruned_at = time.monotonic()
        with self.pool.connection() as conn:
            conn.execute(f"DELETE FROM gateway.seen_events WHERE accepted_at < now() - interval '{SEEN_RETENTION}'")

    # -- the request -------------------------------------------------------------
    def ingest(self, events: list[Any], trace_id: str | None, caller: Caller) -> tuple[int, dict[str, Any]]:
        """caller: who posts them; every event must be theirs to publish (Caller.event_problem)."""
        rejected: list[dict[str, Any]] = []
        candidates: list[tuple[int, str, bytes, dict]] = []  # index, event_id, hash, avro record
        first_by_id: dict[str, bytes] = {}
        voids: dict[int, str] = {}  # index -> target
        duplicates = 0
        for i, raw in enumerate(events):
            record, errors = checked_edge_record(raw, self.pseudonymiser)
            if record is None:
                event_id = (
                    raw.get("event_id") if isinstance(raw, dict) and isinstance(raw.get("event_id"), str) else None
                )
                rejected.append({"index": i, "event_id": event_id, "errors": errors})
                continue
            event_type = record["event_type"]
            problem = caller.event_problem(event_type, record["source"], record["province_code"])
            if problem:
                rejected.append({"index": i, "event_id": raw.get("event_id"), "errors": [problem]})
                continue
            event_id = record["event_id"]
            # The fact, not its spelling: the normalised record (canonical event_id, epoch
            # millis, no trace_id), so a retry that re-serialises the event (upper-case
            # UUID, another UTC offset, key order) is a duplicate, not a conflict.
            h = content_hash({**record, "trace_id": None})
            seen = first_by_id.get(event_id)
            if seen is not None:
                if seen == h:
                    duplicates += 1
                else:
                    rejected.append(
                        {
                            "index": i,
                            "event_id": event_id,
                            "errors": ["event_id: repeated in this request with different content"],
                        }
                    )
                continue
            first_by_id[event_id] = h
            if trace_id and not record.get("trace_id"):
                record["trace_id"] = trace_id
            candidates.append((i, event_id, h, record))
            if event_type == VOID_EVENT:
                voids[i] = record["payload"]["voided_event_id"]

        accepted = 0
        # An auditor's or admin's void may void anything; a producer's, only what its source wrote.
        checked = {} if caller.has(Right.VOID_ANY) else voids
        if candidates:
            if not self.producer.reachable():
                # Nothing reserved, nothing published: the whole request can be retried as is.
                return 503, {
                    "error": "Kafka is unavailable; nothing from this request was published. "
                    f"Retry after {RETRY_AFTER_S} s."
                }
            try:
                accepted, dup, conflicts, failure = self._publish_once(candidates, trace_id, caller, checked)
            except psycopg.OperationalError as exc:
                return 503, {
                    "error": f"PostgreSQL is unavailable ({exc.__class__.__name__}); "
                    f"nothing from this request was published. Retry after {RETRY_AFTER_S} s."
                }
            duplicates += dup
            rejected.extend(conflicts)
            if failure is not None:
                EVENTS.labels("accepted").inc(accepted)
                return 503, {
                    "error": f"Kafka did not acknowledge {failure} event(s); they were not accepted. "
                    f"{accepted} event(s) were. Re-send the whole request after {RETRY_AFTER_S} s: "
                    "the accepted ones will be answered as duplicates, not published twice.",
                    "accepted": accepted,
                }
        rejected.sort(key=lambda r: r["index"])
        EVENTS.labels("accepted").inc(accepted)
        EVENTS.labels("duplicate").inc(duplicates)
        EVENTS.labels("rejected").inc(len(rejected))
        return 200, {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}

    def publish_checked(self, candidates: list[tuple[int, str, bytes, dict]], caller: Caller):
        """Records the edge made and checked itself (a scan's CheckedIn), reserved and published as ingest's are:
        (accepted, duplicates, conflicts, failed count or None)."""
        if not self.producer.reachable():
            return 0, 0, [], len(candidates)
        try:
            return self._publish_once(candidates, None, caller, {})
        except psycopg.OperationalError:
            return 0, 0, [], len(candidates)

    def _publish_once(self, candidates, trace_id, caller: Caller, voids: dict[int, str]):
        """Reserve ids, publish the new ones, keep the reservations Kafka acknowledged.

        voids (index -> target) are checked against their targets' sources, read in the
        same statement as the reservations (one round trip): a refused one is un-reserved
        and not published. A target not seen here (older than the re-send record, or not
        arrived yet) is left to the projections, which apply the same rule."""
        ids = [c[1] for c in candidates]
        hashes = [c[2] for c in candidates]
        order = sorted(range(len(ids)), key=ids.__getitem__)  # one lock order for every request
        with self.pool.connection() as conn, conn.transaction():
            # Each array goes as ONE text literal: canonical UUIDs and hex digests need no
            # quoting, and psycopg's per-element adaptation cost ~6 µs an event.
            # one source per request: event_problem made every event carry the caller's
            source = caller.audit_source if caller.has(Right.VOID_ANY) else caller.source or ""
            new, writers = set(), {}
            for kind, event_id, writer in conn.execute(
                "WITH writers AS (SELECT event_id::text, source FROM gateway.seen_events "
                "                 WHERE event_id = ANY(%s::text::uuid[])), "
                "ins AS (INSERT INTO gateway.seen_events (event_id, content_hash, source) "
                "        SELECT i, decode(h, 'hex'), %s FROM unnest(%s::text::uuid[], %s::text::text[]) AS t(i, h) "
                "        ON CONFLICT (event_id) DO NOTHING RETURNING event_id::text) "
                "SELECT 'new', event_id, NULL FROM ins UNION ALL SELECT 'writer', event_id, source FROM writers",
                (
                    "{" + ",".join(sorted(set(voids.values()))) + "}",
                    source,
                    "{" + ",".join([ids[k] for k in order]) + "}",
                    "{" + ",".join([hashes[k].hex() for k in order]) + "}",
                ),
            ):
                if kind == "new":
                    new.add(event_id)
                else:
                    writers[event_id] = writer
            conflicts = []
            refused = {
                i: target for i, target in voids.items() if target in writers and not may_void(source, writers[target])
            }
            if refused:
                for c in candidates:
                    if c[0] in refused:
                        conflicts.append(
                            {
                                "index": c[0],
                                "event_id": c[1],
                                "errors": [
                                    f"payload.voided_event_id: event {refused[c[0]]} was written by source "
                                    f"{writers[refused[c[0]]]!r}; only that source, an auditor or an admin may void it"
                                ],
                            }
                        )
                unreserve = [c[1] for c in candidates if c[0] in refused and c[1] in new]
                conn.execute("DELETE FROM gateway.seen_events WHERE event_id = ANY(%s::uuid[])", (unreserve,))
                new -= set(unreserve)
                candidates = [c for c in candidates if c[0] not in refused]
            old = [c for c in candidates if c[1] not in new]
            known = {}
            if old:
                known = {
                    str(r[0]): bytes(r[1])
                    for r in conn.execute(
                        "SELECT event_id, content_hash FROM gateway.seen_events WHERE event_id = ANY(%s::uuid[])",
                        ([c[1] for c in old],),
                    )
                }
            duplicates = 0
            for i, event_id, h, _ in old:
                if known.get(event_id) == h:
                    duplicates += 1
                else:
                    conflicts.append(
                        {
                            "index": i,
                            "event_id": event_id,
                            "errors": [
                                "event_id: already accepted with different content; a correction is a "
                                "RecordVoided of the original plus a new event with a new event_id"
                            ],
                        }
                    )
            to_publish = [c for c in candidates if c[1] in new]
            try:
                self.producer.publish_many([c[3] for c in to_publish], trace_id=trace_id, validated=True)
            except PublishError as exc:
                failed_ids = [to_publish[i][1] for i in exc.failed]
                conn.execute("DELETE FROM gateway.seen_events WHERE event_id = ANY(%s::uuid[])", (failed_ids,))
                too_large = {i: reason for i, reason in exc.failed.items() if reason.startswith(TOO_LARGE)}
                for i, reason in too_large.items():
                    conflicts.append(
                        {
                            "index": to_publish[i][0],
                            "event_id": to_publish[i][1],
                            "errors": [f"event: too large for one Kafka message ({reason.partition(': ')[2]})"],
                        }
                    )
                retryable = len(failed_ids) - len(too_large)
                return len(to_publish) - len(failed_ids), duplicates, conflicts, retryable or None
        return len(to_publish), duplicates, conflicts, None


router = APIRouter()


def _error(status: int, message: str, retry_after: int = RETRY_AFTER_S, **extra) -> ORJSONResponse:
    headers = {"Retry-After": str(retry_after)} if status == 503 else None
    return ORJSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class BodyTooLarge(ValueError):
    """The body is over the limit; the message says by how much, as far as is known."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused from its Content-Length or, without one (chunked), as soon as
    the bytes that arrived pass the limit: a large body is never read whole first."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"body is {int(length):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over {limit:,} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def trace_id_problem(value: str | None) -> str | None:
    """Why an x-trace-id header cannot be copied into events, or None. It lands in every
    event of the request and in a Kafka header, so it is a short token, not free text."""
    if value is None or TRACE_ID.fullmatch(value):
        return None
    return f"x-trace-id: must be 1 to {TRACE_ID_MAX} characters of A-Z a-z 0-9 . _ : -"


@router.post(
    "/v1/events",
    summary="Publish a batch of events",
    description=(
        f"A JSON array of up to {MAX_EVENTS:,} events (DESIGN §2). Each event is validated; the valid "
        "ones are written durably to Kafka (acks=all) before the answer. Answer: "
        '`{"accepted": n, "duplicates": n, "rejected": [{"index": i, "event_id": …, "errors": ["field: reason"]}]}`. '
        "400: body not a JSON array, or a bad x-trace-id header; 413: too large (NHDP_MAX_BODY_BYTES); "
        "503 + Retry-After: Kafka or PostgreSQL unavailable, or back-pressure (the projections or the "
        "analytics are more than NHDP_GATEWAY_MAX_BACKLOG events behind); nothing was published."
    ),
)
async def post_events(
    request: Request, caller: Annotated[Caller, Depends(require(Right.WRITE_EVENTS, Right.VOID_ANY))]
):
    started = time.perf_counter()
    gateway: Gateway = request.app.state.gateway
    trace_id = request.headers.get("x-trace-id")
    problem = trace_id_problem(trace_id)
    if problem:
        return _error(400, problem)
    refusal = gateway.refusal()
    if refusal:  # before the body is parsed: refusing costs the gateway almost nothing
        REFUSED.inc()
        return _error(503, refusal, retry_after=BACKPRESSURE_RETRY_AFTER_S)
    wait = gateway.pace()
    if wait > 0:  # unread, the body waits in the socket: the producer slows to the consumers' pace
        PACED.observe(wait)
        await asyncio.sleep(wait)
    try:
        body = await read_body(request, gateway.settings.max_body_bytes)
    except BodyTooLarge as exc:
        # Closing the connection is what stops the rest of the body: on a kept-alive one the
        # server would go on reading it (to throw it away) until it ended.
        response = _error(413, str(exc))
        response.headers["Connection"] = "close"
        return response
    try:
        events = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _error(400, f"body is not valid JSON: {exc}")
    if not isinstance(events, list):
        kind = {dict: "an object", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
        return _error(400, f"body must be a JSON array of events, not {kind.get(type(events), 'null')}")
    if len(events) > MAX_EVENTS:
        return _error(413, f"{len(events):,} events in one request; the limit is {MAX_EVENTS:,}")

    status, answer = await run_in_threadpool(gateway.ingest, events, trace_id, caller)
    REQUEST_SECONDS.observe(time.perf_counter() - started)
    if status == 503:
        return _error(503, answer.pop("error"), **answer)
    return ORJSONResponse(answer, status_code=status)

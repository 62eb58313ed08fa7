"""PostgreSQL projections of the event log, with the tracking record (DESIGN §4, §7).

    projector = Projector(pool)                 # tables in schema "proj"
    projector.ensure_schema()
    start = projector.positions("nhdp-projections")   # seek each partition to offset + 1
    result = projector.apply_batch([(topic, partition, offset, event), ...], "nhdp-projections")
    projector.wait_for({("health.events", 0): 41}, timeout=10)

One transaction per batch
-------------------------
`apply_batch` changes every projection *and* the tracking record (the last
applied offset per (consumer_group, topic, partition)) in one transaction, as
pyeventsourcing's ProcessRecorder does. A message at or below the recorded
offset was already applied and is skipped, so redelivery after a crash or a
rebalance changes nothing: effectively once without Kafka's exactly-once.

The work is set-based: the batch is COPYed into temporary tables, then a fixed
number of statements (independent of the batch size) do the rest:

1. lock the batch's tracking rows and read their offsets (fences out a zombie
   worker that still holds the same partition); drop what is already applied
   and in-batch duplicates (in Python);
2. upsert the facts into `events` (keyed by event_id; a duplicate does nothing);
3. upsert the voids' targets into `events` (sets `voided_by`; a void that comes
   first leaves a placeholder row the target later fills in, already voided);
4. merge the new valid doses into each subject's state (one upsert, which also
   locks every subject the batch touches); for subjects that lost a dose to a
   void, recompute the state from their valid doses (rare);
5. store the new offsets, then add the net counter deltas in key order
   (including people_(fully_)vaccinated moving between provinces).

AppointmentScheduled and CheckedIn (visits, 40% of the traffic) go to `visits`
only, for the staff view of a scan and the citizen's record: no figure depends
on them, so a duplicate is simply not inserted again (ON CONFLICT DO NOTHING)
and a void of one only leaves its placeholder in `events`, which readers join.

Why it is race-free under READ COMMITTED, with several workers at once
-------------------------------------------------------------------------
* A target and its void may be applied concurrently by workers of different
  partitions (a void has no subject key). Both write the target's `events` row
  with INSERT … ON CONFLICT DO UPDATE, so the second waits for the first to
  commit and then sees its effect: the void sees the arrived target and
  retracts it; the target sees the void and contributes nothing.
* A subject's state changes only under the row lock on its `subjects` row.
  A merge (INSERT … ON CONFLICT DO UPDATE) folds new doses into the latest
  committed state. A recomputation after a void runs in a statement issued
  *after* the lock is granted, so it sees every committed dose and void of
  that subject. So each change composes with the ones committed before it.
* Counters are only ever incremented (value = value + delta), in key order.
* Locks are taken in one order (tracking, events, subjects, counters), each
  set sorted, subjects in a single pass. The facts and voids statements each
  lock `events` rows in event_id order, but one after the other, so a rare
  deadlock is possible; it and serialization failures are retried with the
  whole batch (`Projector.retries` counts them).

Decisions the figures depend on
--------------------------------
* Determinism: nothing reads the wall clock; a replay from offset 0 into
  another namespace rebuilds the same counters and subject states.
* The earliest dose is the least (occurred_at, event_id), event_id compared as
  a uuid (= its canonical lower-case text).
* A RecordVoided that targets another RecordVoided has no effect on figures,
  and nothing is ever un-voided. A void of an event that never arrives, or of
  an event that has no figures (appointment, check-in), changes nothing.
* Several voids of one event: the first to commit is recorded in `voided_by`.
* Re-sending an event_id is a retry (DESIGN §2): the first arrival's content
  is kept and later copies are ignored even if their content differs.

Size: most of it is the design note above and the SQL of one transaction; the
statements depend on each other's lock order, so they stay together.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, sql

from projections.counting import ADVERSE, ALLOCATION, DOSE, READ_ERRORS, REGISTRATION, figure_view, micros

RETRYABLE = (errors.DeadlockDetected, errors.SerializationFailure)
MAX_ATTEMPTS = 8

_NAMESPACE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class BatchResult:
    applied: int  # messages applied now (skipped and duplicates excluded)
    skipped_offsets: int  # messages at or below the recorded offset: applied before
    duplicates: int  # event_ids already applied, or repeated within the batch


class InvalidEvent(ValueError):
    """An event the projector cannot read; raised before anything is written.

    The worker should dead-letter that message and apply the rest again.
    """

    def __init__(self, topic: str, partition: int, offset: int, reason: str):
        super().__init__(f"{topic}[{partition}]@{offset}: {reason}")
        self.topic, self.partition, self.offset, self.reason = topic, partition, offset, reason


# -- SQL -----------------------------------------------------------------------
# {ns} is replaced by the quoted schema name once, in Projector.__init__.

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS {ns};

CREATE TABLE IF NOT EXISTS {ns}.tracking (
    consumer_group text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,  -- the last offset applied (seek to offset + 1)
    PRIMARY KEY (consumer_group, topic, partition)
);

-- One row per event_id seen, as a fact or as a void's target. Compact: only
-- what retraction and per-subject recomputation need. etype IS NULL means
-- only a void has arrived so far (a placeholder the target fills in).
CREATE TABLE IF NOT EXISTS {ns}.events (
    event_id uuid PRIMARY KEY,
    etype smallint,
    province text,
    occurred_at timestamptz,
    subject_id text,           -- doses and adverse events
    vaccine text,              -- doses and allocations
    dose_number smallint,
    site_id text,
    flag boolean,              -- declaration: symptoms non-empty; adverse: serious
    amount bigint,             -- allocation: doses
    allocation_id text,
    recipient text,
    voided_by uuid             -- the RecordVoided that voided it
);
CREATE INDEX IF NOT EXISTS events_doses_by_subject ON {ns}.events (subject_id) WHERE etype = 3;
-- Added with the health book (issue 17): a dose's lot number, which a certificate carries. Rows
-- projected before have none until a replay rebuilds them.
ALTER TABLE {ns}.events ADD COLUMN IF NOT EXISTS lot text;
CREATE INDEX IF NOT EXISTS events_adverse_by_subject ON {ns}.events (subject_id) WHERE etype = 4;
-- The voided doses, which the certificates' revocation list starts from (few, so a small index).
CREATE INDEX IF NOT EXISTS events_voided_doses ON {ns}.events (event_id) WHERE etype = 3 AND voided_by IS NOT NULL;

-- Appointments (kind 1) and check-ins (kind 2): what staff see when they scan a
-- health-book code, and part of the citizen's record. No figure depends on them,
-- so a duplicate is just not inserted again; a void of one leaves its placeholder
-- in `events` (voided_by set), which readers join against.
CREATE TABLE IF NOT EXISTS {ns}.visits (
    event_id uuid PRIMARY KEY,
    kind smallint NOT NULL,
    subject_id text NOT NULL,
    province text NOT NULL,
    site_id text NOT NULL,
    appointment_id text,
    occurred_at timestamptz NOT NULL,
    slot_start timestamptz,
    slot_end timestamptz,
    dose_number smallint
);
CREATE INDEX IF NOT EXISTS visits_by_subject ON {ns}.visits (subject_id);

-- Per-subject dose state, a function of the subject's valid doses. The row is
-- also the lock that serialises changes to one subject.
CREATE TABLE IF NOT EXISTS {ns}.subjects (
    subject_id text PRIMARY KEY,
    province text,             -- of the earliest valid dose; NULL: no valid dose
    first_at timestamptz,      -- the earliest valid dose: (first_at, first_dose)
    first_dose uuid,
    valid_doses integer NOT NULL,
    janssen boolean NOT NULL,  -- has a valid janssen dose
    fully boolean NOT NULL,
    -- the counted (province, fully) before the last upsert, so that one
    -- INSERT … ON CONFLICT can also return the change (RETURNING has no OLD
    -- before PostgreSQL 18). Not part of the state.
    prev_province text,
    prev_fully boolean
) WITH (fillfactor = 80);

-- Every figure of DESIGN §4 per province; key is '' for unkeyed figures.
CREATE TABLE IF NOT EXISTS {ns}.counters (
    province text NOT NULL,
    figure text NOT NULL,
    key text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (province, figure, key)
) WITH (fillfactor = 50);

CREATE OR REPLACE VIEW {ns}.allocations AS
    SELECT event_id, allocation_id, province, vaccine, amount AS doses, recipient, occurred_at,
           voided_by IS NOT NULL AS voided
    FROM {ns}.events WHERE etype = 5;

CREATE OR REPLACE VIEW {ns}.valid_doses AS
    SELECT subject_id, event_id, occurred_at, province, vaccine, dose_number, site_id
    FROM {ns}.events WHERE etype = 3 AND voided_by IS NULL;
"""

# Session-local staging tables, emptied at each commit.
TEMP_SQL = """
CREATE TEMP TABLE IF NOT EXISTS _p_facts (
    event_id uuid, etype smallint, province text, occurred_us bigint, subject_id text,
    vaccine text, dose_number smallint, site_id text, flag boolean, amount bigint,
    allocation_id text, recipient text, lot text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _p_visits (
    event_id uuid, kind smallint, subject_id text, province text, site_id text, appointment_id text,
    occurred_us bigint, slot_start_us bigint, slot_end_us bigint, dose_number smallint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _p_voids (target uuid, void_id uuid) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _p_changes (
    sign smallint, etype smallint, province text, vaccine text, dose_number smallint,
    flag boolean, amount bigint, subject_id text, event_id uuid, occurred_at timestamptz
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _p_people (province text, figure text, delta integer) ON COMMIT DELETE ROWS;
"""

FACT_COLUMNS = (
    "event_id, etype, province, occurred_us, subject_id, vaccine, dose_number, site_id, "
    "flag, amount, allocation_id, recipient, lot"
)
VISIT_COLUMNS = "event_id, kind, subject_id, province, site_id, appointment_id, occurred_us, slot_start_us, slot_end_us, dose_number"
APPOINTMENT, CHECK_IN = 1, 2
VISITS = {"AppointmentScheduled": APPOINTMENT, "CheckedIn": CHECK_IN}

LOCK_TRACKING_SQL = """
INSERT INTO {ns}.tracking AS t (consumer_group, topic, partition, "offset")
SELECT %(group)s, k.topic, k.partition, -1
FROM unnest(%(topics)s::text[], %(partitions)s::int[]) AS k(topic, partition)
ORDER BY k.topic, k.partition
ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET "offset" = t."offset"
RETURNING t.topic, t.partition, t."offset"
"""

# sign 1: the fact counts now; sign 0: it arrived already voided. A duplicate
# (etype already set) is not returned.
UPSERT_FACTS_SQL = """
WITH up AS (
    INSERT INTO {ns}.events AS e (event_id, etype, province, occurred_at, subject_id, vaccine,
                                  dose_number, site_id, flag, amount, allocation_id, recipient, lot)
    SELECT event_id, etype, province, timestamptz 'epoch' + occurred_us * interval '1 microsecond',
           subject_id, vaccine, dose_number, site_id, flag, amount, allocation_id, recipient, lot
    FROM _p_facts ORDER BY event_id
    ON CONFLICT (event_id) DO UPDATE SET
        etype = excluded.etype, province = excluded.province, occurred_at = excluded.occurred_at,
        subject_id = excluded.subject_id, vaccine = excluded.vaccine,
        dose_number = excluded.dose_number, site_id = excluded.site_id, flag = excluded.flag,
        amount = excluded.amount, allocation_id = excluded.allocation_id, recipient = excluded.recipient,
        lot = excluded.lot
    WHERE e.etype IS NULL
    RETURNING e.voided_by IS NULL AS live, e.etype, e.province, e.vaccine, e.dose_number, e.flag, e.amount,
              e.subject_id, e.event_id, e.occurred_at
)
INSERT INTO _p_changes (sign, etype, province, vaccine, dose_number, flag, amount, subject_id, event_id, occurred_at)
SELECT CASE WHEN live THEN 1 ELSE 0 END, etype, province, vaccine, dose_number, flag, amount,
       subject_id, event_id, occurred_at
FROM up
"""

# A void of an arrived fact retracts it (sign -1); of anything else it only
# records itself, for the target to find.
UPSERT_VOIDS_SQL = """
WITH up AS (
    INSERT INTO {ns}.events AS e (event_id, voided_by)
    SELECT target, void_id FROM _p_voids ORDER BY target
    ON CONFLICT (event_id) DO UPDATE SET voided_by = excluded.voided_by
    WHERE e.voided_by IS NULL
    RETURNING e.etype, e.province, e.vaccine, e.dose_number, e.flag, e.amount, e.subject_id
)
INSERT INTO _p_changes (sign, etype, province, vaccine, dose_number, flag, amount, subject_id)
SELECT -1, etype, province, vaccine, dose_number, flag, amount, subject_id FROM up
WHERE etype IS NOT NULL
RETURNING CASE WHEN etype = 3 THEN subject_id END
"""

# New valid doses merge into a subject's state without reading its other
# doses: the earliest is the least (occurred_at, event_id) of the old earliest
# and the batch's, counts add up. ON CONFLICT DO UPDATE merges into the latest
# committed row under its lock, so concurrent merges (and recomputations, which
# hold the same lock) compose. The subjects whose doses this batch retracts
# join with nothing to add: one pass takes every subject lock of the batch, in
# subject_id order, so two batches cannot deadlock on subjects.
MERGE_DOSES_SQL = """
WITH d AS (
    SELECT subject_id, count(*) AS n, bool_or(vaccine = 'janssen') AS janssen,
           (array_agg(occurred_at ORDER BY occurred_at, event_id))[1] AS first_at,
           (array_agg(event_id ORDER BY occurred_at, event_id))[1] AS first_dose,
           (array_agg(province ORDER BY occurred_at, event_id))[1] AS province
    FROM _p_changes WHERE sign = 1 AND etype = 3
    GROUP BY subject_id
), b AS (
    SELECT * FROM d
    UNION ALL
    SELECT r.subject_id, 0, false, NULL::timestamptz, NULL::uuid, NULL::text
    FROM unnest(%(retracted)s::text[]) AS r(subject_id)
    WHERE r.subject_id NOT IN (SELECT subject_id FROM d)
), up AS (
    INSERT INTO {ns}.subjects AS s (subject_id, province, first_at, first_dose, valid_doses, janssen, fully,
                                    prev_province, prev_fully)
    SELECT subject_id, province, first_at, first_dose, n, janssen, n >= 2 OR janssen, NULL, false
    FROM b ORDER BY subject_id
    ON CONFLICT (subject_id) DO UPDATE SET
        prev_province = s.province,
        prev_fully = s.fully,
        province = CASE WHEN s.first_at IS NULL OR (excluded.first_at, excluded.first_dose) < (s.first_at, s.first_dose)
                        THEN excluded.province ELSE s.province END,
        first_dose = CASE WHEN s.first_at IS NULL OR (excluded.first_at, excluded.first_dose) < (s.first_at, s.first_dose)
                          THEN excluded.first_dose ELSE s.first_dose END,
        first_at = CASE WHEN s.first_at IS NULL OR (excluded.first_at, excluded.first_dose) < (s.first_at, s.first_dose)
                        THEN excluded.first_at ELSE s.first_at END,
        valid_doses = s.valid_doses + excluded.valid_doses,
        janssen = s.janssen OR excluded.janssen,
        fully = s.valid_doses + excluded.valid_doses >= 2 OR s.janssen OR excluded.janssen
    RETURNING s.prev_province, s.prev_fully, s.province, s.fully
)
INSERT INTO _p_people (province, figure, delta)
SELECT v.province, v.figure, v.delta
FROM up CROSS JOIN LATERAL (VALUES
    (up.prev_province, 'people_vaccinated', -1),
    (up.province, 'people_vaccinated', 1),
    (CASE WHEN up.prev_fully THEN up.prev_province END, 'people_fully_vaccinated', -1),
    (CASE WHEN up.fully THEN up.province END, 'people_fully_vaccinated', 1)
) AS v(province, figure, delta)
WHERE v.province IS NOT NULL
  AND (up.prev_province IS DISTINCT FROM up.province OR up.prev_fully IS DISTINCT FROM up.fully)
"""

# A retraction can remove the earliest dose, so the subject's state is
# recomputed from its valid doses. Must run after MERGE_DOSES has locked these
# subjects: a statement issued after the lock is granted sees every committed
# change to their doses.
RECOMPUTE_SUBJECTS_SQL = """
WITH cur AS MATERIALIZED (
    SELECT s.subject_id, s.province AS old_prov, s.fully AS old_fully,
           d.first_prov, d.first_at, d.first_dose, d.n, coalesce(d.janssen, false) AS janssen
    FROM {ns}.subjects s
    CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               bool_or(e.vaccine = 'janssen') AS janssen,
               (array_agg(e.province ORDER BY e.occurred_at, e.event_id))[1] AS first_prov,
               (array_agg(e.occurred_at ORDER BY e.occurred_at, e.event_id))[1] AS first_at,
               (array_agg(e.event_id ORDER BY e.occurred_at, e.event_id))[1] AS first_dose
        FROM {ns}.events e
        WHERE e.subject_id = s.subject_id AND e.etype = 3 AND e.voided_by IS NULL
    ) d
    WHERE s.subject_id = ANY(%(subjects)s::text[])
), upd AS (
    UPDATE {ns}.subjects s
    SET province = c.first_prov, first_at = c.first_at, first_dose = c.first_dose, valid_doses = c.n,
        janssen = c.janssen, fully = c.n >= 2 OR c.janssen, prev_province = c.old_prov, prev_fully = c.old_fully
    FROM cur c
    WHERE s.subject_id = c.subject_id AND s.subject_id = ANY(%(subjects)s::text[])
)
INSERT INTO _p_people (province, figure, delta)
SELECT v.province, v.figure, v.delta
FROM cur c CROSS JOIN LATERAL (VALUES
    (c.old_prov, 'people_vaccinated', -1),
    (c.first_prov, 'people_vaccinated', 1),
    (CASE WHEN c.old_fully THEN c.old_prov END, 'people_fully_vaccinated', -1),
    (CASE WHEN c.n >= 2 OR c.janssen THEN c.first_prov END, 'people_fully_vaccinated', 1)
) AS v(province, figure, delta)
WHERE v.province IS NOT NULL
"""

# Aggregate first (a few hundred groups per batch), then unpivot into figures.
APPLY_COUNTERS_SQL = """
INSERT INTO {ns}.counters AS c (province, figure, key, value)
SELECT province, figure, key, sum(v)
FROM (
    SELECT g.province, f.figure, f.key, f.v
    FROM (
        SELECT etype, province, vaccine, dose_number,
               sum(sign) AS n, sum(CASE WHEN flag THEN sign ELSE 0 END) AS nflag, sum(sign * amount) AS amount
        FROM _p_changes WHERE sign <> 0
        GROUP BY etype, province, vaccine, dose_number
    ) g
    CROSS JOIN LATERAL (VALUES
        (CASE WHEN g.etype = 1 THEN 'declarations' END, '', g.n),
        (CASE WHEN g.etype = 1 THEN 'declarations_with_symptoms' END, '', g.nflag),
        (CASE WHEN g.etype = 2 THEN 'registrations' END, '', g.n),
        (CASE WHEN g.etype = 3 THEN 'doses_administered' END, '', g.n),
        (CASE WHEN g.etype = 3 THEN 'doses_by_number' END, g.dose_number::text, g.n),
        (CASE WHEN g.etype = 3 THEN 'doses_by_vaccine' END, g.vaccine, g.n),
        (CASE WHEN g.etype = 4 THEN 'adverse_events' END, '', g.n),
        (CASE WHEN g.etype = 4 THEN 'serious_adverse_events' END, '', g.nflag),
        (CASE WHEN g.etype = 5 THEN 'doses_allocated' END, '', g.amount)
    ) AS f(figure, key, v)
    WHERE f.figure IS NOT NULL
    UNION ALL
    SELECT province, figure, '', delta FROM _p_people
) d
GROUP BY province, figure, key
HAVING sum(v) <> 0
ORDER BY province, figure, key
ON CONFLICT (province, figure, key) DO UPDATE SET value = c.value + excluded.value
"""

INSERT_VISITS_SQL = """
INSERT INTO {ns}.visits (event_id, kind, subject_id, province, site_id, appointment_id, occurred_at,
                         slot_start, slot_end, dose_number)
SELECT event_id, kind, subject_id, province, site_id, appointment_id,
       timestamptz 'epoch' + occurred_us * interval '1 microsecond',
       timestamptz 'epoch' + slot_start_us * interval '1 microsecond',
       timestamptz 'epoch' + slot_end_us * interval '1 microsecond', dose_number
FROM _p_visits ORDER BY event_id
ON CONFLICT (event_id) DO NOTHING
"""

STORE_TRACKING_SQL = """
UPDATE {ns}.tracking AS t SET "offset" = k.off
FROM unnest(%(topics)s::text[], %(partitions)s::int[], %(offsets)s::bigint[]) AS k(topic, partition, off)
WHERE t.consumer_group = %(group)s AND t.topic = k.topic AND t.partition = k.partition
"""


def _format(template: str, ns: str) -> str:
    return template.replace("{ns}", ns)


# -- the batch, prepared in Python ---------------------------------------------


def _prepare(messages: Sequence[tuple[str, int, int, Mapping[str, Any] | None]]) -> list[tuple]:
    """One entry per message: (key, offset, event_id, fact_row, void_row, dose_subject, visit_row).

    Independent of the database, so a retried transaction reuses it. Raises
    InvalidEvent before anything is written. What an event contributes is
    projections.counting's figure_view, the rule the ClickHouse sink reads by too.
    """
    out = []
    append = out.append
    view = figure_view
    for topic, partition, offset, ev in messages:
        key = (topic, partition)
        if ev is None:  # consumed but nothing to apply (e.g. dead-lettered)
            append((key, offset, None, None, None, None, None))
            continue
        try:
            event_id, _, kind, target, _, prov, us, subject, vaccine, number, flag, amount = view(ev)
            if not kind:
                # A void; an appointment or check-in (a visit: no figure depends on it, so its
                # duplicates and voids need no bookkeeping); or a type added later.
                visit = _visit_row(ev, event_id, prov, us, subject)
                append((key, offset, event_id, None, (target, event_id) if target else None, None, visit))
                continue
            p = ev["payload"]
            if kind == DOSE:
                row = (
                    event_id, DOSE, prov, us, subject, vaccine, number, p["site_id"], None, None, None, None,
                    p.get("lot_number"),
                )  # fmt: skip
                append((key, offset, event_id, row, None, subject, None))
                continue
            if kind == ALLOCATION:
                row = (
                    event_id, kind, prov, us, None, vaccine, None, None, None, amount, p["allocation_id"],
                    p["recipient"], None,
                )  # fmt: skip
            else:  # a declaration (flag: symptoms), registration, adverse event (flag: serious; its subject)
                row = (
                    event_id, kind, prov, us, subject or None if kind == ADVERSE else None, None, None, None,
                    bool(flag) if kind != REGISTRATION else None, None, None, None, None,
                )  # fmt: skip
            append((key, offset, event_id, row, None, None, None))
        except READ_ERRORS as e:
            raise InvalidEvent(topic, partition, offset, f"{type(e).__name__}: {e}") from e
    return out


def _copy(cur: psycopg.Cursor, statement: str, rows) -> None:
    with cur.copy(statement) as copy:
        write = copy.write_row
        for row in rows:
            write(row)


def _visit_row(ev: Mapping[str, Any], event_id: str, prov: str, us: int, subject: str) -> tuple | None:
    visit = VISITS.get(ev["event_type"])
    if visit is None or not subject:
        return None
    p = ev["payload"]
    if visit == APPOINTMENT:
        start, end = micros(p["slot_start"]), micros(p["slot_end"])
        return (event_id, visit, subject, prov, p["site_id"], p["appointment_id"], us, start, end, p["dose_number"])
    return (event_id, visit, subject, prov, p["site_id"], p.get("appointment_id"), us, None, None, None)


# -- connections -----------------------------------------------------------------


class _Connections:
    """A psycopg_pool pool, a connection factory, or a DSN string."""

    def __init__(self, source: Any):
        self._pool = source if hasattr(source, "connection") and not isinstance(source, psycopg.Connection) else None
        if self._pool is None:
            if isinstance(source, str):
                dsn = source
                self._factory: Callable[[], psycopg.Connection] = lambda: psycopg.connect(dsn)
            elif callable(source):
                self._factory = source
            else:
                raise TypeError("Projector needs a psycopg_pool pool, a connection factory or a DSN")
            self._local = threading.local()
            self._all: list[psycopg.Connection] = []
            self._lock = threading.Lock()

    def get(self):
        """A context manager yielding an idle connection (autocommit off)."""
        if self._pool is not None:
            return self._pool.connection()
        return _ThreadConnection(self)

    def _thread_conn(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._factory()
            conn.autocommit = False
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        if self._pool is None:
            with self._lock:
                for c in self._all:
                    c.close()
                self._all.clear()


class _ThreadConnection:
    def __init__(self, owner: _Connections):
        self._owner = owner

    def __enter__(self) -> psycopg.Connection:
        self._conn = self._owner._thread_conn()
        return self._conn

    def __exit__(self, *exc) -> None:
        if not self._conn.closed and self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._conn.rollback()


# -- the projector ---------------------------------------------------------------


class Projector:
    """The PostgreSQL projections of DESIGN §4 in schema `namespace`."""

    def __init__(self, pool_or_conn_factory: Any, namespace: str = "proj"):
        if not _NAMESPACE.match(namespace):
            raise ValueError(
                f"namespace {namespace!r}: use lower-case letters, digits and _ (a PostgreSQL schema name)"
            )
        self.namespace = namespace
        self.retries = 0  # batch transactions retried after a deadlock or serialization failure
        self._conns = _Connections(pool_or_conn_factory)
        ns = sql.Identifier(namespace).as_string()
        self._sql = {
            name: _format(text, ns)
            for name, text in {
                "schema": SCHEMA_SQL,
                "lock_tracking": LOCK_TRACKING_SQL,
                "upsert_facts": UPSERT_FACTS_SQL,
                "upsert_voids": UPSERT_VOIDS_SQL,
                "merge_doses": MERGE_DOSES_SQL,
                "recompute": RECOMPUTE_SUBJECTS_SQL,
                "counters": APPLY_COUNTERS_SQL,
                "store_tracking": STORE_TRACKING_SQL,
                "insert_visits": INSERT_VISITS_SQL,
                "positions": f'SELECT topic, partition, "offset" FROM {ns}.tracking WHERE consumer_group = %s',
                "all_positions": f'SELECT topic, partition, max("offset") FROM {ns}.tracking GROUP BY 1, 2',
            }.items()
        }

    # -- schema ----------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Create the namespace's tables if missing; safe to call from every worker at once."""
        with self._conns.get() as conn:
            with conn.transaction():
                # CREATE … IF NOT EXISTS is not safe against a concurrent twin.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("nhdp.projections." + self.namespace,))
                conn.execute(self._sql["schema"])

    def drop_schema(self) -> None:
        """Drop the namespace and everything in it (a finished replay, a test)."""
        with self._conns.get() as conn:
            with conn.transaction():
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.namespace)))

    def close(self) -> None:
        """Close connections this projector opened itself (not a pool's)."""
        self._conns.close()

    # -- tracking record ---------------------------------------------------------
    def positions(self, consumer_group: str) -> dict[tuple[str, int], int]:
        """The last applied offset per (topic, partition); a worker resumes at offset + 1."""
        with self._conns.get() as conn:
            with conn.transaction():
                rows = conn.execute(self._sql["positions"], (consumer_group,)).fetchall()
        return {(t, p): o for t, p, o in rows}

    def wait_for(
        self,
        positions: Mapping[tuple[str, int], int],
        timeout: float = 10.0,
        consumer_group: str | None = None,
        poll_interval: float = 0.02,
    ) -> None:
        """Block until every (topic, partition) has been applied up to its offset.

        Raises TimeoutError naming the partitions still behind. Without a
        consumer_group, any group that applied the position counts.
        """
        deadline = time.monotonic() + timeout
        while True:
            if consumer_group is None:
                with self._conns.get() as conn:
                    with conn.transaction():
                        rows = conn.execute(self._sql["all_positions"]).fetchall()
                done = {(t, p): o for t, p, o in rows}
            else:
                done = self.positions(consumer_group)
            behind = {k: (v, done.get(k)) for k, v in positions.items() if done.get(k, -1) < v}
            if not behind:
                return
            if time.monotonic() >= deadline:
                detail = ", ".join(f"{t}[{p}] at {have} < {want}" for (t, p), (want, have) in sorted(behind.items()))
                raise TimeoutError(f"projections in {self.namespace!r} not caught up after {timeout}s: {detail}")
            time.sleep(poll_interval)

    # -- applying ----------------------------------------------------------------
    def apply_batch(
        self, messages: Sequence[tuple[str, int, int, Mapping[str, Any] | None]], consumer_group: str
    ) -> BatchResult:
        """Apply decoded events and record their offsets, in one transaction.

        messages: (topic, partition, offset, event) in any order; event may be
        None for a message that was consumed but has nothing to apply (it still
        moves the recorded offset). Raises InvalidEvent for an unreadable event
        before writing anything.
        """
        if not messages:
            return BatchResult(0, 0, 0)
        prepared = _prepare(messages)
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._conns.get() as conn:
                    with conn.transaction():
                        return self._apply(conn, prepared, consumer_group)
            except RETRYABLE:
                if attempt >= MAX_ATTEMPTS:
                    raise
                self.retries += 1
                time.sleep(random.uniform(0, 0.01 * 2**attempt))

    def _apply(self, conn: psycopg.Connection, prepared: list[tuple], group: str) -> BatchResult:
        q = self._sql
        keys = sorted({m[0] for m in prepared})
        cur = conn.cursor()
        cur.execute(
            q["lock_tracking"],
            {"group": group, "topics": [k[0] for k in keys], "partitions": [k[1] for k in keys]},
        )
        stored = {(t, p): o for t, p, o in cur.fetchall()}

        new_offsets: dict[tuple[str, int], int] = {}
        facts: list[tuple] = []
        voids: dict[str, str] = {}
        dose_subjects: set[str] = set()
        seen: set[str] = set()
        skipped = in_batch_dups = applicable = 0
        visits: list[tuple] = []
        for key, offset, event_id, row, void, subject, visit in prepared:
            if offset <= stored[key]:
                skipped += 1
                continue
            if offset > new_offsets.get(key, -1):
                new_offsets[key] = offset
            if event_id is None:
                continue
            if event_id in seen:
                in_batch_dups += 1
                continue
            seen.add(event_id)
            applicable += 1
            if row is not None:
                facts.append(row)
                if subject is not None:
                    dose_subjects.add(subject)
            elif void is not None:
                target, void_id = void
                if target not in voids or void_id < voids[target]:
                    voids[target] = void_id
            elif visit is not None:
                visits.append(visit)

        if not new_offsets:
            return BatchResult(0, skipped, 0)

        cur.execute(TEMP_SQL)
        not_new = 0
        if facts:
            _copy(cur, f"COPY _p_facts ({FACT_COLUMNS}) FROM STDIN", facts)
            cur.execute(q["upsert_facts"])
            not_new = len(facts) - cur.rowcount
        if visits:
            _copy(cur, f"COPY _p_visits ({VISIT_COLUMNS}) FROM STDIN", visits)
            cur.execute(q["insert_visits"])
        retracted: set[str] = set()
        if voids:
            _copy(cur, "COPY _p_voids (target, void_id) FROM STDIN", voids.items())
            cur.execute(q["upsert_voids"])
            retracted = {s for (s,) in cur.fetchall() if s is not None}
        if dose_subjects or retracted:
            cur.execute(q["merge_doses"], {"retracted": sorted(retracted)})  # takes the subject locks
        if retracted:
            cur.execute(q["recompute"], {"subjects": sorted(retracted)})
        ks = sorted(new_offsets)
        cur.execute(
            q["store_tracking"],
            {
                "group": group,
                "topics": [k[0] for k in ks],
                "partitions": [k[1] for k in ks],
                "offsets": [new_offsets[k] for k in ks],
            },
        )
        if facts or voids:
            cur.execute(q["counters"])  # last: counter rows are shared by every worker
        return BatchResult(applicable - not_new, skipped, in_batch_dups + not_new)

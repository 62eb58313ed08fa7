"""The ClickHouse sink: `health.events` → ClickHouse facts, points and rollups.

    python -m projections.sink            # what `nhdp up` starts (`nhdp sink` in the foreground)

Each arrow, what it guarantees and why (Snuba's way of writing it down):

Kafka → sink: at least once.
    A librdkafka consumer (confluent-kafka: it fetches and parses on its own
    threads, outside the GIL) in its own group (`nhdp-analytics`), with
    auto-commit off. Offsets are committed only after ClickHouse has
    acknowledged every write of the batch, so a crash re-delivers the batch
    and never skips one. Why not a Faust agent: Faust commits the offsets of
    acknowledged events on its own schedule (`broker_commit_every`), the
    ClickHouse calls are blocking, and in chDB mode the sink must run in the
    process that owns the chDB folder; an explicit poll/insert/commit loop
    says exactly when an offset is committed, and pauses the partitions
    (keeps polling, so it stays in the group) while ClickHouse is down.

batching: ≥ 10,000 messages or 1 s after the first message of the batch,
    whichever comes first (BATCH_ROWS, BATCH_WITHIN_S); when catching up, the
    messages already fetched join the batch up to 50,000. One INSERT per
    table per batch.

decode: the worker's Router (codec + semantic checks) and the projector's own
    `_prepare`, so exactly the events the PostgreSQL projections count reach
    the figures. Undecodable or invalid messages are skipped here (the
    worker sends them to the DLQ, with the reason); an unreachable registry
    is retried, never skipped. It runs in NHDP_SINK_DECODERS (2) spawned
    processes, which return each batch pickled: decoding and shaping were
    half of the sink's Python, and one process runs Python on one core. The
    rows only they make (events, event_index, voids) come encoded as Native
    blocks, inserted as they are.

the pipeline: three stages at once, each in log order. The decoders decode
    batch k+2; this process's thread plans batch k+1 (steps 1–2 below); a
    writer thread writes batch k (step 3; mostly ClickHouse's own work, so
    it overlaps). Planning k+1 while k is written reads ClickHouse for
    batches up to k-1, whose writes have returned, and takes k's rows from
    memory (Sink.plan's `writing`). Writes still go one batch at a time, and
    k+1's offsets are committed after k's, so a crash loses only batches
    that were never committed, which are delivered again.

sink → ClickHouse: effectively once, by construction rather than by luck.
    Every write is keyed and idempotent: facts and voids collapse by
    event_id (ReplacingMergeTree; queries read FINAL or count distinct ids),
    points and subject rows are overwrites (latest version wins), rollups
    are recomputed, never incremented (see projections/analytics.py). A
    re-delivered or re-inserted batch therefore changes nothing.

ClickHouse down: back-pressure. The batch is held, the partitions are
    paused, and the writes are retried with backoff until they succeed;
    nothing is committed meanwhile, so nothing is lost.

One writer per database. Voids find their targets and subjects' timelines
    are recomputed by read-modify-write against what the previous batches
    wrote, so exactly one sink process may write a database (the local stack
    starts one; replay writes its own database). A fence enforces it: each
    sink records itself in `sink_owners` when it starts, checks before every
    batch's writes that it is still the latest, and otherwise stops
    (SinkFenced) and leaves the batch uncommitted for the newer one.

chDB: the sink process owns the folder and answers for it. chDB lets one
    process open a folder, so in chDB mode this process also serves the
    analytics calls of every other process (the API, `nhdp verify-analytics`)
    on 127.0.0.1 at POST /call/<method> (the URL is in <run>/sink.url;
    projections.analytics.RemoteAnalytics is the client). The other choice,
    the API running the sink in a thread, was rejected: the API is meant to
    run as several instances behind a balancer (DESIGN §6), and ingestion
    would then stop with every API restart or depend on which instance owns
    the folder. With a server (clickhouse://), every process connects itself
    and nothing is forwarded.

Per batch, in this order (each step's writes are what the next step's
crash recovery relies on):

1. read: the earlier voids of this batch's targets and of facts known to have
   been voided before they arrived (an in-memory set of void targets, loaded
   at start: this process is the only writer of `voids`; a target not in it
   has none), the targets' figure view (from the last ~200,000 facts kept in
   memory, else `event_index`), the subject rows of every subject with a new
   dose or a newly voided dose that may have one (a Bloom filter of the
   stored subjects: most doses are a person's first);
2. compute retraction points, subject timelines and their points, the hours
   touched;
3. write: hour marks (dirty) → events → voids → event_index → subjects →
   points → sink_batches; then commit offsets.
"""

from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import json
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from infra.kafka import TOPIC_EVENTS
from nhdp.settings import Settings
from projections.analytics import (
    ADVERSE,
    ALLOCATION,
    DECLARATION,
    DOSE,
    FULLY,
    HOUR_MS,
    NEVER_MS,
    PEOPLE,
    Analytics,
    ParameterError,
    chunks,
    migrate,
    refresh_doses,
    refresh_rollups,
    sink_url_path,
)
from projections.analytics_store import AnalyticsStore, AnalyticsStoreError, encode_block, open_store
from projections.projector import ETYPES, VOID, _micros
from schemas.reference import provinces

log = logging.getLogger("nhdp.sink")

GROUP = "nhdp-analytics"
BATCH_ROWS = 10_000  # a batch is written once it has this many messages…
BATCH_WITHIN_S = 1.0  # …or this long after its first one
MAX_BATCH_ROWS = 50_000  # while catching up, what is already fetched joins the batch, up to this
QUIET_S = 0.2  # no message for this long: the batches in the pipeline are finished and committed
RECENT_FACTS = 200_000  # facts kept in memory for the voids that follow them (~50 MB)
ROLLUP_EVERY_S = 5.0  # recompute dirty hours at most this often while busy (always when idle)
# doses_daily recomputes whole local days (~1.4M doses on the busiest): while busy at most
# this often; until then a query answers the day from `events`
DOSES_EVERY_S = 60.0
COLLECT_EVERY_S = 10.0  # the sink's cyclic garbage collection (Runner.run)

_REGIONS = {code: p.region for code, p in provinces().items()}

EVENT_COLUMNS = [
    "event_id",
    "event_type",
    "kind",
    "occurred_at",
    "occurred_ms",
    "province_code",
    "region",
    "source",
    "subject_id",
    "flag",
    "vaccine",
    "dose_number",
    "site_id",
    "lot_number",
    "severity",
    "doses",
    "recipient",
    "voided_event_id",
    "kafka_partition",
    "kafka_offset",
]
INDEX_COLUMNS = [
    "event_id",
    "kind",
    "occurred_ms",
    "province_code",
    "subject_id",
    "vaccine",
    "dose_number",
    "flag",
    "amount",
]
VOID_COLUMNS = ["target_id", "void_id", "occurred_ms", "province_code"]
SUBJECT_COLUMNS = [
    "subject_id",
    "version",
    "dose_ids",
    "dose_ms",
    "dose_province",
    "dose_janssen",
    "dose_void_ms",
    "ever_ms",
    "ever_kind",
    "ever_province",
    "ever_delta",
]
POINT_COLUMNS = [
    "hour",
    "key_id",
    "kind",
    "t_ms",
    "province_code",
    "delta",
    "vaccine",
    "dose_number",
    "flag",
    "amount",
    "live",
    "version",
]

# event ids are FixedString(16) (projections/analytics.py): look them up from their text
_IDS = "(SELECT UUIDStringToNum(i) FROM (SELECT arrayJoin(%(id_list)s) AS i))"


class Fact(NamedTuple):
    """The figure view of a counted event (the same as projections.projector reads it)."""

    kind: int
    t_ms: int
    province: str
    subject: str | None
    vaccine: str
    dose_number: int
    flag: int
    amount: int


@dataclass
class BatchStats:
    messages: int = 0
    events: int = 0
    skipped: int = 0  # undecodable or invalid: the worker dead-letters them
    points: int = 0
    subjects: int = 0
    hours: int = 0
    seconds: float = 0.0


class Planned(NamedTuple):
    """Every row one batch writes, computed by Sink.plan, written by Sink.write."""

    version: int
    hours: list[int]
    events: list[tuple]
    voids: list[tuple]
    index: list[tuple]
    subjects: list[tuple]
    points: list[tuple]
    facts: dict[str, tuple]  # event_id -> the fields of a Fact (the next batch's plan reads them from here)
    batch_voids: dict[str, tuple[str, int]]  # void_id -> (target_id, occurred_ms), likewise
    stats: BatchStats


_PEOPLE_FULLY = tuple(sorted([PEOPLE, FULLY]))  # a subject's `ever` kinds of one time, in the order sorted() gives

# A point's identity and content: (t_ms, kind, province, delta); subjects only have these.
Point = tuple[int, int, str, int]


def timeline(doses: Mapping[str, Sequence]) -> set[Point]:
    """The people points of one subject, from its doses {event_id: (t_ms, province, janssen, void_ms)}.

    A dose counts at T iff t < T and not void < T, i.e. on T in (t, void]. The
    state at T is (province of the earliest counted dose by (t, event_id),
    fully = at least 2 counted doses or a counted janssen); it changes only
    right after a dose time or a void time c, so a point at c applies to every
    T > c, which is how queries read it (t_ms < cut).
    """
    if all(d[3] >= NEVER_MS for d in doses.values()):
        # Nothing voided (nearly every subject): counted from the earliest dose on, in its
        # province; fully from the second dose or the first janssen, whichever comes first.
        ordered = sorted(doses.items(), key=lambda kv: (kv[1][0], kv[0]))
        if not ordered:
            return set()
        t0, province = ordered[0][1][0], ordered[0][1][1]
        points = {(t0, PEOPLE, province, 1)}
        fully = [d[0] for _, d in ordered if d[2]]
        if len(ordered) >= 2:
            fully.append(ordered[1][1][0])
        if fully:
            points.add((min(fully), FULLY, province, 1))
        return points
    times = sorted({d[0] for d in doses.values()} | {d[3] for d in doses.values() if d[3] < NEVER_MS})
    points = set()
    prev_p: str | None = None
    prev_f: str | None = None
    ordered = sorted(doses.items(), key=lambda kv: (kv[1][0], kv[0]))
    for c in times:
        alive = [d for _, d in ordered if d[0] <= c < d[3]]
        if alive:
            province = alive[0][1]
            fully = province if (len(alive) >= 2 or any(d[2] for d in alive)) else None
        else:
            province = fully = None
        if province != prev_p:
            if prev_p is not None:
                points.add((c, PEOPLE, prev_p, -1))
            if province is not None:
                points.add((c, PEOPLE, province, 1))
            prev_p = province
        if fully != prev_f:
            if prev_f is not None:
                points.add((c, FULLY, prev_f, -1))
            if fully is not None:
                points.add((c, FULLY, fully, 1))
            prev_f = fully
    return points


class Shaped(tuple):
    """(event_rows, index_rows, void_rows, facts, batch_voids), plus `skipped`."""

    skipped: int = 0


def _event_id(value: Any) -> tuple[str, bytes]:
    """Canonical lower-case text and the 16 bytes of a UUID; ValueError otherwise (as the projector's _uuid)."""
    text = value.lower() if isinstance(value, str) else str(value)
    if len(text) != 36 or text[8] != "-" or text[13] != "-" or text[18] != "-" or text[23] != "-":
        raise ValueError(f"not a UUID: {value!r}")
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a UUID: {value!r}")
    return text, raw


def _nonempty(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value


def shape(messages: Sequence[tuple[int, int, Mapping[str, Any]]], regions: Mapping[str, str]) -> Shaped:
    """One pass over a batch: the rows of events, event_index and voids, and the figure view.

    The figure view (kind, flag, amount, which events are readable at all) is
    the PostgreSQL projector's `_prepare`, restated for one pass over the
    batch; tests/test_analytics.py checks the two agree on every event type.
    An event the projector would refuse (InvalidEvent: the worker
    dead-letters it) is skipped. A repeated event_id keeps its first copy.
    """
    event_rows: list[tuple] = []
    index_rows: list[tuple] = []
    void_rows: list[tuple] = []
    facts: dict[str, tuple] = {}  # event_id -> the fields of a Fact
    batch_voids: dict[str, tuple[str, int]] = {}
    seen: set[str] = set()
    skipped = 0
    add_event, add_index = event_rows.append, index_rows.append
    for partition, offset, ev in messages:
        try:
            event_id, raw_id = _event_id(ev["event_id"])
            et = ev["event_type"]
            kind = ETYPES.get(et, 0)
            p = ev["payload"]
            voided = ""
            if kind == 0 and et == VOID:
                voided, raw_target = _event_id(p["voided_event_id"])
            province = ev["province_code"]
            if kind:
                _nonempty(province, "province_code")
            t_ms = _micros(ev["occurred_at"]) // 1000
            subject = ev.get("subject_id") or ""
            flag = amount = number = 0
            vaccine = ""
            if kind == DOSE:
                _nonempty(ev["subject_id"], "subject_id")
                number = p["dose_number"]
                if type(number) is not int:
                    raise ValueError(f"dose_number must be an integer, not {number!r}")
                vaccine = _nonempty(p["vaccine"], "vaccine")
                p["site_id"]
            elif kind == DECLARATION:
                flag = 1 if p["symptoms"] else 0
            elif kind == ADVERSE:
                flag = 1 if p["severity"] == "serious" else 0
            elif kind == ALLOCATION:
                amount = p["doses"]
                if type(amount) is not int:
                    raise ValueError(f"doses must be an integer, not {amount!r}")
                vaccine = p["vaccine"]
                p["allocation_id"], p["recipient"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning(
                "skipping partition %s offset %s: %s: %s (the worker dead-letters it)",
                partition,
                offset,
                type(exc).__name__,
                exc,
            )
            skipped += 1
            continue
        if event_id in seen:
            continue
        seen.add(event_id)
        if kind:
            facts[event_id] = (kind, t_ms, province, subject or None, vaccine, number, flag, amount)  # a Fact
            add_index((raw_id, kind, t_ms, province, subject, vaccine, number, flag, amount))
        elif voided:
            batch_voids[event_id] = (voided, t_ms)
            void_rows.append((raw_target, raw_id, t_ms, province))
        else:
            vaccine, number = p.get("vaccine") or "", p.get("dose_number") or 0
        add_event(
            (
                raw_id,
                et,
                kind,
                t_ms // 1000,
                t_ms % 1000,
                province,
                regions.get(province, ""),
                ev.get("source") or "",
                subject,
                flag,
                vaccine,
                number,
                p.get("site_id") or "",
                p.get("lot_number") or "",
                p.get("severity") or "",
                amount,
                p.get("recipient") or "",
                voided,
                partition,
                offset,
            )
        )
    out = Shaped((event_rows, index_rows, void_rows, facts, batch_voids))
    out.skipped = skipped
    return out


class SubjectFilter:
    """A Bloom filter of the subjects that have a row in `subjects`: no false negatives.

    Most doses in a campaign are a person's first, so most subjects of a batch
    have no stored row, and asking ClickHouse for them anyway (a read of the
    subjects table, with FINAL then) was a quarter of the sink's time. Only the subjects the
    filter may contain are read. It is loaded from the table at start and every
    subject the sink writes is added before its row is written (the sink is the
    only writer), so a subject with a row is never missed; a false positive
    (~1%) only costs a read that finds nothing. The hash is MD5, because
    ClickHouse 18.16 and 26 both have it, so the table can be hashed in place.
    """

    BITS_PER_SUBJECT = 12  # with 3 probes: ~1% false positives at capacity

    def __init__(self, store: AnalyticsStore, capacity: int = 4_000_000):
        (count,) = store.execute("SELECT count() FROM subjects")[0]
        self.capacity = max(capacity, 2 * int(count))
        self.bits_log2 = min(32, max(20, (self.capacity * self.BITS_PER_SUBJECT - 1).bit_length()))
        self.bits = bytearray(1 << (self.bits_log2 - 3))
        self.shift = 32 - self.bits_log2  # a probe is the top bits_log2 bits of a 32-bit slice of the digest
        self.added = 0
        passes = max(1, int(count) // 1_000_000 + 1)  # a million hashes per read at most
        for i in range(passes):
            for (digest,) in store.execute(
                f"SELECT hex(MD5(subject_id)) FROM subjects WHERE cityHash64(subject_id) % {passes} = {i}"
            ):
                self._add(bytes.fromhex(digest))

    def full(self) -> bool:
        return self.added > self.capacity

    def _add(self, digest: bytes) -> None:
        bits, shift = self.bits, self.shift
        for h in _THREE_U32(digest):
            p = h >> shift
            bits[p >> 3] |= 1 << (p & 7)
        self.added += 1

    def add(self, subject: str) -> None:
        self._add(hashlib.md5(subject.encode()).digest())

    def may_contain(self, subject: str) -> bool:
        bits, shift = self.bits, self.shift
        a, b, c = _THREE_U32(hashlib.md5(subject.encode()).digest())
        a, b, c = a >> shift, b >> shift, c >> shift
        return bool(bits[a >> 3] & (1 << (a & 7)) and bits[b >> 3] & (1 << (b & 7)) and bits[c >> 3] & (1 << (c & 7)))


_THREE_U32 = struct.Struct("<III").unpack_from


class SinkFenced(RuntimeError):
    """A newer sink started writing this database; this one must stop (one writer per database)."""


class Sink:
    """Decoded events → ClickHouse, one batch at a time. The only writer of its database."""

    def __init__(self, store: AnalyticsStore):
        import uuid

        self.store = store
        migrate(store)
        (last,) = store.execute(
            "SELECT greatest((SELECT max(version) FROM hour_marks), (SELECT max(version) FROM sink_batches))"
        )[0]
        self._version = int(last or 0)
        (done,) = store.execute("SELECT max(version) FROM sink_batches")[0]
        self._completed = int(done or 0)  # every write of batches up to this version is in ClickHouse
        self._void_targets: set[str] = {
            t for (t,) in store.execute("SELECT DISTINCT UUIDNumToString(target_id) FROM voids")
        }
        self._regions = _REGIONS
        self._known = SubjectFilter(store)
        self._recent: dict[str, tuple] = {}  # event_id -> the fields of a Fact, of the last batches planned
        self._recent_batches: collections.deque = collections.deque()
        self._recent_count = 0
        self.last_rollup = self.last_doses = 0.0
        # The fence: the latest sink to start is the writer; an older one stops before its next write.
        self.instance = uuid.uuid4().hex
        store.insert("sink_owners", ["instance", "started"], [(self.instance, self.next_version())])

    def check_owner(self, store: AnalyticsStore | None = None) -> None:
        ((owner,),) = (store or self.store).execute("SELECT argMax(instance, started) FROM sink_owners")
        if owner != self.instance:
            raise SinkFenced(
                f"another sink ({owner}) started writing {getattr(self.store, 'url', 'this database')} "
                "after this one; stopping: one writer per database"
            )

    def next_version(self) -> int:
        self._version = max(time.time_ns(), self._version + 1)
        return self._version

    # -- one batch ------------------------------------------------------------------------
    def process(self, messages: Sequence[tuple[int, int, Mapping[str, Any]]]) -> BatchStats:
        """Write decoded events [(partition, offset, event)] and everything they change.

        Idempotent: processing the same messages again (re-delivery, a retry
        after a failed write, a replay) leaves every figure unchanged. Raises
        AnalyticsStoreError if ClickHouse fails; the caller retries the batch.
        """
        return self.write(self.plan(shape(messages, self._regions), len(messages)))

    def plan(self, shaped: Shaped, messages: int, writing: Planned | None = None) -> Planned:
        """Read what earlier batches wrote and compute every row this batch writes. Writes nothing.

        Every earlier batch's write() must have returned, except `writing`: the
        batch whose write() may still be running (the Runner plans the next
        batch meanwhile). Its rows are taken from memory rather than read, and
        count as complete: this batch's write() starts only after its write()
        has returned, and a crash before then loses both.
        """
        started = time.perf_counter()
        stats = BatchStats(messages=messages)
        version = self.next_version()
        completed = self._completed  # the writer thread may move it on meanwhile
        event_rows, index_rows, void_rows, facts, batch_voids = shaped
        stats.events = len(event_rows)
        stats.skipped = shaped.skipped

        # 1. read what earlier batches wrote
        void_targets = {t for t, _ in batch_voids.values()}
        voided_before = [e for e in facts if e in self._void_targets]
        voids_of: dict[str, dict[str, int]] = {}
        # only a target voided before can have earlier voids: nearly always none of them
        for target, void_id, v_ms in self._select_in(
            "SELECT UUIDNumToString(target_id), UUIDNumToString(void_id), occurred_ms FROM voids "
            f"WHERE target_id IN {_IDS}",
            sorted({t for t in void_targets if t in self._void_targets} | set(voided_before)),
        ):
            voids_of.setdefault(target, {})[void_id] = v_ms
        if writing is not None:
            wanted = void_targets | set(voided_before)
            for void_id, (target, v_ms) in writing.batch_voids.items():
                if target in wanted:
                    voids_of.setdefault(target, {})[void_id] = v_ms
        for void_id, (target, v_ms) in batch_voids.items():
            voids_of.setdefault(target, {})[void_id] = v_ms
        targets: dict[str, Fact] = {t: Fact(*facts[t]) for t in void_targets if t in facts}
        # A correction usually follows its target closely: the facts of the last batches this
        # sink planned (the one being written among them) answer most targets from memory.
        missing = []
        for t in sorted(void_targets - set(targets)):
            fact = self._recent.get(t)
            if fact is not None:
                targets[t] = Fact(*fact)
            else:
                missing.append(t)
        for eid, kind, t_ms, prov, subject, vaccine, number, flag, amount in self._select_in(
            "SELECT UUIDNumToString(event_id), kind, occurred_ms, province_code, subject_id, vaccine, dose_number, "
            f"flag, amount FROM event_index WHERE event_id IN {_IDS}",
            missing,
        ):
            targets[eid] = Fact(kind, t_ms, prov, subject or None, vaccine, number, flag, amount)
        for eid in voided_before:
            targets[eid] = Fact(*facts[eid])

        # 2. retractions: -1 at max(occurred, earliest void), tombstones for every other void
        point_rows: list[tuple] = []
        hours: set[int] = {f[1] // HOUR_MS * 3600 for f in facts.values()}
        for target, fact in targets.items():
            vs = voids_of.get(target)
            if not vs:
                continue
            live_t = max(fact.t_ms, min(vs.values()))
            for t in {max(fact.t_ms, v) for v in vs.values()}:
                point_rows.append(self._point(target, fact.kind, t, fact.province, -1, fact, int(t == live_t), version))

        # subjects with a new dose or a newly voided dose
        new_doses: dict[str, dict[str, tuple]] = {}
        for eid, fact in list(facts.items()) + list(targets.items()):
            if fact[0] == DOSE and fact[3]:
                new_doses.setdefault(fact[3], {})[eid] = fact
        subject_rows = self._subjects(new_doses, voids_of, version, point_rows, completed, writing)
        stats.points, stats.subjects = len(point_rows), len(subject_rows)
        hours |= {p[0] for p in point_rows}
        # a voided dose leaves its own day's doses_daily rows (analytics.refresh_doses)
        hours |= {f.t_ms // HOUR_MS * 3600 for f in targets.values() if f.kind == DOSE}
        stats.hours = len(hours)

        stats.seconds = time.perf_counter() - started
        self._void_targets |= void_targets  # the next plan's voided_before, whether or not this is written yet
        self._remember(facts)
        return Planned(
            version,
            sorted(hours),
            event_rows,
            void_rows,
            index_rows,
            subject_rows,
            point_rows,
            facts,
            batch_voids,
            stats,
        )

    def _remember(self, facts: dict[str, tuple]) -> None:
        """Keep the facts of the last batches, about RECENT_FACTS of them (oldest batch dropped first)."""
        self._recent_batches.append(facts)
        for f in facts:
            self._recent.setdefault(f, facts[f])  # the first arrival's content, as the index keeps
        self._recent_count += len(facts)
        while self._recent_count > RECENT_FACTS and len(self._recent_batches) > 1:
            old = self._recent_batches.popleft()
            self._recent_count -= len(old)
            for f, fact in old.items():
                if self._recent.get(f) is fact:
                    del self._recent[f]

    def write(self, planned: Planned, store: AnalyticsStore | None = None) -> BatchStats:
        """3. write: dirty marks first, then the data, then the completion record.

        Idempotent, so a failed write is retried whole. `store`: another
        connection to the same database, so that the next batch's reads need
        not wait for these inserts (the Runner's writer thread).
        """
        started = time.perf_counter()
        version = planned.version
        store = store or self.store
        self.check_owner(store)
        store.insert("hour_marks", ["hour", "mark", "version"], [(h, 0, version) for h in planned.hours])
        store.insert("events", EVENT_COLUMNS, planned.events)
        store.insert("voids", VOID_COLUMNS, planned.voids)
        store.insert("event_index", INDEX_COLUMNS, planned.index)
        store.insert("subjects", SUBJECT_COLUMNS, planned.subjects)
        store.insert("points", POINT_COLUMNS, planned.points)
        store.insert(
            "sink_batches",
            ["version", "messages", "completed_at"],
            [(version, planned.stats.messages, int(time.time()))],
        )
        self._completed = version
        planned.stats.seconds += time.perf_counter() - started
        return planned.stats

    def _select_in(self, sql: str, ids: Sequence[str]) -> list[tuple]:
        rows: list[tuple] = []
        for part in chunks(list(ids)):
            rows += self.store.execute(sql, {"ids": part, "id_list": list(part)})
        return rows

    @staticmethod
    def _point(
        key: str, kind: int, t_ms: int, province: str, delta: int, fact: Fact | None, live: int, version: int
    ) -> tuple:
        t_s = t_ms // 1000
        if fact is None:
            return (t_s - t_s % 3600, key, kind, t_ms, province, delta, "", 0, 0, 0, live, version)
        return (
            t_s - t_s % 3600,
            key,
            kind,
            t_ms,
            province,
            delta,
            fact.vaccine,
            fact.dose_number,
            fact.flag,
            fact.amount,
            live,
            version,
        )

    def _subjects(
        self,
        new_doses: dict[str, dict[str, tuple]],
        voids_of: dict[str, dict[str, int]],
        version: int,
        point_rows: list[tuple],
        completed: int,
        writing: Planned | None,
    ) -> list[tuple]:
        if not new_doses:
            return []
        if self._known.full():
            self._known = SubjectFilter(self.store)
            if writing is not None:  # its rows may not be in the table yet
                for r in writing.subjects:
                    self._known.add(r[0])
        known = self._known
        # The latest version of each row, picked here rather than with FINAL, which merges
        # every part's ranges on one thread and took twice as long (a version is written
        # with one content only, so equal versions are equal rows).
        stored: dict[str, tuple] = {}
        for r in self._select_in(
            "SELECT subject_id, version, dose_ids, dose_ms, dose_province, dose_janssen, dose_void_ms, "
            "ever_ms, ever_kind, ever_province, ever_delta FROM subjects WHERE subject_id IN %(ids)s",
            sorted(s for s in new_doses if known.may_contain(s)),
        ):
            if r[0] not in stored or r[1] > stored[r[0]][1]:
                stored[r[0]] = r
        if writing is not None:  # newer than anything read (which may or may not show them yet)
            for r in writing.subjects:
                if r[0] in new_doses:
                    stored[r[0]] = r
        rows = []
        add_point = point_rows.append
        for subject, added in new_doses.items():
            doses: dict[str, list] = {}
            ever: set[Point] = set()
            complete = True
            row = stored.get(subject)
            if row is not None:
                _, row_version, ids, ms, provs, janssen, void_ms, e_ms, e_kind, e_prov, e_delta = row
                doses = {i: [t, p, j, v] for i, t, p, j, v in zip(ids, ms, provs, janssen, void_ms)}
                ever = set(zip(e_ms, e_kind, e_prov, e_delta))
                complete = row_version <= completed or (writing is not None and row_version == writing.version)
            if row is None and len(added) == 1:
                ((eid, fact),) = added.items()
                if not voids_of.get(eid):  # a first dose, not voided: the common case, without the general machinery
                    t, prov = fact[1], fact[2]
                    hour = t // 1000 - t // 1000 % 3600
                    add_point((hour, subject, PEOPLE, t, prov, 1, "", 0, 0, 0, 1, version))
                    known.add(subject)
                    if fact[4] == "janssen":  # fully vaccinated by it too
                        add_point((hour, subject, FULLY, t, prov, 1, "", 0, 0, 0, 1, version))
                        rows.append(
                            (
                                subject,
                                version,
                                [eid],
                                [t],
                                [prov],
                                [1],
                                [NEVER_MS],
                                [t, t],
                                list(_PEOPLE_FULLY),
                                [prov, prov],
                                [1, 1],
                            )
                        )
                    else:
                        rows.append((subject, version, [eid], [t], [prov], [0], [NEVER_MS], [t], [PEOPLE], [prov], [1]))
                    continue
            before = {k: tuple(v) for k, v in doses.items()}
            for eid, fact in added.items():
                if eid not in doses:  # the first arrival's content is kept, as in PostgreSQL
                    doses[eid] = [fact[1], fact[2], 1 if fact[4] == "janssen" else 0, NEVER_MS]
            for eid, d in doses.items():
                vs = voids_of.get(eid)
                if vs:
                    d[3] = min(d[3], min(vs.values()))
            now = timeline({k: tuple(v) for k, v in doses.items()})
            was = timeline(before) if complete else None
            if complete and was == now and {k: tuple(v) for k, v in doses.items()} == before:
                continue  # nothing changed (a re-delivered dose) and the last write was complete
            # If the stored row's batch completed, its points are in ClickHouse: write the difference.
            # If not (a crash between the row and its points), write the whole new timeline and
            # tombstone every point ever written for the subject that is not in it.
            live = now if not complete else now - was
            for t, kind, prov, delta in live:
                point_rows.append(self._point(subject, kind, t, prov, delta, None, 1, version))
            for t, kind, prov, delta in (was - now) if complete else (ever - now):
                point_rows.append(self._point(subject, kind, t, prov, delta, None, 0, version))
            ever |= now
            order = sorted(doses, key=lambda k: (doses[k][0], k))
            e = sorted(ever)
            known.add(subject)
            rows.append(
                (
                    subject,
                    version,
                    order,
                    [doses[k][0] for k in order],
                    [doses[k][1] for k in order],
                    [doses[k][2] for k in order],
                    [doses[k][3] for k in order],
                    [p[0] for p in e],
                    [p[1] for p in e],
                    [p[2] for p in e],
                    [p[3] for p in e],
                )
            )
        return rows

    # -- rollups ---------------------------------------------------------------------------------
    def refresh_rollups(self, limit: int = 240, doses_every_s: float = DOSES_EVERY_S) -> int:
        """Recompute dirty figure rollups, and doses_daily if it is due; returns how many hours/days."""
        self.last_rollup = time.monotonic()
        self.check_owner()
        n = refresh_rollups(self.store, self.next_version(), limit=limit)
        if self.last_rollup - self.last_doses >= doses_every_s:
            self.last_doses = self.last_rollup
            n += refresh_doses(self.store, self.next_version())
        return n

    def refresh_all(self) -> int:
        total = 0
        while n := self.refresh_rollups(limit=500, doses_every_s=0):
            total += n
        return total


# -- the decoding processes -----------------------------------------------------------------------

_decoder_router = None


def _start_decoder(registry_url: str) -> None:
    global _decoder_router
    from schemas.codec import Codec
    from schemas.registry_client import RegistryClient
    from streams.routing import Router

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sink stops it, on its own schedule
    _decoder_router = Router(Codec(RegistryClient(registry_url)))
    # A batch's objects are acyclic and die with the call, so the collector would only rescan
    # them while they live (7% of the decoding). It runs between batches instead, when nothing
    # is left to scan: the modules loaded by now are frozen out of it.
    gc.collect()
    gc.freeze()
    gc.disable()
    parent = os.getppid()

    def orphaned() -> None:  # a sink killed outright cannot stop it: leave with it
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphaned, name="nhdp-sink-decoder-parent", daemon=True).start()


# The tables whose rows only the decoders make (Shaped's first three parts): they arrive as
# encoded blocks (analytics_store.Block) when the store can take them.
BLOCK_TABLES = (("events", EVENT_COLUMNS), ("event_index", INDEX_COLUMNS), ("voids", VOID_COLUMNS))


def decode_and_shape(
    values: list[bytes],
    partitions: list[int],
    offsets: list[int],
    block_types: Sequence[list[tuple[str, str]]] | None = None,
) -> tuple[bytes, int]:
    """In the decoding process: raw messages → (the pickled shape() of the good ones, how many were good).

    Pickled here so that the sink unpickles it on its own thread (where
    run() keeps the collector off), not on the executor's result thread. With block_types
    (the column types of BLOCK_TABLES), those rows are sent encoded: the sink
    process plans every batch on one thread, and unpickling and encoding
    ~30 values per event there was a third of its time."""
    gc.collect()  # the collector is off here (_start_decoder), and the last batch is gone: nothing to scan
    good, _bad = _decoder_router.split(values)  # the worker dead-letters the bad ones, with the reason
    shaped = shape([(partitions[i], offsets[i], ev) for i, ev in good], _REGIONS)
    parts = list(shaped)
    if block_types is not None:
        for i, types in enumerate(block_types):
            if parts[i]:
                try:
                    parts[i] = encode_block(types, parts[i])
                except AnalyticsStoreError:
                    pass  # sent as rows: the sink's insert then names the column at fault
    return pickle.dumps((tuple(parts), shaped.skipped), protocol=pickle.HIGHEST_PROTOCOL), len(good)


# -- Kafka → Sink ---------------------------------------------------------------------------------


class Runner:
    """The consumer loop: poll, batch, decode, plan, write, commit; back-pressure while ClickHouse is down.

    The consumer is librdkafka's (confluent-kafka): it fetches and parses
    record batches on its own threads, outside the GIL, so Kafka costs this
    loop ~1 µs per message instead of kafka-python's ~6 µs of pure-Python
    parsing. Batches then go through the pipeline described at the top of
    this module: decoder processes, this thread's plan, the writer thread.
    """

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        *,
        group: str = GROUP,
        batch_rows: int = BATCH_ROWS,
        max_rows: int = MAX_BATCH_ROWS,
        within_s: float = BATCH_WITHIN_S,
        rollup_every_s: float = ROLLUP_EVERY_S,
        ready_file=None,
    ):
        self.settings, self.sink, self.group = settings, sink, group
        self.batch_rows, self.max_rows = batch_rows, max(max_rows, batch_rows)
        self.within_s, self.rollup_every_s = within_s, rollup_every_s
        self.ready_file = ready_file
        self.stop_event = threading.Event()
        self.processed = 0
        self.batches = 0
        self.retries = 0
        self._buffer: list = []
        self._paused = False
        self._decoder = None  # the decoding processes (a ProcessPoolExecutor of settings.sink_decoders)
        # batches cut from the buffer, in log order: (future, values, partitions, offsets, to commit, messages)
        self._decoding: collections.deque = collections.deque()
        self._writing: tuple | None = None  # (future, Planned, offsets to commit, messages): the batch in flight
        self._write_store: AnalyticsStore | None = None
        self._next_collection = 0.0  # run() collects garbage itself (_collect_if_due)
        # The store takes ready-made Native blocks: the decoders encode the rows only they make.
        column_types = getattr(sink.store, "column_types", None)
        types = [column_types(t, c) for t, c in BLOCK_TABLES] if column_types is not None else []
        self._block_types = types if types and all(types) else None

    def _consumer(self):
        from confluent_kafka import Consumer

        return Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                "group.id": self.group,
                "client.id": f"nhdp-sink-{os.getpid()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                "fetch.max.bytes": 64 * 1024 * 1024,
                "max.poll.interval.ms": 600_000,
                # A sink that dies without leaving the group (SIGKILL, a lost host) holds its
                # partitions until this expires: 10 s, as the worker, not the client's 45 s.
                "session.timeout.ms": 10_000,
                "logger": logging.getLogger("nhdp.sink.kafka"),
            }
        )

    # A rebalance revokes every partition (eager protocol) and the consumer then
    # fetches from the committed offsets: drop what is buffered, it was not
    # committed and will be delivered again. A partition assigned while the sink
    # holds a batch for a ClickHouse that is down starts paused, like the others.
    def _on_assign(self, consumer, assigned) -> None:
        if self._paused:
            consumer.pause(assigned)
        if self.ready_file is not None:
            self.ready_file.write_text(json.dumps(sorted(tp.partition for tp in assigned)))

    def _on_revoke(self, _consumer, _revoked) -> None:
        self._buffer.clear()

    def _take(self, consumer, n: int, timeout_s: float) -> int:
        """Up to n messages into the buffer, waiting at most timeout_s for them all; how many came."""
        messages = consumer.consume(num_messages=max(1, n), timeout=timeout_s)
        good = [m for m in messages if m.error() is None]
        if len(good) < len(messages):
            for m in messages:
                error = m.error()
                if error is not None and error.fatal():
                    raise RuntimeError(f"Kafka consumer failed: {error}")
                if error is not None:  # a broker down or restarting: librdkafka retries on its own; no message is lost
                    log.warning("Kafka: %s", error)
        self._buffer += good
        return len(good)

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        consumer = self._consumer()
        consumer.subscribe([TOPIC_EVENTS], on_assign=self._on_assign, on_revoke=self._on_revoke)
        # Three stages at once, in log order: the decoder processes decode and shape batch k+2,
        # this thread plans batch k+1, the writer thread writes batch k (mostly ClickHouse's
        # own work, outside the GIL).
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nhdp-sink-write")
        for _ in range(self.settings.sink_decoders):  # start them now, while the group forms, not with the first batch
            self._decoder_pool().submit(int)
        first_at = None
        last_polled = 0.0
        # The collector, left to itself, ran ~20 full collections a million messages, each
        # rescanning the live batches and the recent facts: a quarter of this process's CPU
        # for garbage that is almost never cyclic. It runs on this loop's schedule instead.
        collecting = gc.isenabled()
        gc.disable()
        self._next_collection = time.monotonic() + COLLECT_EVERY_S
        try:
            while not self.stop_event.is_set():
                self._collect_if_due()
                wait_s = self.within_s if first_at is None else max(0.0, first_at + self.within_s - time.monotonic())
                if self._decoding or self._writing is not None:  # move them on soon after they are done
                    wait_s = min(wait_s, 0.05)
                # returns when the batch is full or the wait is over, whichever comes first
                polled = self._take(consumer, self.batch_rows - len(self._buffer), wait_s)
                if self.ready_file is not None and not self.ready_file.exists():
                    # Up: ClickHouse migrated, Kafka reached. Partitions may come later (a departed
                    # member's session has to expire first); the listener records them when they do.
                    self.ready_file.write_text("[]")
                if self._buffer and first_at is None:
                    first_at = time.monotonic()
                full = len(self._buffer) >= self.batch_rows
                # Catching up: take what is already fetched, while the pipeline is busy anyway (an
                # idle one gets the first BATCH_ROWS at once: the sooner it fills, the sooner it flows).
                while full and len(self._buffer) < self.max_rows and (self._decoding or self._writing):
                    if not self._take(consumer, self.max_rows - len(self._buffer), 0):
                        break
                due = first_at is not None and time.monotonic() - first_at >= self.within_s
                if self._buffer and (full or due):
                    self._cut()
                    first_at = None
                if polled:
                    last_polled = time.monotonic()
                # A fetch can come back empty while catching up: only a log quiet for a while
                # drains the pipeline, anything sooner would stall the decoders.
                quiet = not polled and time.monotonic() - last_polled >= QUIET_S
                # One batch on per round, so that the decoders always have the next ones; all of
                # them once the log is quiet.
                if self._decoding and (
                    len(self._decoding) > self.settings.sink_decoders or self._decoding[0][0].done()
                ):
                    self._advance(consumer, writer)
                while quiet and self._decoding:
                    self._advance(consumer, writer)
                # committed as soon as written, not when the next batch is handed to the writer
                if self._writing is not None and (self._writing[0].done() or (quiet and not self._decoding)):
                    self._finish(consumer)
                if (
                    not self._buffer
                    and not self._decoding
                    and self._writing is None
                    and (not polled or time.monotonic() - self.sink.last_rollup > self.rollup_every_s)
                ):
                    self._with_retry(
                        consumer,
                        lambda polled=polled: self.sink.refresh_rollups(doses_every_s=DOSES_EVERY_S if polled else 0.0),
                    )
            # Stopping: the batch being written is finished and committed; the ones still being
            # decoded were not committed and will be delivered again.
            self._finish(consumer)
        finally:
            if collecting:
                gc.enable()
            writer.shutdown(wait=True)
            if self._decoder is not None:
                self._decoder.shutdown(wait=True, cancel_futures=True)
                self._decoder = None
            self._decoding.clear()
            if self._write_store is not None:
                self._write_store.close()
                self._write_store = None
            consumer.close()

    def _collect_if_due(self) -> None:
        if time.monotonic() >= self._next_collection:
            gc.collect()
            self._next_collection = time.monotonic() + COLLECT_EVERY_S

    def _decoder_pool(self):
        if self._decoder is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: this process runs librdkafka's and the writer's threads
            self._decoder = ProcessPoolExecutor(
                max_workers=self.settings.sink_decoders,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_decoder,
                initargs=(self.settings.registry_url,),
            )
        return self._decoder

    def _cut(self) -> None:
        """The buffer becomes a batch, sent to the decoding processes."""
        records, self._buffer = self._buffer, []
        values = [r.value() for r in records]
        partitions = [r.partition() for r in records]
        offsets = [r.offset() for r in records]
        commit = dict(zip(partitions, (o + 1 for o in offsets)))  # a partition's records come in offset order
        future = self._decoder_pool().submit(decode_and_shape, values, partitions, offsets, self._block_types)
        self._decoding.append((future, values, partitions, offsets, commit, len(records)))

    def _advance(self, consumer, writer) -> None:
        """The oldest batch being decoded: wait for it, plan it, and once the batch in flight is
        written and committed, hand its write to the writer thread."""
        from concurrent.futures.process import BrokenProcessPool

        future, values, partitions, offsets, commit, count = self._decoding.popleft()
        attempt = [future]

        def decoded():
            pending, attempt[0] = attempt[0], None
            try:
                return (
                    pending
                    or self._decoder_pool().submit(decode_and_shape, values, partitions, offsets, self._block_types)
                ).result()
            except BrokenProcessPool as exc:  # it died (killed, out of memory): a new one decodes it again
                self._decoder = None
                raise OSError(f"the sink's decoding process died: {exc}") from exc

        data, good = self._with_retry(consumer, decoded)
        parts, skipped = pickle.loads(data)
        shaped = Shaped(parts)
        shaped.skipped = skipped
        # planned while the batch before it is written: what it writes is taken from memory
        writing = self._writing[1] if self._writing is not None else None
        planned = self._with_retry(consumer, lambda: self.sink.plan(shaped, good, writing))
        self._finish(consumer)  # writes go one batch at a time, in log order
        self._writing = (writer.submit(self._write, planned), planned, commit, count)

    def _write(self, planned: Planned) -> BatchStats:
        if self._write_store is None:  # its own connection: the next batch's reads need not wait for it
            self._write_store = open_store(self.sink.store.url, purpose="nhdp sink (writer thread)")
        return self.sink.write(planned, self._write_store)

    def _finish(self, consumer) -> None:
        """Wait for the batch in flight; retry its write here while ClickHouse is down; then commit it."""
        from confluent_kafka import KafkaException, TopicPartition

        if self._writing is None:
            return
        future, planned, offsets, count = self._writing
        try:
            future.result()
        except (AnalyticsStoreError, OSError):
            self._with_retry(consumer, lambda: self._write(planned))
        finally:
            self._writing = None
        try:
            consumer.commit(
                offsets=[TopicPartition(TOPIC_EVENTS, p, o) for p, o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:  # a rebalance took the partitions: they are re-delivered, idempotently
            log.warning("offset commit failed (%s); the batch will be re-delivered and changes nothing", exc)
        self.processed += count
        self.batches += 1

    def _with_retry(self, consumer, fn):
        """fn() until it succeeds; meanwhile the partitions are paused but the consumer keeps polling."""
        delay = 0.2
        while True:
            try:
                result = fn()
                if self._paused:
                    self._paused = False
                    consumer.resume(consumer.assignment())
                return result
            except (AnalyticsStoreError, OSError) + _registry_errors() as exc:
                if self.stop_event.is_set():
                    raise
                self.retries += 1
                log.warning("ClickHouse or the registry failed (%s); holding the batch, retrying in %.1fs", exc, delay)
                if not self._paused:
                    self._paused = True
                    consumer.pause(consumer.assignment())
                self._collect_if_due()  # a long outage keeps this loop out of run()'s
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not self.stop_event.is_set():
                    # paused: nothing arrives, but rebalances are served; anything fetched before
                    # the pause is kept for the next batch, never dropped
                    self._take(consumer, self.max_rows, 0.1)
                delay = min(delay * 2, 10.0)


def _registry_errors() -> tuple:
    from schemas.registry_client import RegistryError

    return (RegistryError,)


# -- the query endpoint of a chDB owner ------------------------------------------------------------


def serve_queries(analytics: Analytics, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """POST /call/<method> with JSON kwargs → the Analytics answer as JSON; GET /healthz.

    Started by the sink when it owns a chDB folder: no other process may open
    the folder, so the API (and `nhdp verify-analytics`) ask here instead.
    """
    import orjson

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the API logs requests
            pass

        def _send(self, status: int, body: Any) -> None:
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/healthz":
                self._send(200, {"status": "ok", "pid": os.getpid()})
            else:
                self._send(404, {"error": f"no such path: GET {self.path}"})

        def do_POST(self):
            name = self.path.removeprefix("/call/")
            from projections.analytics import RemoteAnalytics

            if not self.path.startswith("/call/") or name not in RemoteAnalytics.METHODS:
                self._send(404, {"error": f"no such call: {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                kwargs = orjson.loads(self.rfile.read(length) or b"{}")
                self._send(200, getattr(analytics, name)(**kwargs))
            except ParameterError as exc:
                self._send(400, {"error": str(exc), "param": exc.param})
            except TypeError as exc:
                self._send(400, {"error": f"request: {exc}", "param": "request"})
            except Exception as exc:
                log.exception("analytics call %s failed", name)
                self._send(503, {"error": f"{type(exc).__name__}: {exc}"[:2000]})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="nhdp-sink-http", daemon=True).start()
    return server


def ready_path(settings: Settings, pid: int):
    return settings.run_dir / f"sink-{pid}.assigned"


def main(argv: list[str] | None = None) -> int:
    from nhdp.settings import get_settings

    parser = argparse.ArgumentParser(prog="nhdp sink", description="Kafka → ClickHouse analytics sink")
    parser.add_argument("--nhdp-data", help=argparse.SUPPRESS)  # the process manager's marker
    parser.add_argument("--group", default=GROUP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    url = settings.analytics_url()

    store = None
    delay = 0.5
    while store is None:  # ClickHouse not up yet: wait, do not die
        try:
            store = open_store(url, purpose="nhdp sink (owns the folder; answers analytics over HTTP)")
            sink = Sink(store)
        except AnalyticsStoreError as exc:
            if store is not None:
                store.close()
                store = None
            if not exc.retryable:
                raise
            log.warning("ClickHouse not reachable (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)

    runner = Runner(settings, sink, group=args.group, ready_file=ready_path(settings, os.getpid()))
    server = None
    url_file = sink_url_path(settings)
    if url.startswith("chdb:"):
        query_store = open_store(url)  # a second session on the folder this process owns
        server = serve_queries(Analytics(query_store))
        tmp = url_file.with_suffix(".tmp")
        tmp.write_text(f"http://127.0.0.1:{server.server_address[1]}\n")
        tmp.replace(url_file)

    def stop(*_):
        runner.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        runner.run()
    finally:
        if server is not None:
            url_file.unlink(missing_ok=True)
            server.shutdown()
        ready_path(settings, os.getpid()).unlink(missing_ok=True)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- positions, agreement with PostgreSQL, replay ----------------------------------------------------


def log_end(settings: Settings) -> dict[int, int]:
    """The next offset of every partition of health.events."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=10_000)
    try:
        parts = [TopicPartition(TOPIC_EVENTS, p) for p in sorted(consumer.partitions_for_topic(TOPIC_EVENTS) or [])]
        return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


def sink_positions(settings: Settings, group: str = GROUP) -> dict[int, int]:
    """The next offset the sink will consume, per partition (its committed offsets; 0 if none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        request_timeout_ms=10_000,
    )
    try:
        parts = [TopicPartition(TOPIC_EVENTS, p) for p in sorted(consumer.partitions_for_topic(TOPIC_EVENTS) or [])]
        return {tp.partition: consumer.committed(tp) or 0 for tp in parts}
    finally:
        consumer.close(autocommit=False)


def sink_lag(settings: Settings, group: str = GROUP) -> dict[int, int]:
    ends, done = log_end(settings), sink_positions(settings, group)
    return {p: end - done.get(p, 0) for p, end in ends.items()}


def wait_caught_up(settings: Settings, group: str = GROUP, timeout_s: float = 120.0) -> None:
    """Until the sink has committed every message now in health.events (for tests and tools)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = sink_lag(settings, group)
        if sum(lag.values()) == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ClickHouse sink ({group}) is still behind after {timeout_s}s: {lag}")
        time.sleep(0.2)


def _postgres_positions(conn, namespace: str = "proj") -> dict[int, int]:
    from streams.worker import GROUP as WORKER_GROUP

    rows = conn.execute(
        f'SELECT partition, "offset" FROM {namespace}.tracking WHERE consumer_group = %s AND topic = %s',
        (WORKER_GROUP, TOPIC_EVENTS),
    ).fetchall()
    return {p: o + 1 for p, o in rows}


def verify(
    settings: Settings, *, analytics=None, group: str = GROUP, timeout_s: float = 60.0, namespace: str = "proj"
) -> tuple[list[str], dict[int, int]]:
    """Every figure from ClickHouse (no as_of) against the PostgreSQL projections, once both have
    applied the same prefix of the log; returns (differences, the positions compared at).

    Waits up to timeout_s for the two to reach the same positions (normally the
    end of a quiet log); if they never do, the comparison is made anyway and a
    first line says at which positions each stood.
    """
    import psycopg

    from projections.analytics import analytics_for, diff_with_postgres

    analytics = analytics or analytics_for(settings, pool_size=1)
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        while True:
            ends = log_end(settings)
            pg = {p: _postgres_positions(conn, namespace).get(p, 0) for p in ends}
            ch = {p: sink_positions(settings, group).get(p, 0) for p in ends}
            aligned = pg == ch
            if aligned:
                diffs = diff_with_postgres(analytics, conn, namespace)
                again = {p: _postgres_positions(conn, namespace).get(p, 0) for p in ends}
                if again == pg and sink_positions(settings, group) == ch:
                    return diffs, pg
            elif time.monotonic() > deadline:
                diffs = diff_with_postgres(analytics, conn, namespace)
                return [f"positions differ: postgres={pg} clickhouse={ch} (log end {ends})"] + diffs, pg
            time.sleep(0.3)


def replay_url(settings: Settings, name: str) -> str:
    """The analytics store a replay named `name` rebuilds: database replay_<name> (chDB: its own folder)."""
    from urllib.parse import urlparse, urlunparse

    from streams.replay import namespace_for

    database = namespace_for(name)
    url = settings.analytics_url()
    if url.startswith("chdb:"):
        return f"chdb://{(settings.data_dir / f'chdb-{database}').resolve()}?database={database}"
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{database}"))


def _reset_database(url: str) -> None:
    """A rebuild starts from nothing: drop and re-create the replay database (or its chDB folder)."""
    import shutil
    from urllib.parse import urlparse, urlunparse

    parsed = urlparse(url)
    if parsed.scheme == "chdb":
        shutil.rmtree(parsed.path, ignore_errors=True)
        return
    database = parsed.path.strip("/")
    admin = open_store(urlunparse(parsed._replace(path="/default")))
    try:
        admin.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.execute(f"CREATE DATABASE `{database}`")
    finally:
        admin.close()


@dataclass
class ReplayResult:
    url: str
    events: int
    seconds: float


def rebuild(
    settings: Settings, name: str, *, upto: dict[int, int] | None = None, batch_rows: int = 20_000, progress=None
) -> ReplayResult:
    """Rebuild the analytics of the log from offset 0 up to `upto` (last offsets, inclusive; default: the
    end now) into replay_<name>, with the same Router and Sink as the live sink, then every rollup."""
    from infra.kafka import LogPrefix
    from schemas.codec import Codec
    from schemas.registry_client import RegistryClient
    from streams.routing import Router

    url = replay_url(settings, name)
    _reset_database(url)
    started = time.perf_counter()
    store = open_store(url, purpose=f"nhdp replay {name}")
    events = 0
    try:
        sink = Sink(store)
        router = Router(Codec(RegistryClient(settings.registry_url)))
        buffer: list = []

        def flush() -> None:
            nonlocal events
            good, _ = router.split([r.value for r in buffer])
            sink.process([(buffer[i].partition, buffer[i].offset, ev) for i, ev in good])
            events += len(buffer)
            if progress:
                progress(events)
            buffer.clear()

        with LogPrefix(settings.kafka_bootstrap_servers, upto, batch_rows) as prefix:
            for records in prefix:
                buffer.extend(records)
                if len(buffer) >= batch_rows:
                    flush()
        if buffer:
            flush()
        sink.refresh_all()
    finally:
        store.close()
    return ReplayResult(url, events, time.perf_counter() - started)


def diff_replay(settings: Settings, name: str, namespace: str = "proj") -> list[str]:
    """The rebuilt analytics (replay_<name>) against the live PostgreSQL projections."""
    import psycopg

    from projections.analytics import Analytics, diff_with_postgres

    store = open_store(replay_url(settings, name), purpose=f"nhdp replay {name} --verify")
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            return [f"replay: {line}" for line in diff_with_postgres(Analytics(store), conn, namespace)]
    finally:
        store.close()

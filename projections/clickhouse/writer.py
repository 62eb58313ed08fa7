"""The ClickHouse sink's planner and writer: one batch of decoded events → every row it writes.

sink → ClickHouse: effectively once, by construction rather than by luck.
    Every write is keyed and idempotent: facts and voids collapse by
    event_id (ReplacingMergeTree; queries read FINAL or count distinct ids),
    points and subject rows are overwrites (latest version wins), rollups
    are recomputed, never incremented (see rollups.py). A
    re-delivered or re-inserted batch therefore changes nothing.

One writer per database. Voids find their targets and subjects' timelines
    are recomputed by read-modify-write against what the previous batches
    wrote, so exactly one sink process may write a database (the local stack
    starts one; replay writes its own database). A fence enforces it: each
    sink records itself in `sink_owners` when it starts, checks before every
    batch's writes that it is still the latest, and otherwise stops
    (SinkFenced) and leaves the batch uncommitted for the newer one.

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

import collections
import hashlib
import logging
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from projections.clickhouse.rollups import refresh_doses, refresh_rollups
from projections.clickhouse.schema import FULLY, HOUR_MS, NEVER_MS, PEOPLE, migrate
from projections.clickhouse.shaping import (
    _PEOPLE_FULLY,
    EVENT_COLUMNS,
    INDEX_COLUMNS,
    POINT_COLUMNS,
    REGIONS,
    SUBJECT_COLUMNS,
    VOID_COLUMNS,
    Fact,
    Point,
    Shaped,
    shape,
    timeline,
)
from projections.clickhouse.store import AnalyticsStore, chunks
from projections.counting import DOSE

log = logging.getLogger("nhdp.sink")


RECENT_FACTS = 200_000  # facts kept in memory for the voids that follow them (~50 MB)


# doses_daily recomputes whole local days (~1.4M doses on the busiest): while busy at most
# this often; until then a query answers the day from `events`
DOSES_EVERY_S = 60.0


# event ids are FixedString(16) (schema.py): look them up from their text
_IDS = "(SELECT UUIDStringToNum(i) FROM (SELECT arrayJoin(%(id_list)s) AS i))"


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
        self.store = store
        migrate(store)
        (last,) = store.execute(
            "SELECT greatest((SELECT max(version) FROM hour_marks), (SELECT max(version) FROM sink_batches))"
        )[0]
        self._version = int(last or 0)
        (done,) = store.execute("SELECT max(version) FROM sink_batches")[0]
        self._completed = int(done or 0)  # every write of batches up to this version is in ClickHouse
        (refreshed,) = store.execute(
            "SELECT greatest(greatest((SELECT max(version) FROM hour_marks WHERE mark > 0), "
            "(SELECT max(version) FROM figures_hourly)), greatest((SELECT max(version) FROM figures_daily), "
            "(SELECT max(version) FROM doses_daily)))"
        )[0]
        self._refreshed = int(refreshed or 0)  # the version of the latest recompute (refresh_version)
        self._void_targets: set[str] = {
            t for (t,) in store.execute("SELECT DISTINCT UUIDNumToString(target_id) FROM voids")
        }
        self._regions = REGIONS
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
    def refresh_rollups(
        self, limit: int = 240, doses_every_s: float = DOSES_EVERY_S, store: AnalyticsStore | None = None
    ) -> int:
        """Recompute dirty figure rollups, and doses_daily if it is due; returns how many hours/days.

        May run while a batch is written (`store`: another connection, as for write()): see
        refresh_version."""
        store = store or self.store
        self.last_rollup = time.monotonic()
        self.check_owner(store)
        version = self.refresh_version()
        n = refresh_rollups(store, version, limit=limit)
        if self.last_rollup - self.last_doses >= doses_every_s:
            self.last_doses = self.last_rollup
            n += refresh_doses(store, version)
        return n

    def stale(self) -> bool:
        """A batch was written since the last recompute began."""
        return self._completed > self._refreshed

    def refresh_version(self) -> int:
        """The version a recompute marks hours clean with: the last batch whose write returned.

        Every batch at or below it is wholly in ClickHouse, and every batch still being written
        has a higher one (versions are given in plan() and written in that order), so an hour
        such a batch touches stays dirty whatever part of its rows the recompute saw. Never
        lower than an earlier recompute's: a rollup row of a lower version would lose to older
        ones."""
        self._refreshed = max(self._refreshed, self._completed)
        return self._refreshed

    def refresh_all(self) -> int:
        total = 0
        while n := self.refresh_rollups(limit=500, doses_every_s=0):
            total += n
        return total

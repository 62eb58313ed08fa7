"""ClickHouse analytics: the tables, how they are written, and every query on them.
ClickHouse analytics: the tables (versioned migrations) and every query on them.

    store = open_store(settings.analytics_url())
    migrate(store)                                   # idempotent; `nhdp up` and the sink both run it
    analytics = Analytics(store)
    analytics.national_summary(as_of="2021-08-10T12:00:00+07:00")
    analytics.doses(group_by="province,day", from_="2021-08-01", to="2021-08-30")

The same DDL and SQL run on Debian's ClickHouse 18.16 and on chDB 26 (see
projections/clickhouse/store.py for the dialect both accept). Writes come from
one process only, the sink (streams/sink/, writing through writer.py); queries.py only reads,
apart from `refresh_rollups`, which the sink calls.

Tables
------
events         every event of the log, one row per event_id (ReplacingMergeTree on
               (hour, event_type, province_code, event_id): a re-delivered copy
               collapses on merge, and every read goes through FINAL or counts
               distinct event_ids, so unmerged copies never count twice). Time
               is `occurred_at` DateTime('UTC') + `occurred_ms` (the Avro
               timestamp's milliseconds), `hour` (UTC) is the bucket of
               everything below, `day` is the local day in Asia/Ho_Chi_Minh.
               `kind`, `flag` and `doses` are the figure view of the event,
               read as the PostgreSQL projector's `_prepare` reads it
               (shaping.shape, by projections.counting's rule, as the PostgreSQL projector).
               `hour`, `day` and `subject_key` are MATERIALIZED by the server. No citizen_id, name or other
               direct identifier: only subject_id (and `subject_key`, its
               sipHash128, for fast distinct counts). Event ids are stored as
               the UUID's 16 bytes (FixedString(16), UUIDStringToNum): they
               sort like the canonical text, unlike 18.16's UUID type, and
               the driver encodes them 6x faster than UUID columns.
voids          RecordVoided as (target_id, void_id, occurred_ms), keyed by target.
event_index    the figure view of every counted fact keyed by event_id, so that a
               void can find its target without scanning `events`.
subjects       per subject: its doses (time, id, province, janssen, earliest void)
               and every timeline point ever written for it (see below).
points         figure contributions that are not the +1 of a fact at its own time:
               * a retraction: -1 for a voided fact at r = max(occurred, earliest
                 void), keyed by the target's event_id;
               * people_vaccinated (kind 6) and people_fully_vaccinated (kind 7):
                 +1/-1 in a province at the instants a subject's state changes.
               A point is an identity (hour, key_id, kind, t_ms, province, delta)
               with `live` 1 or 0 (tombstone); the latest `version` wins.
figures_hourly / figures_daily
               rollups: per (bucket, province, kind, vaccine, dose_number) the
               sums n, nflag, amount of events (+1 each) and live points (delta).
doses_daily    rollup for the doses endpoint: per local day and grouping (a bitmask of
               province, vaccine, dose number; '' / 0 where not grouped) the valid doses
               and distinct people.
sink_batches   the version of every batch whose writes all completed.
sink_owners    every sink that started writing this database; the latest one is the
               writer, and an older one stops at its next batch (a fence).
hour_marks     per UTC hour: the version at which its data last changed (mark 0,
               "dirty") and the version its rollups were last recomputed at
               (mark 1, "clean"; mark 2 for doses_daily).
schema_migrations  the versions applied.

How as_of=T is answered exactly (DESIGN §4)
-------------------------------------------
A fact e counts at T iff occurred(e) < T and no void of e occurred before T.
With v = its earliest void and r = max(occurred(e), v):

    counts(e, T) = [occurred(e) < T] - [r < T]

so every figure is a sum of +1 at a fact's own time (the `events` row) and -1
at r (its retraction point). A subject's people_vaccinated province and
fully-vaccinated state are step functions of T; the sink writes the steps as
points, so people(T, P) = sum of the subject points with t < T. Every figure,
as of any T, is then  sum over rows with t < T  of one uniform row shape:

    daily rollups    for UTC days that end at or before T and hold no dirty hour
  + hourly rollups   for the other clean hours that end at or before T
  + events + points  (FINAL, t < T) for dirty hours and the hour T falls in.

T without as_of is +infinity (T = NEVER_MS). No figure depends on arrival
order: duplicates collapse by key, a void that arrives before its target is
found by the target (and the other way round), and nothing reads the clock.

Why the rollups can be trusted: they are correctable, not incremental
----------------------------------------------------------------------
A materialized view (or a sink adding +1s) over a ReplacingMergeTree counts a
re-delivered row again, and a void that arrives after its target has been
rolled up would have to subtract something already summed. So no rollup here
is ever incremented. A rollup row is a *cache of a pure function*: the sums
over the deduplicated events and live points of its hour (FINAL), recomputed
as a whole (`refresh_rollups`) and written with a higher version, vanished
keys as zeros. It is trusted only for hours whose last recompute is newer
than their last change:

1. the sink marks an hour dirty (hour_marks, its batch's version) *before*
   it writes the batch's rows of that hour, so no row can be in ClickHouse
   without its hour being dirty;
2. a recompute marks the hours it read clean with the version of the last
   batch whose writes all returned (Sink.refresh_version), so it may run
   beside the writes: a batch still being written has a higher version and
   its hours stay dirty, whatever part of its rows the recompute saw (so it
   skips them: dirty_hours(through=version)). The
   daily rollup of a day is recomputed from its hourly rows in the same
   round, and used only while none of the day's hours is dirty;
3. a query answers dirty hours from `events` + `points` directly (FINAL).

So a crash, a re-delivery or a lagging recompute makes a query slower, never
wrong, and a recompute can be repeated at any time (replay rebuilds with it).

Points are correctable the same way: every point write is an overwrite of an
identity (latest version wins), never an increment. A retraction for target e
is written live at r and as a tombstone at max(occurred(e), v) for every other
void v ever seen, which covers every r written before. A subject's points are
recomputed from the subject's doses; the `subjects` row is written *before*
the points and lists every point ever written for the subject, and points
not in the new timeline are tombstoned, so no point outlives a crash.

The analytics endpoints
-----------------------
* doses(group_by, from, to, province): valid doses (no void at all, as in
  PostgreSQL's valid_doses) grouped by any of province, day (local), vaccine,
  dose_number, with `doses` = distinct event_ids and `people` = distinct
  subjects (subject_key, a 128-bit hash of subject_id). A distinct count does
  not add up across buckets, so figures_* cannot answer it, and they hold a
  void at the void's time, not at the dose's day. Grouped by day it comes
  from doses_daily, which keeps every grouping of each local day separately
  (so no distinct count is ever added up), with the same dirty/clean marks as
  the figure rollups (mark 2), and a void marks its target dose's hour dirty.
  Stale days (today, while doses arrive) are answered from `events`. Not
  grouped by day, or filtered to several provinces without grouping by
  province, people must be distinct across days or provinces: that is read
  from `events`, and its cost grows with the doses in the range.
* coverage(by=province|region, as_of): people_(fully_)vaccinated against the
  2019 population, each row ranked (1 = highest) and compared with the
  national figure in percentage points.

Rules for SQL that must hold on both engines (besides analytics_store's):
never PREWHERE with FINAL (it filters before deduplication); WHERE after FINAL
is correct on both; no JOIN (26.x wants aliases, 18.16 wants strictness): use
IN subqueries; IN lists go in chunks (18.16's max_query_size is 256 KiB).
"""

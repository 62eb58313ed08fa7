"""The analytics tables: event kinds, time units, and the versioned migrations that create them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

from projections.clickhouse.connect import open_store
from projections.clickhouse.store import AnalyticsStore
from projections.counting import ADVERSE, ALLOCATION, DECLARATION, DOSE, REGISTRATION

HCM = timezone(timedelta(hours=7))  # Asia/Ho_Chi_Minh: UTC+7 all year, no DST since 1975


# Kinds 1-5 are the event codes of projections.counting.
PEOPLE, FULLY = 6, 7  # people (fully) vaccinated: points of subjects, after the event kinds 1-5


COUNTED_KINDS = (DECLARATION, REGISTRATION, DOSE, ADVERSE, ALLOCATION)


NEVER_MS = 1 << 62  # "no cut-off" and "never voided": later than any event time


HOUR_MS = 3_600_000


DAY_MS = 86_400_000


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events, voids, event index, subjects, points, rollups, hour marks",
        (
            """
            CREATE TABLE IF NOT EXISTS events (
                event_id FixedString(16),
                event_type String,
                kind UInt8,
                occurred_at DateTime('UTC'),
                occurred_ms UInt16,
                hour DateTime('UTC') MATERIALIZED toStartOfHour(occurred_at),
                day Date MATERIALIZED toDate(occurred_at, 'Asia/Ho_Chi_Minh'),
                province_code String,
                region String,
                source String,
                subject_id String,
                subject_key FixedString(16) MATERIALIZED sipHash128(subject_id),
                flag UInt8,
                vaccine String,
                dose_number UInt8,
                site_id String,
                lot_number String,
                severity String,
                has_symptoms UInt8 MATERIALIZED if(kind = 1, flag, 0),
                doses Int64,
                recipient String,
                voided_event_id String,
                kafka_partition UInt16,
                kafka_offset UInt64
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(hour)
            ORDER BY (hour, event_type, province_code, event_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS voids (
                target_id FixedString(16),
                void_id FixedString(16),
                occurred_ms Int64,
                province_code String
            ) ENGINE = ReplacingMergeTree
            ORDER BY (target_id, void_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS event_index (
                event_id FixedString(16),
                kind UInt8,
                occurred_ms Int64,
                province_code String,
                subject_id String,
                vaccine String,
                dose_number UInt8,
                flag UInt8,
                amount Int64
            ) ENGINE = ReplacingMergeTree
            ORDER BY event_id
            SETTINGS index_granularity = 1024
            """,
            """
            CREATE TABLE IF NOT EXISTS subjects (
                subject_id String,
                version UInt64,
                dose_ids Array(String),
                dose_ms Array(Int64),
                dose_province Array(String),
                dose_janssen Array(UInt8),
                dose_void_ms Array(Int64),
                ever_ms Array(Int64),
                ever_kind Array(UInt8),
                ever_province Array(String),
                ever_delta Array(Int8)
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY subject_id
            SETTINGS index_granularity = 64
            """,
            """
            CREATE TABLE IF NOT EXISTS points (
                hour DateTime('UTC'),
                key_id String,
                kind UInt8,
                t_ms Int64,
                province_code String,
                delta Int8,
                vaccine String,
                dose_number UInt8,
                flag UInt8,
                amount Int64,
                live UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            PARTITION BY toYYYYMM(hour)
            ORDER BY (hour, key_id, kind, t_ms, province_code, delta)
            """,
            """
            CREATE TABLE IF NOT EXISTS figures_hourly (
                hour DateTime('UTC'),
                province_code String,
                kind UInt8,
                vaccine String,
                dose_number UInt8,
                n Int64,
                nflag Int64,
                amount Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            PARTITION BY toYYYYMM(hour)
            ORDER BY (hour, province_code, kind, vaccine, dose_number)
            """,
            """
            CREATE TABLE IF NOT EXISTS figures_daily (
                day DateTime('UTC'),
                province_code String,
                kind UInt8,
                vaccine String,
                dose_number UInt8,
                n Int64,
                nflag Int64,
                amount Int64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (day, province_code, kind, vaccine, dose_number)
            """,
            """
            CREATE TABLE IF NOT EXISTS sink_owners (
                instance String,
                started UInt64
            ) ENGINE = ReplacingMergeTree
            ORDER BY instance
            """,
            """
            CREATE TABLE IF NOT EXISTS sink_batches (
                version UInt64,
                messages UInt32,
                completed_at DateTime('UTC')
            ) ENGINE = ReplacingMergeTree
            ORDER BY version
            """,
            """
            CREATE TABLE IF NOT EXISTS hour_marks (
                hour DateTime('UTC'),
                mark UInt8,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (hour, mark)
            """,
        ),
    ),
    Migration(
        2,
        "doses_daily: valid doses and people per local day, for every grouping of province, vaccine, dose number",
        (
            """
            CREATE TABLE IF NOT EXISTS doses_daily (
                day Date,
                grouping UInt8,
                province_code String,
                vaccine String,
                dose_number UInt8,
                doses UInt64,
                people UInt64,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version)
            ORDER BY (day, grouping, province_code, vaccine, dose_number)
            """,
        ),
    ),
)


MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    name String,
    applied_at DateTime('UTC')
) ENGINE = ReplacingMergeTree
ORDER BY version
"""


# -- the cluster shape ---------------------------------------------------------------------------
# One set of migrations, two shapes. On one server (or chDB) each statement runs as written. On a
# cluster (a store whose URL names one, `?cluster=NAME`) each table becomes a local
# Replicated…MergeTree `<table>_local` on every server (its shard's replicas share a ZooKeeper path)
# plus a Distributed table under the table's own name, so every query and insert runs unchanged.
# The DDL runs ON CLUSTER: the store knows one server, the distributed DDL queue reaches all of them.
#
# The sharding key is the dedup key: ReplacingMergeTree collapses versions only within a shard, and
# FINAL runs per shard, so every version of a key must land on the same shard.
SHARDING_KEYS = {
    "events": "cityHash64(event_id)",
    "event_index": "cityHash64(event_id)",
    # by target: a target's voids together (queries ask `NOT IN (SELECT target_id FROM voids)`)
    "voids": "cityHash64(target_id)",
    "subjects": "cityHash64(subject_id)",
    # a subject's points, or a retracted event's, by key_id (the first column of their key after hour)
    "points": "cityHash64(key_id)",
    # Rollups and marks are recomputed by INSERT … SELECT over the Distributed tables (GROUP BY merges
    # the shards' partial states), never read-modify-written in Python, so they shard by their key too.
    "figures_hourly": "cityHash64(hour)",
    "figures_daily": "cityHash64(day)",
    "doses_daily": "cityHash64(day)",
    "hour_marks": "cityHash64(hour)",
    "sink_owners": "cityHash64(instance)",
    "sink_batches": "cityHash64(version)",
    "schema_migrations": "cityHash64(version)",
}


_CREATE = re.compile(
    r"^\s*CREATE TABLE IF NOT EXISTS (?P<table>\w+) \((?P<columns>.*)\)\s*"
    r"ENGINE = (?P<engine>\w*MergeTree)(?:\((?P<args>[^)]*)\))?(?P<rest>.*)$",
    re.DOTALL,
)


def cluster_statements(statement: str, database: str, cluster: str) -> list[str]:
    """One CREATE TABLE of a migration in the cluster shape: the replicated local table, then the Distributed one.

    MATERIALIZED columns become DEFAULT in the local table: the Distributed table computes them
    (the same expression, on the same server version) and sends them with the rows, which a
    MATERIALIZED column would refuse. Nothing inserts them explicitly, and nothing reads `SELECT *`.
    """
    m = _CREATE.match(statement)
    if m is None:
        raise ValueError(f"a migration statement the cluster shape cannot translate: {statement.strip()[:120]}")
    table, engine = m["table"], m["engine"]
    local = f"{table}_local"
    columns = m["columns"].replace(" MATERIALIZED ", " DEFAULT ")
    args = ", ".join(
        [f"'/clickhouse/tables/{{shard}}/{database}/{local}'", "'{replica}'"] + ([m["args"]] if m["args"] else [])
    )
    on = f"ON CLUSTER `{cluster}`"
    return [
        f"CREATE TABLE IF NOT EXISTS `{database}`.`{local}` {on} ({columns}) "
        f"ENGINE = Replicated{engine}({args}){m['rest']}",
        f"CREATE TABLE IF NOT EXISTS `{database}`.`{table}` {on} AS `{database}`.`{local}` "
        f"ENGINE = Distributed(`{cluster}`, `{database}`, `{local}`, {SHARDING_KEYS[table]})",
    ]


def shaped(store: AnalyticsStore, statement: str) -> list[str]:
    """The statements that carry out one migration statement on this store (see cluster_statements)."""
    cluster = getattr(store, "cluster", None)  # chDB has none: it can never be a replica
    return cluster_statements(statement, store.database, cluster) if cluster else [statement]


def applied_versions(store: AnalyticsStore) -> set[int]:
    # Only if missing: ON CLUSTER DDL waits for every server, so a sink (re)starting while one
    # replica is down would otherwise wait for it.
    if not store.execute("EXISTS TABLE schema_migrations")[0][0]:
        for statement in shaped(store, MIGRATIONS_DDL):
            store.execute(statement)
    return {int(v) for (v,) in store.execute("SELECT DISTINCT version FROM schema_migrations")}


def migrate(store: AnalyticsStore, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations not yet recorded, in order; returns the versions applied now.

    Every statement is CREATE … IF NOT EXISTS, so a migration interrupted half
    way, or run by two processes at once, is simply run again; the version is
    recorded only after all its statements succeeded.
    """
    done = applied_versions(store)
    now = []
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in done:
            continue
        for statement in m.statements:
            for part in shaped(store, statement):
                store.execute(part)
        store.insert(
            "schema_migrations",
            ["version", "name", "applied_at"],
            [(m.version, m.name, int(datetime.now(UTC).timestamp()))],
        )
        now.append(m.version)
    return now


def ensure_schema(url: str, password: str | None = None) -> list[int]:
    """Open the store at url, create its database if needed, migrate, close (used by `nhdp up`)."""
    store = open_store(url, purpose="nhdp migrate", password=password)
    try:
        return migrate(store)
    finally:
        store.close()


def _dt(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def local_day(hour_s: int) -> date:
    return datetime.fromtimestamp(hour_s, HCM).date()


def day_hours(day: date) -> list[int]:
    """The 24 UTC hours (epoch seconds) of a local day."""
    start = int(datetime.combine(day, datetime.min.time(), HCM).timestamp())
    return [start + 3600 * i for i in range(24)]

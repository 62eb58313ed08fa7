"""The analytics tables: event kinds, time units, and the versioned migrations that create them."""

from __future__ import annotations

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


def applied_versions(store: AnalyticsStore) -> set[int]:
    store.execute(MIGRATIONS_DDL)
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
            store.execute(statement)
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

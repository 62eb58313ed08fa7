"""Bulk insert rate of each analytics engine, for a 15-column facts-like table.

    python bench/bench_analytics_store.py [--rows 200000] [--batch 50000]

Starts a private clickhouse-server (if installed) and a chDB folder in a
temporary directory, inserts the same rows into each in batches, and prints
rows/s for the whole path the sink pays: transposing, encoding and inserting.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.clickhouse import ensure_database, server_service
from infra.settings import Settings
from infra.tools import server_binary
from nhdp.stack import free_ports
from projections.clickhouse.connect import open_store

DDL = """
CREATE TABLE IF NOT EXISTS dose_facts_bench (
    event_id UUID, event_type String, occurred_at DateTime('UTC'), local_day Date,
    province_code String, source String, subject_id String, site_id String,
    vaccine String, lot_number String, dose_number UInt8, severity Nullable(String),
    symptoms Array(String), doses UInt32, version UInt64
) ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(occurred_at) ORDER BY (province_code, event_id)
"""
COLUMNS = [
    "event_id",
    "event_type",
    "occurred_at",
    "local_day",
    "province_code",
    "source",
    "subject_id",
    "site_id",
    "vaccine",
    "lot_number",
    "dose_number",
    "severity",
    "symptoms",
    "doses",
    "version",
]


def make_rows(n: int, epoch_seconds: bool) -> list[tuple]:
    rnd = random.Random(7)
    start = datetime(2021, 8, 10, tzinfo=UTC)
    vaccines = ["astrazeneca", "pfizer", "moderna", "sinopharm", "janssen"]
    rows = []
    for i in range(n):
        t = start + timedelta(seconds=i)
        rows.append(
            (
                uuid.UUID(int=rnd.getrandbits(128)),
                "DoseAdministered",
                int(t.timestamp()) if epoch_seconds else t,
                (t + timedelta(hours=7)).date(),
                f"{i % 63 + 1:02d}",
                "site-app",
                f"{rnd.getrandbits(256):064x}",
                f"site-{i % 500}",
                vaccines[i % 5],
                f"LOT{i % 100}",
                1 + i % 2,
                None if i % 3 else "mild",
                ["fever"] if i % 5 == 0 else [],
                0,
                i,
            )
        )
    return rows


def bench(store, rows: list[tuple], batch: int) -> float:
    store.execute("DROP TABLE IF EXISTS dose_facts_bench")
    store.execute(DDL)
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        store.insert("dose_facts_bench", COLUMNS, rows[i : i + batch])
    elapsed = time.perf_counter() - started
    assert store.execute("SELECT count() FROM dose_facts_bench") == [(len(rows),)]
    store.execute("DROP TABLE dose_facts_bench")
    return len(rows) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=50_000)
    args = parser.parse_args()

    datasets = {"datetime": make_rows(args.rows, False), "epoch int": make_rows(args.rows, True)}
    with tempfile.TemporaryDirectory(prefix="nhdp-bench-") as tmp:
        engines = [("chdb 26", f"chdb://{tmp}/chdb?database=bench")]
        password = None
        service = None
        if server_binary():
            tcp, http = free_ports(2)
            settings = Settings(
                data_dir=Path(tmp) / "data", clickhouse_url=None, clickhouse_port=tcp, clickhouse_http_port=http
            )
            service = server_service(settings)
            started = time.perf_counter()
            service.start(timeout_s=60)
            print(f"clickhouse-server cold start: {time.perf_counter() - started:.2f} s")
            ensure_database(settings)
            engines.insert(0, ("clickhouse-server (native)", settings.analytics_url()))
            password = settings.analytics_password()
        try:
            print(f"{args.rows:,} rows x {len(COLUMNS)} columns, batches of {args.batch:,}")
            for name, url in engines:
                store = open_store(url, purpose="bench", password=password)
                try:
                    for kind, rows in datasets.items():
                        rate = bench(store, rows, args.batch)
                        print(f"  {name:28s} occurred_at as {kind:9s}: {rate:>10,.0f} rows/s")
                finally:
                    store.close()
        finally:
            if service:
                service.stop()


if __name__ == "__main__":
    main()

"""The sink's positions, its agreement with PostgreSQL, and rebuilding the analytics from the log."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import psycopg

from infra.settings import Settings
from projections.clickhouse.connect import open_store
from projections.clickhouse.queries import Analytics
from projections.clickhouse.remote import analytics_for
from projections.clickhouse.verify import diff_with_postgres
from projections.clickhouse.writer import Sink
from projections.postgres import tracking
from schemas.codec import Codec
from schemas.log import LogPrefix, group_positions, lag, log_end
from schemas.registry_client import RegistryClient
from schemas.topics import ANALYTICS_GROUP
from streams.replay import namespace_for
from streams.routing import Router


def sink_positions(settings: Settings, group: str = ANALYTICS_GROUP) -> dict[int, int]:
    """The next offset the sink will consume, per partition (its committed offsets; 0 if none)."""
    return group_positions(settings, group)


def sink_lag(settings: Settings, group: str = ANALYTICS_GROUP) -> dict[int, int]:
    return lag(log_end(settings), sink_positions(settings, group))


def wait_caught_up(settings: Settings, group: str = ANALYTICS_GROUP, timeout_s: float = 120.0) -> None:
    """Until the sink has committed every message now in health.events (for tests and tools)."""
    deadline = time.monotonic() + timeout_s
    while True:
        behind = sink_lag(settings, group)
        if sum(behind.values()) == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ClickHouse sink ({group}) is still behind after {timeout_s}s: {behind}")
        time.sleep(0.2)


def verify(
    settings: Settings,
    *,
    analytics=None,
    group: str = ANALYTICS_GROUP,
    timeout_s: float = 60.0,
    namespace: str = "proj",
) -> tuple[list[str], dict[int, int]]:
    """Every figure from ClickHouse (no as_of) against the PostgreSQL projections, once both have
    applied the same prefix of the log; returns (differences, the positions compared at).

    Waits up to timeout_s for the two to reach the same positions (normally the
    end of a quiet log); if they never do, the comparison is made anyway and a
    first line says at which positions each stood.
    """
    analytics = analytics or analytics_for(settings, pool_size=1)
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        while True:
            ends = log_end(settings)
            pg = {p: tracking.next_offsets(conn, namespace).get(p, 0) for p in ends}
            ch = {p: sink_positions(settings, group).get(p, 0) for p in ends}
            aligned = pg == ch
            if aligned:
                diffs = diff_with_postgres(analytics, conn, namespace)
                again = {p: tracking.next_offsets(conn, namespace).get(p, 0) for p in ends}
                if again == pg and sink_positions(settings, group) == ch:
                    return diffs, pg
            elif time.monotonic() > deadline:
                diffs = diff_with_postgres(analytics, conn, namespace)
                return [f"positions differ: postgres={pg} clickhouse={ch} (log end {ends})"] + diffs, pg
            time.sleep(0.3)


def replay_url(settings: Settings, name: str) -> str:
    """The analytics store a replay named `name` rebuilds: database replay_<name> (chDB: its own folder)."""
    database = namespace_for(name)
    url = settings.analytics_url()
    if url.startswith("chdb:"):
        return f"chdb://{(settings.data_dir / f'chdb-{database}').resolve()}?database={database}"
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{database}"))


def _reset_database(url: str, password: str | None) -> None:
    """A rebuild starts from nothing: drop and re-create the replay database (or its chDB folder)."""
    parsed = urlparse(url)
    if parsed.scheme == "chdb":
        shutil.rmtree(parsed.path, ignore_errors=True)
        return
    database = parsed.path.strip("/")
    admin = open_store(urlunparse(parsed._replace(path="/default")), password=password)
    cluster = getattr(admin, "cluster", None)
    on = f" ON CLUSTER `{cluster}`" if cluster else ""  # a cluster's database is on every server
    try:
        admin.execute(f"DROP DATABASE IF EXISTS `{database}`{on}")
        admin.execute(f"CREATE DATABASE `{database}`{on}")
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

    url = replay_url(settings, name)
    _reset_database(url, settings.analytics_password())
    started = time.perf_counter()
    store = open_store(url, purpose=f"nhdp replay {name}", password=settings.analytics_password())
    events = 0
    try:
        sink = Sink(store)
        router = Router(Codec(RegistryClient.for_settings(settings)))
        buffer: list = []

        def flush() -> None:
            nonlocal events
            good, _ = router.split([r.value for r in buffer])
            sink.process([(buffer[i].partition, buffer[i].offset, ev) for i, ev in good])
            events += len(buffer)
            if progress:
                progress(events)
            buffer.clear()

        with LogPrefix(settings, upto, batch_rows) as prefix:
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

    store = open_store(
        replay_url(settings, name), purpose=f"nhdp replay {name} --verify", password=settings.analytics_password()
    )
    try:
        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            return [f"replay: {line}" for line in diff_with_postgres(Analytics(store), conn, namespace)]
    finally:
        store.close()

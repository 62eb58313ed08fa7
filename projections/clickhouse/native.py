"""The server engine: clickhouse-driver over the native protocol (`clickhouse://`), and Native blocks.

Only clickhouse-driver's public API is used here (Client, its execute, errors);
its private API (Native blocks, the INSERT data packet) is in driver_internals."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlparse

from projections.clickhouse.driver_internals import insert_block, native, server_timezone, takes_blocks
from projections.clickhouse.store import (
    AnalyticsStoreError,
    Block,
    check_block,
    collector_paused,
    insert_target,
    normalise,
    render,
    server_message,
    snippet,
    transpose,
    typed_columns,
)

# Every session with a cluster (a URL with `?cluster=NAME`, schema.py's second shape) reads and
# writes through Distributed tables with these, so that what was acknowledged is what every
# later read sees, whichever replica answers it (checked on 18.16 through clickhouse-driver):
CLUSTER_SETTINGS = {
    # an INSERT into a Distributed table returns once the shards have the rows, not once queued
    "insert_distributed_sync": 1,
    # ... once both replicas of the shard have them: a read served by either sees them. The cost:
    # a shard with a replica down takes no writes (they wait, then fail and are retried) until it is back
    "insert_quorum": 2,
    "insert_quorum_timeout": 30_000,
    # a replica that lacks a part written with a quorum (one restarted, catching up) refuses to
    # answer rather than answer without it
    "select_sequential_consistency": 1,
    # `x IN (SELECT … FROM voids)` inside a query over a Distributed table: the subquery runs once and
    # its result goes to every shard (GLOBAL IN); 18.16 refuses the double-distributed query otherwise
    "distributed_product_mode": "global",
}


def _is_server_side(exc: Exception) -> bool:
    from clickhouse_driver import errors  # imported where used: ~0.15 s (driver_internals says why)

    return isinstance(exc, (errors.ServerException, errors.NetworkError, errors.SocketTimeoutError, OSError, EOFError))


class NativeStore:
    """clickhouse-driver over the native protocol; one connection, used by one thread at a time.

    Compression is off: on loopback it costs CPU and saves nothing, and the
    driver needs the clickhouse-cityhash package for it. A remote deployment can
    add that package and `?compression=lz4` to the URL. For parallel queries,
    open one store per thread.
    """

    engine = "clickhouse"

    def __init__(self, url: str, password: str | None = None):
        """password: for the URL's user, kept out of the URL (which error messages and `nhdp status` show)."""
        from clickhouse_driver import Client

        self.url = url
        self.password = password
        parsed = urlparse(url)
        self.database = parsed.path.strip("/") or "default"
        query = parse_qs(parsed.query)
        # The cluster whose Distributed tables this database holds (schema.py); not a driver setting.
        self.cluster = query.pop("cluster", [None])[0]
        self._lock = threading.Lock()
        try:
            self._client = Client.from_url(
                _with_password(parsed._replace(query=urlencode(query, doseq=True)).geturl(), password)
            )
        except Exception as exc:  # e.g. compression asked for without clickhouse-cityhash
            raise AnalyticsStoreError(f"cannot use analytics URL {url}: {exc}", engine=self.engine) from exc
        if self.cluster:
            self._client.settings.update(CLUSTER_SETTINGS)
        self.execute("SELECT 1")  # fail here, with the reason, rather than at first use

    def _error(self, exc: Exception, sql: str) -> AnalyticsStoreError:
        from clickhouse_driver import errors

        message, code = server_message(exc)
        if isinstance(exc, (errors.NetworkError, errors.SocketTimeoutError, OSError, EOFError)):
            return AnalyticsStoreError(
                f"cannot reach ClickHouse at {self.url}: {message}", code=code, engine=self.engine, retryable=True
            )
        return AnalyticsStoreError(f"ClickHouse: {message}\n  query: {snippet(sql)}", code=code, engine=self.engine)

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        text = render(sql, params)
        with self._lock:
            try:
                rows, columns = self._client.execute(text, with_column_types=True)
            except Exception as exc:
                raise self._error(exc, text) from exc
            server_tz = server_timezone(self._client)
        return normalise(rows, [t for _, t in columns], server_tz)

    def column_types(self, table: str, columns: Sequence[str]) -> list[tuple[str, str]] | None:
        """[(column, its type)] for encode_block, or None if this connection cannot take blocks as they are."""
        self.execute("SELECT 1")  # connected, so the protocol revision is known
        if not takes_blocks(self._client):
            return None
        qtable, _ = insert_target(table, columns)
        types = {r[0]: r[1] for r in self.execute(f"DESCRIBE TABLE {qtable}")}
        return typed_columns(types, table, columns, self.engine, "ClickHouse")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence] | Block) -> int:
        if not rows:
            return 0
        qtable, qcolumns = insert_target(table, columns)
        sql = f"INSERT INTO {qtable} ({qcolumns}) VALUES"
        if isinstance(rows, Block):
            check_block(rows, table, columns, self.engine, "ClickHouse")
            try:
                with self._lock:
                    # as the INSERT's data packet; False if this connection cannot take it (then it goes as rows)
                    done = insert_block(self._client, sql, rows.data)
            except Exception as exc:
                raise self._error(exc, sql) from exc
            if done:
                return rows.rows
            rows = native().decode(rows.data)[1]
        try:
            with self._lock, collector_paused():
                data = transpose(columns, rows)
                return int(self._client.execute(sql, data, columnar=True, types_check=False))
        except AnalyticsStoreError:
            raise
        except Exception as exc:
            error = self._error(exc, sql)
            if not _is_server_side(exc):
                error = self._explain_bad_rows(table, qtable, columns, rows) or error
            raise error from exc

    def _explain_bad_rows(self, table: str, qtable: str, columns: Sequence[str], rows) -> AnalyticsStoreError | None:
        """The driver failed to encode the rows; say which column, as the chDB engine does."""
        try:
            types = {r[0]: r[1] for r in self.execute(f"DESCRIBE TABLE {qtable}")}
            why = native().explain([(c, types[c.strip("`")]) for c in columns], rows)
        except Exception:
            return None
        return AnalyticsStoreError(f"ClickHouse: rows for {table} do not fit: {why}", engine=self.engine)

    def close(self) -> None:
        with self._lock:
            self._client.disconnect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<NativeStore {self.url}>"


def encode_block(
    columns_with_types: Sequence[tuple[str, str]],
    rows: Sequence[Sequence],
    *,
    what: str = "rows",
    engine: str | None = None,
) -> Block:
    """rows → a Block; AnalyticsStoreError naming the column whose values don't fit its type."""
    columns = [c for c, _ in columns_with_types]
    try:
        with collector_paused():
            data = native().encode(list(columns_with_types), transpose(columns, rows))
    except AnalyticsStoreError:
        raise
    except Exception:
        why = native().explain(list(columns_with_types), rows)
        raise AnalyticsStoreError(f"{what} do not fit: {why}", engine=engine) from None
    return Block(columns, data, len(rows))


def _with_password(url: str, password: str | None) -> str:
    """The URL the driver parses (it unquotes the password); only it ever sees this one."""
    if password is None:
        return url
    parsed = urlparse(url)
    user = parsed.username or "default"
    return parsed._replace(
        netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{parsed.hostname}:{parsed.port or 9000}"
    ).geturl()

"""The server engine: clickhouse-driver over the native protocol (`clickhouse://`), and Native blocks."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from projections.clickhouse.store import (
    AnalyticsStoreError,
    Block,
    _check_block,
    _insert_target,
    _normalise,
    _server_message,
    _snippet,
    _transpose,
    _typed,
    collector_paused,
    render,
)


def _is_server_side(exc: Exception) -> bool:
    from clickhouse_driver import errors

    return isinstance(exc, (errors.ServerException, errors.NetworkError, errors.SocketTimeoutError, OSError, EOFError))


class NativeStore:
    """clickhouse-driver over the native protocol; one connection, used by one thread at a time.

    Compression is off: on loopback it costs CPU and saves nothing, and the
    driver needs the clickhouse-cityhash package for it. A remote deployment can
    add that package and `?compression=lz4` to the URL. For parallel queries,
    open one store per thread.
    """

    engine = "clickhouse"

    def __init__(self, url: str):
        from clickhouse_driver import Client

        self.url = url
        self.database = urlparse(url).path.strip("/") or "default"
        self._lock = threading.Lock()
        try:
            self._client = Client.from_url(url)
        except Exception as exc:  # e.g. compression asked for without clickhouse-cityhash
            raise AnalyticsStoreError(f"cannot use analytics URL {url}: {exc}", engine=self.engine) from exc
        self.execute("SELECT 1")  # fail here, with the reason, rather than at first use

    def _error(self, exc: Exception, sql: str) -> AnalyticsStoreError:
        from clickhouse_driver import errors

        message, code = _server_message(exc)
        if isinstance(exc, (errors.NetworkError, errors.SocketTimeoutError, OSError, EOFError)):
            return AnalyticsStoreError(
                f"cannot reach ClickHouse at {self.url}: {message}", code=code, engine=self.engine, retryable=True
            )
        return AnalyticsStoreError(f"ClickHouse: {message}\n  query: {_snippet(sql)}", code=code, engine=self.engine)

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        text = render(sql, params)
        with self._lock:
            try:
                rows, columns = self._client.execute(text, with_column_types=True)
            except Exception as exc:
                raise self._error(exc, text) from exc
            server_tz = self._client.connection.server_info.get_timezone()
        return _normalise(rows, [t for _, t in columns], server_tz)

    def column_types(self, table: str, columns: Sequence[str]) -> list[tuple[str, str]] | None:
        """[(column, its type)] for encode_block, or None if this connection cannot take blocks as they are."""
        self.execute("SELECT 1")  # connected, so the protocol revision is known
        if not self._takes_blocks():
            return None
        qtable, _ = _insert_target(table, columns)
        types = {r[0]: r[1] for r in self.execute(f"DESCRIBE TABLE {qtable}")}
        return _typed(types, table, columns, self.engine, "ClickHouse")

    def _takes_blocks(self) -> bool:
        """A block is laid out as this connection's data packets are: no compressed frames, and no
        serialization flag per column (a protocol revision before 54454, as 18.16's)."""
        from clickhouse_driver import defines

        conn = self._client.connection
        revision = conn.server_info.used_revision
        return not conn.compression and revision < defines.DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION

    def _insert_block(self, sql: str, block: Block) -> int | None:
        """Send a block's bytes as the INSERT's data packet, as Client.process_insert_query sends the
        driver's own blocks; None if this connection cannot take it (then it goes as rows)."""
        from clickhouse_driver import defines
        from clickhouse_driver.block import BlockInfo, ColumnOrientedBlock
        from clickhouse_driver.protocol import ClientPacketTypes
        from clickhouse_driver.varint import write_varint
        from clickhouse_driver.writer import write_binary_str

        client = self._client
        with client.disconnect_on_error(sql, None):
            if not self._takes_blocks():
                return None
            conn = client.connection
            revision = conn.server_info.used_revision
            conn.send_query(sql)
            conn.send_external_tables(None)
            client.receive_sample_block()
            write_varint(ClientPacketTypes.DATA, conn.fout)
            if revision >= defines.DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES:
                write_binary_str("", conn.fout)
            if revision >= defines.DBMS_MIN_REVISION_WITH_BLOCK_INFO:
                BlockInfo().write(conn.fout)
            conn.fout.write(block.data)
            client.receive_profile_events()
            conn.send_data(ColumnOrientedBlock())  # the empty block that ends the data
            client.receive_profile_events()
            client.receive_end_of_insert_query()
        return block.rows

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence] | Block) -> int:
        if not rows:
            return 0
        qtable, qcolumns = _insert_target(table, columns)
        sql = f"INSERT INTO {qtable} ({qcolumns}) VALUES"
        if isinstance(rows, Block):
            _check_block(rows, table, columns, self.engine, "ClickHouse")
            try:
                with self._lock:
                    done = self._insert_block(sql, rows)
            except Exception as exc:
                raise self._error(exc, sql) from exc
            if done is not None:
                return done
            rows = _native().decode(rows.data)[1]
        try:
            with self._lock, collector_paused():
                data = _transpose(columns, rows)
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
            why = _native().explain([(c, types[c.strip("`")]) for c in columns], rows)
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


class _NativeFormat:
    """ClickHouse's Native format as files and chDB see it: no block info, no per-column
    serialization flags (that is revision 0 of the protocol's block layout)."""

    def __init__(self):
        from clickhouse_driver import Client
        from clickhouse_driver.connection import ServerInfo
        from clickhouse_driver.context import Context

        self.context = Context()
        # timezone "UTC": chDB's Native output carries no zone, and its sessions run in UTC.
        self.context.server_info = ServerInfo("chDB", 26, 0, 0, 0, "UTC", "chdb", 0)
        self.context.client_settings = Client(host="localhost").client_settings  # the driver's defaults; no connection
        self.context.settings = {}

    def encode(self, columns_with_types: list[tuple[str, str]], data: list[list], types_check: bool = False) -> bytes:
        from clickhouse_driver.block import ColumnOrientedBlock
        from clickhouse_driver.bufferedwriter import BufferedSocketWriter
        from clickhouse_driver.streams.native import BlockOutputStream

        sink = _ByteSink()
        writer = BufferedSocketWriter(sink, 1 << 20)
        block = ColumnOrientedBlock(columns_with_types, data, types_check=types_check)
        BlockOutputStream(writer, self.context).write(block)
        return bytes(sink.data)

    def explain(self, columns_with_types: list[tuple[str, str]], rows: Sequence[Sequence]) -> str:
        """Which column's values don't fit its type (the fast path checks nothing)."""
        for i, (name, type_) in enumerate(columns_with_types):
            try:
                self.encode([(name, type_)], [[row[i] for row in rows]], types_check=True)
            except Exception as exc:
                return f"column {name} ({type_}): {exc}"
        return "no single column is at fault"

    def decode(self, data) -> tuple[list[str], list[tuple]]:
        """(column types, rows) of a Native stream of zero or more blocks."""
        from clickhouse_driver.bufferedreader import BufferedSocketReader
        from clickhouse_driver.streams.native import BlockInputStream

        source = _ByteSource(data)
        reader = BufferedSocketReader(source, 1 << 20)
        stream = BlockInputStream(reader, self.context)
        types: list[str] = []
        rows: list[tuple] = []
        while not source.exhausted or reader.position < reader.current_buffer_size:
            block = stream.read()
            types = [t for _, t in block.columns_with_types]
            rows.extend(block.get_rows())
        return types, rows


class _ByteSink:
    """Stands in for the socket of the driver's buffered writer."""

    def __init__(self):
        self.data = bytearray()

    def sendall(self, chunk) -> None:
        self.data += chunk


class _ByteSource:
    """Stands in for the socket of the driver's buffered reader."""

    def __init__(self, data):
        self.view = memoryview(data)
        self.offset = 0

    @property
    def exhausted(self) -> bool:
        return self.offset >= len(self.view)

    def recv_into(self, buffer) -> int:
        n = min(len(buffer), len(self.view) - self.offset)
        buffer[:n] = self.view[self.offset : self.offset + n]
        self.offset += n
        return n


_native_format: _NativeFormat | None = None


def _native() -> _NativeFormat:
    global _native_format
    if _native_format is None:
        _native_format = _NativeFormat()
    return _native_format


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
            data = _native().encode(list(columns_with_types), _transpose(columns, rows))
    except AnalyticsStoreError:
        raise
    except Exception:
        why = _native().explain(list(columns_with_types), rows)
        raise AnalyticsStoreError(f"{what} do not fit: {why}", engine=engine) from None
    return Block(columns, data, len(rows))

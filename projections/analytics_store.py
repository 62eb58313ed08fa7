"""One small interface to ClickHouse, over a server or embedded chDB.

    store = open_store(settings.analytics_url())
    store.insert("dose_facts", ["event_id", "occurred_at", ...], rows)
    store.execute("SELECT province_code, count() FROM dose_facts FINAL "
                  "WHERE occurred_at < %(as_of)s GROUP BY province_code", {"as_of": t})

Engines
-------
`clickhouse://[user[:password]@]host:port/db` is a NativeStore: clickhouse-driver
over the native protocol. `chdb:///abs/path[?database=db]` is a ChdbStore: chDB
(ClickHouse 26.x in-process) with its data in that folder.

Both engines go through clickhouse-driver's own Native-format column code: the
server speaks it on the wire, and chDB is handed and asked for the same Native
blocks. So a Python value is encoded, and a result decoded, by the same code on
both engines and comes back as the same type: UInt/Int → int, String → str,
Date → date, UUID → uuid.UUID, Array → list, Tuple → tuple, Nullable → None,
Decimal → Decimal, Enum → str. One rule is ours: every DateTime comes back as
an aware datetime in UTC, because chDB drops the time zone from DateTime types
in Native output while the server keeps it. On insert, a DateTime column takes
an aware datetime, a naive one meaning UTC if the column is DateTime('UTC'), or
int epoch seconds, which skips a time-zone conversion per value and is the
fastest (bench/bench_analytics_store.py). An insert is one block, so
one part per partition it touches: keep batches to 10k-100k rows.

Parameters are substituted here, on the client, the same way for both engines
(ClickHouse 18.16 has no server-side parameters): write `%(name)s` and pass a
dict; with parameters a literal percent sign is `%%`. See quote() for how each
Python type is written.

The SQL both engines accept (DESIGN §6: Debian's 18.16 and chDB 26.x)
-------------------------------------------------------------------
Works on both: MergeTree and ReplacingMergeTree(ver) with PARTITION BY/ORDER BY,
FINAL, SYSTEM STOP/START MERGES, argMin/argMax (also over a tuple, e.g.
argMin(province_code, (occurred_at, event_id))), uniqExact, countIf/sumIf,
toDate(t, 'Asia/Ho_Chi_Minh'), toStartOfDay(t, tz), arrays (has, length,
ARRAY JOIN), Nullable, UUID, Decimal, tuples, `IN (…)` with a tuple, LIMIT n BY,
HAVING, subqueries.

Avoid, because 18.16 rejects it: LowCardinality columns (experimental there),
DateTime64, Map, Bool and the true/false literals (use UInt8 and 1/0),
FILTER (WHERE …) (use countIf), WITH FILL, window functions, TTL, column
CODECs, `IN [list]` (use a tuple), `IN ()` (quote() writes an empty sequence as
`(NULL)`, which matches nothing on both), `has([], x)` on an untyped empty array.

Avoid, because the engines silently differ:
* GROUP BY/ORDER BY a position (`ORDER BY 1`): 26.x reads the first column,
  18.16 the constant 1, leaving rows unsorted.
* WITH TOTALS: the driver appends the totals row, chDB's Native output drops it.
* `SELECT *` over a JOIN: 18.16 also returns the right-hand key.
* Counting raw rows of a ReplacingMergeTree: duplicates sit in unmerged parts
  on both, but 26.x (optimize_on_insert) collapses those within one insert and
  18.16 keeps them. Count through FINAL, or GROUP BY the key with argMax.
* Date functions without a time zone: plain DateTime columns follow the
  session's zone (UTC here and in the local server, maybe not in production).
  Pass the zone, and declare columns DateTime('UTC').
Also, on both: an alias that reuses a column's name (`sum(x) AS x`) replaces
that column everywhere in the query, WHERE included.

Ownership of a chDB folder
--------------------------
chDB is ClickHouse inside the Python process, and a data folder can be open in
one process only: a second gets chDB's own "Cannot lock file …/status" error.
It also opens one folder per process: another folder is refused while one is
open, though several sessions on the same folder are fine. So the rule is:

* In the local stack without a clickhouse-server, the one process that runs the
  ClickHouse sink owns the chDB folder. It writes the facts and also answers
  the analytics queries; every other process (the API, a replay, a test) asks
  that process over HTTP and never opens the folder itself.
* open_store() takes an exclusive, non-blocking flock on
  `<path>/.nhdp-owner.lock` and writes the owner's pid and purpose into it. A
  second process gets an AnalyticsStoreError naming the folder and the owner's
  pid and purpose, at once and before chDB is touched. The kernel drops the
  lock when the owner exits, so a crash leaves nothing stale to clean up.
* Within the owning process, each ChdbStore has its own chDB session (they run
  concurrently) and they share the one lock; it is released when the last
  store on the folder is closed. Opening a different folder while one is open
  raises AnalyticsStoreError. A test module that opens chDB in-process should
  close it at the module's end, so the next module may open its own folder.
* A child forked after the store was opened inherits the lock (and a broken
  copy of chDB): start worker processes first, then open the store.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlparse
from uuid import UUID
from zoneinfo import ZoneInfo

UTC = UTC
OWNER_LOCK = ".nhdp-owner.lock"

__all__ = [
    "AnalyticsStore",
    "AnalyticsStoreError",
    "ChdbStore",
    "NativeStore",
    "OWNER_LOCK",
    "open_store",
    "quote",
    "render",
]


class AnalyticsStoreError(RuntimeError):
    """A ClickHouse failure: unreachable, bad SQL, bad rows, or a chDB folder owned elsewhere.

    `code` is ClickHouse's error code when there is one. `retryable` is True when
    the same call may succeed later (the server was unreachable), so a sink backs
    off and retries instead of dead-lettering the batch.
    """

    def __init__(self, message: str, *, code: int | None = None, engine: str | None = None, retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.engine = engine
        self.retryable = retryable


@runtime_checkable
class AnalyticsStore(Protocol):
    engine: str  # "clickhouse" | "chdb"

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run one statement; a SELECT's rows as tuples, [] for anything else."""

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence] | Block) -> int:
        """Insert rows (one value per column, in order), or a Block of them, in one block; returns the row count."""

    def close(self) -> None: ...


def open_store(url: str, *, purpose: str | None = None) -> AnalyticsStore:
    """`clickhouse://host:port/db` → NativeStore; `chdb:///abs/path[?database=db]` → ChdbStore.

    `purpose` is written into a chDB folder's owner lock so that a refused
    process is told who holds it (default: this program's command line).
    """
    scheme = urlparse(url).scheme
    if scheme in ("clickhouse", "clickhouses"):
        return NativeStore(url)
    if scheme == "chdb":
        return ChdbStore(url, purpose=purpose)
    raise AnalyticsStoreError(
        f"unsupported analytics URL {url!r}: expected clickhouse://host:port/db or chdb:///abs/path"
    )


# -- parameters ----------------------------------------------------------------

_STRING_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "'": "\\'",
        "\b": "\\b",
        "\f": "\\f",
        "\r": "\\r",
        "\n": "\\n",
        "\t": "\\t",
        "\0": "\\0",
        "\a": "\\a",
        "\v": "\\v",
    }
)


def quote(value: Any) -> str:
    """A Python value as a ClickHouse literal that 18.16 and 26.x read alike.

    None → NULL; bool → 1/0 (18.16 has no true/false); str → '…' escaped;
    date → toDate('…'); datetime → toDateTime('…', 'UTC') (a naive one is taken
    as UTC; sub-second digits are dropped, DateTime has whole seconds);
    UUID → '…' (compares with UUID and String columns); list → […];
    tuple/set/frozenset → (…), for IN; an empty one → (NULL), which matches
    nothing, because 18.16 cannot parse `IN ()`.
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Enum):
        return quote(value.value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise AnalyticsStoreError(f"cannot write {value!r} as a ClickHouse literal")
        return str(value)
    if isinstance(value, str):
        return "'" + value.translate(_STRING_ESCAPES) + "'"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return f"toDateTime('{value:%Y-%m-%d %H:%M:%S}', 'UTC')"
    if isinstance(value, date):
        return f"toDate('{value.isoformat()}')"
    if isinstance(value, UUID):
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ", ".join(quote(v) for v in value) + "]"
    if isinstance(value, (tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return "(" + (", ".join(quote(v) for v in items) or "NULL") + ")"
    raise AnalyticsStoreError(f"cannot write a {type(value).__name__} as a ClickHouse literal: {value!r}")


def render(sql: str, params: Mapping[str, Any] | None = None) -> str:
    """The statement with each `%(name)s` replaced by quote(params[name]).

    Without params the SQL is returned untouched (no `%%` needed).
    """
    if params is None:
        return sql
    if not isinstance(params, Mapping):
        raise AnalyticsStoreError("query parameters must be a dict used as %(name)s")
    try:
        return sql % {name: quote(value) for name, value in params.items()}
    except KeyError as exc:
        raise AnalyticsStoreError(f"the query uses %({exc.args[0]})s but no such parameter was given") from None
    except (TypeError, ValueError) as exc:
        raise AnalyticsStoreError(
            f"cannot substitute parameters ({exc}): use %(name)s placeholders, and %% for a literal percent sign"
        ) from None


# -- shared helpers ------------------------------------------------------------------

_NAME = r"(?:[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)"
_TABLE = re.compile(rf"^{_NAME}(?:\.{_NAME})?$")
_COLUMN = re.compile(rf"^{_NAME}$")


def _quote_name(name: str) -> str:
    return name if name.startswith("`") else f"`{name}`"


def _insert_target(table: str, columns: Sequence[str]) -> tuple[str, str]:
    if not _TABLE.match(table):
        raise AnalyticsStoreError(f"invalid table name {table!r}")
    bad = [c for c in columns if not _COLUMN.match(c)]
    if bad or not columns:
        raise AnalyticsStoreError(f"invalid column list for {table}: {list(columns)!r}")
    qtable = ".".join(_quote_name(p) for p in re.findall(_NAME, table))
    return qtable, ", ".join(_quote_name(c) for c in columns)


@contextmanager
def collector_paused():
    """Bulk encoding allocates millions of objects, which sets off full collections
    that find nothing to free; pausing the collector doubles the insert rate."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _transpose(columns: Sequence[str], rows: Sequence[Sequence]) -> list[list]:
    """Rows → one fresh list per column (the driver's encoders rewrite them in place)."""
    width = len(columns)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise AnalyticsStoreError(f"row {i} has {len(row)} values for {width} columns {list(columns)!r}")
    return [list(map(itemgetter(i), rows)) for i in range(width)]


class Block:
    """Rows already encoded as one Native block, in the layout chDB reads (see _NativeFormat).

    The sink's decoder processes encode the rows only they produce (events,
    event_index, voids) so that the sink process, whose one thread plans
    every batch, neither unpickles nor encodes them. Any store's insert takes
    one in place of rows."""

    __slots__ = ("columns", "data", "rows")

    def __init__(self, columns: Sequence[str], data: bytes, rows: int):
        self.columns, self.data, self.rows = tuple(columns), data, rows

    def __len__(self) -> int:
        return self.rows

    def __reduce__(self):
        return Block, (self.columns, self.data, self.rows)


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


def _typed(
    types: Mapping[str, str], table: str, columns: Sequence[str], engine: str, label: str
) -> list[tuple[str, str]]:
    """[(column, its type)] from a table's DESCRIBE; AnalyticsStoreError naming the columns it lacks."""
    missing = [c for c in columns if c.strip("`") not in types]
    if missing:
        raise AnalyticsStoreError(f"{label}: table {table} has no column(s) {missing}", engine=engine)
    return [(c, types[c.strip("`")]) for c in columns]


def _check_block(block: Block, table: str, columns: Sequence[str], engine: str, label: str) -> None:
    if tuple(columns) != block.columns:
        raise AnalyticsStoreError(
            f"{label}: a block of columns {list(block.columns)} given for {table} {list(columns)}", engine=engine
        )


_CODE = re.compile(r"Code: (\d+)")


def _server_message(exc: BaseException) -> tuple[str, int | None]:
    """The server's own words, without the 18.16 stack trace."""
    text = getattr(exc, "message", None) or str(exc)
    text = text.split("Stack trace:", 1)[0].strip()
    code = getattr(exc, "code", None)
    if code is None:
        m = _CODE.search(str(exc))
        code = int(m.group(1)) if m else None
    return text, code


def _snippet(sql: str) -> str:
    one_line = " ".join(sql.split())
    return one_line if len(one_line) <= 300 else one_line[:300] + " …"


def _datetime_fixer(server_tz: str | None):
    """Make every DateTime an aware UTC datetime, whichever way the driver decoded it."""
    local = ZoneInfo(server_tz) if server_tz else None

    def fix(value):
        if isinstance(value, datetime):
            if value.tzinfo is None:
                # Naive: the driver's wall clock in the server's zone (chDB: UTC).
                return value.replace(tzinfo=local).astimezone(UTC) if local else value.replace(tzinfo=UTC)
            return value.astimezone(UTC)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, tuple):
            return tuple(fix(v) for v in value)
        return value

    return fix


def _normalise(rows: list, types: Sequence[str], server_tz: str | None) -> list[tuple]:
    targets = [i for i, t in enumerate(types) if "DateTime" in t]
    if not targets or not rows:
        return rows if isinstance(rows, list) else list(rows)
    fix = _datetime_fixer(server_tz)
    out = []
    for row in rows:
        row = list(row)
        for i in targets:
            row[i] = fix(row[i])
        out.append(tuple(row))
    return out


# -- NativeStore: a ClickHouse server over the native protocol -------------------------


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


# -- chDB: Native blocks in and out, through clickhouse-driver's column code -------------


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


class _Owner:
    """This process's hold on one chDB folder: the flock'ed owner file and who uses it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.users = 0


_owners: dict[Path, _Owner] = {}
_owners_lock = threading.Lock()


def _default_purpose() -> str:
    return " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200] or "python"


def _acquire(path: Path, purpose: str | None) -> _Owner:
    with _owners_lock:
        owner = _owners.get(path)
        if owner is not None:
            owner.users += 1
            return owner
        if _owners:
            other = next(iter(_owners))
            raise AnalyticsStoreError(
                f"chDB can open one data folder per process and {other} is already open here; "
                f"close its stores before opening {path}",
                engine="chdb",
            )
        path.mkdir(parents=True, exist_ok=True)
        lock_path = path / OWNER_LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AnalyticsStoreError(
                f"the chDB folder {path} is owned by pid {holder.get('pid', '?')} "
                f"({holder.get('purpose', 'purpose unknown')}, since {holder.get('since', '?')}); "
                "only that process may open it: ask it over HTTP, or stop it first",
                engine="chdb",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {
            "pid": os.getpid(),
            "purpose": purpose or _default_purpose(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        owner = _Owner(path, fd)
        owner.users = 1
        _owners[path] = owner
        return owner


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _release(owner: _Owner) -> None:
    with _owners_lock:
        owner.users -= 1
        if owner.users > 0:
            return
        _owners.pop(owner.path, None)
        try:
            os.ftruncate(owner.fd, 0)
        finally:
            os.close(owner.fd)  # drops the flock


_READ_ONLY = re.compile(
    r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*|\(\s*)*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.I | re.S
)


class ChdbStore:
    """chDB with its data in a folder this process owns (see the module docstring)."""

    engine = "chdb"

    def __init__(self, url: str, *, purpose: str | None = None):
        parsed = urlparse(url)
        if parsed.netloc or not parsed.path.startswith("/"):
            raise AnalyticsStoreError(f"chDB URL {url!r} must name an absolute folder: chdb:///abs/path[?database=db]")
        options = parse_qs(parsed.query)
        self.url = url
        self.path = Path(parsed.path).resolve()
        self.database = options.get("database", ["default"])[0]
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.database):
            raise AnalyticsStoreError(f"invalid database name {self.database!r} in {url}")
        self._lock = threading.Lock()
        self._types: dict[str, dict[str, str]] = {}
        self._session = None
        self._owner = _acquire(self.path, purpose)
        try:
            from chdb import session

            # Own session per store: chDB runs sessions on one folder concurrently.
            # UTC so that text dates and plain DateTime columns read as on the local server.
            self._session = session.Session(f"{self.path}?session_timezone=UTC")
            if self.database != "default":
                self.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
                self.execute(f"USE `{self.database}`")
        except BaseException as exc:
            self.close()
            if isinstance(exc, AnalyticsStoreError):
                raise
            raise AnalyticsStoreError(f"cannot open chDB at {self.path}: {exc}", engine=self.engine) from exc

    def _error(self, exc: Exception, sql: str) -> AnalyticsStoreError:
        message, code = _server_message(exc)
        return AnalyticsStoreError(f"chDB: {message}\n  query: {_snippet(sql)}", code=code, engine=self.engine)

    def _session_or_fail(self):
        if self._session is None:
            raise AnalyticsStoreError(f"the chDB store at {self.path} is closed", engine=self.engine)
        return self._session

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        text = render(sql, params)
        with self._lock:
            session = self._session_or_fail()
            try:
                data = session.query(text, "Native").bytes()
            except Exception as exc:
                raise self._error(exc, text) from exc
            if not _READ_ONLY.match(text):
                self._types.clear()  # DDL may have changed a table we cached
        if not data:
            return []
        types, rows = _native().decode(data)
        return _normalise(rows, types, None)

    def column_types(self, table: str, columns: Sequence[str]) -> list[tuple[str, str]]:
        """[(column, its type)] of a table: what encode_block needs to make blocks for it."""
        qtable, _ = _insert_target(table, columns)
        types = self._types.get(table)
        if types is None:
            rows = self.execute(f"DESCRIBE TABLE {qtable}")
            types = self._types[table] = {row[0]: row[1] for row in rows}
        return _typed(types, table, columns, self.engine, "chDB")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence] | Block) -> int:
        if not rows:
            return 0
        qtable, qcolumns = _insert_target(table, columns)
        if isinstance(rows, Block):
            _check_block(rows, table, columns, self.engine, "chDB")
            block = rows.data
        else:
            block = encode_block(
                self.column_types(table, columns), rows, what=f"chDB: rows for {table}", engine=self.engine
            ).data
        sql = f"INSERT INTO {qtable} ({qcolumns})"
        with self._lock:
            session = self._session_or_fail()
            inserter = None
            try:
                inserter = session.send_insert(sql, "Native")
                inserter.append(block)
                inserter.finish()
            except Exception as exc:
                if inserter is not None:
                    try:
                        inserter.cancel()  # no-op once finished; frees the session otherwise
                    except Exception:
                        pass
                raise self._error(exc, sql) from exc
        return len(rows)

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            owner, self._owner = getattr(self, "_owner", None), None
        if session is not None:
            session.close()
        if owner is not None:
            _release(owner)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # A store dropped without close() must not keep the folder owned for the process's life.
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"<ChdbStore {self.path} database={self.database}>"

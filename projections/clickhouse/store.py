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

import gc
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from operator import itemgetter
from typing import Any, Protocol, runtime_checkable
from uuid import UUID
from zoneinfo import ZoneInfo

OWNER_LOCK = ".nhdp-owner.lock"


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


_NAME = r"(?:[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)"


_TABLE = re.compile(rf"^{_NAME}(?:\.{_NAME})?$")


_COLUMN = re.compile(rf"^{_NAME}$")


def _quote_name(name: str) -> str:
    return name if name.startswith("`") else f"`{name}`"


def insert_target(table: str, columns: Sequence[str]) -> tuple[str, str]:
    if not _TABLE.match(table):
        raise AnalyticsStoreError(f"invalid table name {table!r}")
    bad = [c for c in columns if not _COLUMN.match(c)]
    if bad or not columns:
        raise AnalyticsStoreError(f"invalid column list for {table}: {list(columns)!r}")
    qtable = ".".join(_quote_name(p) for p in re.findall(_NAME, table))
    return qtable, ", ".join(_quote_name(c) for c in columns)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Bulk encoding allocates millions of objects, which sets off full collections
    that find nothing to free; pausing the collector doubles the insert rate."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def transpose(columns: Sequence[str], rows: Sequence[Sequence]) -> list[list]:
    """Rows → one fresh list per column (the driver's encoders rewrite them in place)."""
    width = len(columns)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise AnalyticsStoreError(f"row {i} has {len(row)} values for {width} columns {list(columns)!r}")
    return [list(map(itemgetter(i), rows)) for i in range(width)]


class Block:
    """Rows already encoded as one Native block, in the layout chDB reads (see driver_internals.NativeFormat).

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


def typed_columns(
    types: Mapping[str, str], table: str, columns: Sequence[str], engine: str, label: str
) -> list[tuple[str, str]]:
    """[(column, its type)] from a table's DESCRIBE; AnalyticsStoreError naming the columns it lacks."""
    missing = [c for c in columns if c.strip("`") not in types]
    if missing:
        raise AnalyticsStoreError(f"{label}: table {table} has no column(s) {missing}", engine=engine)
    return [(c, types[c.strip("`")]) for c in columns]


def check_block(block: Block, table: str, columns: Sequence[str], engine: str, label: str) -> None:
    if tuple(columns) != block.columns:
        raise AnalyticsStoreError(
            f"{label}: a block of columns {list(block.columns)} given for {table} {list(columns)}", engine=engine
        )


_CODE = re.compile(r"Code: (\d+)")


def server_message(exc: BaseException) -> tuple[str, int | None]:
    """The server's own words, without the 18.16 stack trace."""
    text = getattr(exc, "message", None) or str(exc)
    text = text.split("Stack trace:", 1)[0].strip()
    code = getattr(exc, "code", None)
    if code is None:
        m = _CODE.search(str(exc))
        code = int(m.group(1)) if m else None
    return text, code


def snippet(sql: str) -> str:
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


def normalise(rows: list, types: Sequence[str], server_tz: str | None) -> list[tuple]:
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


IN_CHUNK = 1000  # ids per IN list: 18.16 refuses queries over 256 KiB


def chunks(items: Sequence, size: int = IN_CHUNK) -> Iterable[tuple]:
    for i in range(0, len(items), size):
        yield tuple(items[i : i + size])

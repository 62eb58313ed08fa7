"""clickhouse-driver's private API, in one place: Native blocks without a server, and an INSERT of one.

ClickHouse's Native format is what chDB reads and writes and what the server's
INSERT data packets carry. clickhouse-driver has the column encoders and
decoders for it, but only behind its connection; so this module uses:

- `clickhouse_driver.streams.native.BlockOutputStream` / `BlockInputStream`
  with the driver's `BufferedSocketWriter` / `BufferedSocketReader` over fake
  sockets (`_ByteSink`, `_ByteSource`), and a `Context` with a made-up
  `connection.ServerInfo` of revision 0: the Native format as files and chDB see
  it, no block info and no per-column serialization flags (`NativeFormat`).
  Timezone "UTC": chDB's Native output carries no zone, and its sessions run in
  UTC. `Client(...).client_settings` gives the driver's default settings
  without connecting;
- the client's connection internals (`Client.connection`, its `server_info`,
  `compression`, `fout`, `send_query`, `send_external_tables`, `send_data`,
  and the client's `disconnect_on_error`, `receive_sample_block`,
  `receive_profile_events`, `receive_end_of_insert_query`), and the protocol's
  writers (`protocol.ClientPacketTypes`, `varint.write_varint`,
  `writer.write_binary_str`, `block.BlockInfo`, `defines`): `insert_block`
  sends an already-encoded block as an INSERT's data packet, as
  `Client.process_insert_query` sends the driver's own blocks, so the sink's
  decoder processes encode the rows and the sink's one thread only copies bytes.
  That works only when the block is laid out as this connection's data
  packets are: no compressed frames, and no serialization flag per column (a
  protocol revision before 54454, as 18.16's) - `takes_blocks` says so.

clickhouse_driver is imported inside the functions, as the stores always did:
it takes ~0.15 s to import, which importing the stores (projections.clickhouse.connect)
need not pay.

Every one of these is checked against the clickhouse-driver version pinned in
pyproject.toml (import fails on any other): tests/unit/test_third_party.py
compares our INSERT packet with the driver's own bytes and round-trips a Native
block, without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

from infra.tools import require_pinned

PINNED = "0.2.11"


def check_version(installed: str) -> None:
    require_pinned("clickhouse-driver", PINNED, __name__, installed)


check_version(version("clickhouse-driver"))


def server_timezone(client: Any) -> str:
    """The timezone the server (or this session) gives DateTime values without one."""
    return client.connection.server_info.get_timezone()


def takes_blocks(client: Any) -> bool:
    """Whether a Native block (NativeFormat.encode) is laid out as this connection's data packets
    are: no compressed frames, and no serialization flag per column (a protocol revision before
    54454, as 18.16's). The client must be connected, so that the revision is known."""
    from clickhouse_driver import defines

    conn = client.connection
    revision = conn.server_info.used_revision
    return not conn.compression and revision < defines.DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION


def insert_block(client: Any, sql: str, data: bytes) -> bool:
    """Send a Native block's bytes as the data packet of the INSERT `sql`, as
    Client.process_insert_query sends the driver's own blocks; False, with nothing
    sent, if this connection cannot take it (see `takes_blocks`)."""
    from clickhouse_driver import defines
    from clickhouse_driver.block import BlockInfo, ColumnOrientedBlock
    from clickhouse_driver.protocol import ClientPacketTypes
    from clickhouse_driver.varint import write_varint
    from clickhouse_driver.writer import write_binary_str

    with client.disconnect_on_error(sql, None):
        if not takes_blocks(client):
            return False
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
        conn.fout.write(data)
        client.receive_profile_events()
        conn.send_data(ColumnOrientedBlock())  # the empty block that ends the data
        client.receive_profile_events()
        client.receive_end_of_insert_query()
    return True


class NativeFormat:
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
        """Columns (one list each, rewritten in place by the driver) → one Native block."""
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


_native_format: NativeFormat | None = None


def native() -> NativeFormat:
    """The process's one NativeFormat (its context is built once)."""
    global _native_format
    if _native_format is None:
        _native_format = NativeFormat()
    return _native_format

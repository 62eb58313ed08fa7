"""The three modules that use third-party private API, against the pinned versions: no service.

- producers/kafka_internals.py (kafka-python): our record batches are kafka-python's
  own, byte for byte, and a batch handed to a producer's sender is one it completes;
- streams/faust_internals.py (Faust): Faust's Fetcher runs our drain loop, and the
  private methods we override or call have the signatures we use;
- projections/clickhouse/driver_internals.py (clickhouse-driver): our INSERT is the
  driver's own bytes, and Native blocks round-trip.

Each module refuses to import against another version than pyproject.toml pins.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import re
import tomllib
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pinned(package: str) -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in dependencies:
        m = re.match(rf"^{re.escape(package)}==([^;\s]+)", spec)
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("producers.kafka_internals", "kafka-python"),
        ("streams.faust_internals", "faust-streaming"),
        ("projections.clickhouse.driver_internals", "clickhouse-driver"),
    ],
)
def test_each_internals_module_refuses_another_version(module: str, package: str) -> None:
    import importlib

    internals = importlib.import_module(module)
    assert internals.PINNED == _pinned(package), f"{module} was checked against another version than pyproject pins"
    internals.check_version(internals.PINNED)  # the pinned one passes
    with pytest.raises(ImportError) as raised:
        internals.check_version("99.0.0")
    message = str(raised.value)
    assert module in message and package in message and internals.PINNED in message and "99.0.0" in message


# kafka-python ------------------------------------------------------------------------------------


def _rows(count: int, seed: int) -> tuple[list[tuple[int, bytes, bytes, bytes]], list[list[tuple[str, bytes]]]]:
    """(index, key, value, header section) rows, values past the varint table's 16 KiB included."""
    from producers.kafka_internals import encode_headers

    rng = random.Random(seed)
    rows, headers = [], []
    for i in range(count):
        h = [("trace_id", os.urandom(rng.randrange(0, 40))), ("source", b"nhdp-sdk")]
        headers.append(h)
        rows.append(
            (i, os.urandom(rng.randrange(0, 70)), os.urandom(rng.choice([0, 200, 900, 20_000])), encode_headers(h))
        )
    return rows, headers


@pytest.mark.parametrize("compression", [0, 3])  # none, lz4
def test_our_record_batches_are_kafka_pythons_byte_for_byte(compression: int) -> None:
    """build_batches writes the records itself and fills a MemoryRecordsBuilder's private
    state; kafka-python's own DefaultRecordBatchBuilder, given the same records, must build
    the same bytes, and split them into batches at the same records."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    from producers.kafka_internals import BATCH_BYTES, build_batches

    timestamp = 1_624_000_000_000
    rows, headers = _rows(1500, seed=4)
    built = build_batches(rows, timestamp, {"message_version": 2, "compression_attrs": compression})
    assert len(built) > 1 and [i for members, _ in built for i in members] == list(range(len(rows)))
    sequence = 0
    for n, (members, ours) in enumerate(built):
        theirs = DefaultRecordBatchBuilder(2, compression, False, 7, 1, sequence, BATCH_BYTES)
        for offset, i in enumerate(members):
            assert theirs.append(offset, timestamp, rows[i][1], rows[i][2], headers[i]) is not None
        if n + 1 < len(built):  # kafka-python would have started a new batch at the same record
            first = built[n + 1][0][0]
            assert theirs.append(len(members), timestamp, rows[first][1], rows[first][2], headers[first]) is None
        ours.set_producer_state(7, 1, sequence, False)
        ours.close()
        assert bytes(ours.buffer()) == bytes(theirs.build())
        sequence += len(members)


def test_a_batch_handed_to_the_sender_is_completed_by_kafka_python() -> None:
    """enqueue puts whole batches where KafkaProducer.send's accumulator puts its own: flush
    waits for them and kafka-python's sender completes them (here: expires them, no broker
    listens), which batch_result reads as the SDK does."""
    from kafka import KafkaProducer

    from producers.kafka_internals import BatchSender, batch_result, encode_headers

    producer = KafkaProducer(
        bootstrap_servers="127.0.0.1:9",  # discard: nothing answers
        api_version=(2, 8),  # no version probe
        compression_type="lz4",
        linger_ms=0,
        request_timeout_ms=200,
        delivery_timeout_ms=400,
        reconnect_backoff_ms=50,
        enable_idempotence=False,  # the producer id would need a broker first
    )
    try:
        sender = BatchSender(producer)
        rows = [(i, b"k%d" % i, b"v" * i, encode_headers([("trace_id", b"t")])) for i in range(10)]
        built = sender.build("health.events", 3, rows, 1_624_000_000_000)
        assert [members for _, members in built] == [list(range(10))]
        batch = built[0][0]
        assert batch_result(batch) is None
        sender.enqueue([batch])
        producer.flush(timeout=10)  # returns once the sender has completed our batch
        result = batch_result(batch)
        assert result is not None
        error, _, record_error = result
        assert error is None and record_error is not None
        assert type(record_error(0)).__name__ == "KafkaTimeoutError"
    finally:
        producer.close(timeout=1)


def test_batch_result_reads_a_completed_batch() -> None:
    from kafka.producer.producer_batch import ProducerBatch
    from kafka.record.memory_records import MemoryRecordsBuilder
    from kafka.structs import TopicPartition

    from producers.kafka_internals import batch_result

    batch = ProducerBatch(TopicPartition("health.events", 0), MemoryRecordsBuilder(2, 0, 1024))
    batch.done(base_offset=42, timestamp_ms=-1)
    assert batch_result(batch) == (None, 42, None)


# Faust -------------------------------------------------------------------------------------------


def _faust_app(tmp_path: Path):
    from streams.faust_internals import App

    return App(
        "nhdp-unit",
        broker="kafka://127.0.0.1:9",
        store="memory://",
        web_enabled=False,
        datadir=str(tmp_path / "faust"),
    )


def test_the_apps_consumer_is_ours(tmp_path: Path) -> None:
    from streams.faust_internals import App, BulkConsumer, Transport

    app = _faust_app(tmp_path)
    assert type(app)._new_transport is App._new_transport
    assert type(app.transport) is Transport
    assert type(app.consumer) is BulkConsumer
    assert app.consumer._drain_messages.__func__ is BulkConsumer._drain_messages


def test_fausts_fetcher_runs_our_drain_loop(tmp_path: Path) -> None:
    """Faust's Fetcher service (its own task body) must end up in our `_drain_messages`:
    a fetch goes whole to the bulk handler, read offsets and the stalled-stream check's
    times are kept, and the positions are committed once the fetches run dry."""
    from aiokafka.structs import ConsumerRecord
    from faust.types import TP

    def record(offset: int) -> ConsumerRecord:
        return ConsumerRecord("health.events", 0, offset, 0, 0, b"k", b"v", None, 1, 1, [])

    async def scenario() -> None:
        app = _faust_app(tmp_path)
        consumer = app.consumer
        tp = TP("health.events", 0)
        fetches = [{tp: [record(5), record(6)]}, {}]
        handled: list[list[int]] = []
        committed: list[dict] = []

        async def handler(records: list) -> None:
            handled.append([r.offset for r in records])

        async def wait_next_records(timeout: float):
            if not fetches:
                consumer._stopped.set()
                return {}, {tp}
            return fetches.pop(0), {tp}

        async def commit(offsets) -> bool:
            committed.append(dict(offsets))
            return True

        app.subscribe(app.topic("health.events"), handler, within=0.01)
        consumer._wait_next_records = wait_next_records
        consumer._commit = commit
        consumer.assignment = lambda: {tp}
        fetcher = app._fetcher
        await asyncio.wait_for(type(fetcher)._fetcher(fetcher), 5)
        assert handled == [[5, 6]]
        assert committed == [{tp: 7}]
        assert consumer._read_offset[tp] == 6
        assert tp in app.monitor.stream_inbound_time

    asyncio.run(scenario())


def test_the_faust_methods_we_override_or_call_have_the_signatures_we_use() -> None:
    import faust
    from faust.transport.base import Transport as BaseTransport
    from faust.transport.consumer import Fetcher
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from streams.faust_internals import BulkConsumer

    def params(function) -> list[str]:
        return list(inspect.signature(function).parameters)

    consumer = faust_aiokafka.Consumer
    expected = [
        # (function, its parameters, a coroutine function?)
        (consumer._drain_messages, ["self", "fetcher"], True),  # overridden by BulkConsumer
        (consumer._wait_next_records, ["self", "timeout"], True),
        (consumer._commit, ["self", "offsets"], True),  # also commit_and_seek
        (consumer.seek_wait, ["self", "partitions"], True),
        (consumer.assignment, ["self"], False),
        (faust.App._new_transport, ["self"], False),  # overridden by App
        (BaseTransport.__init__, ["self", "url", "app", "loop"], False),  # App._new_transport's Transport(url, app)
        (faust_aiokafka.Producer._ensure_producer, ["self"], False),  # aiokafka_producer
        (Fetcher._fetcher.fun, ["self"], True),  # the task that awaits consumer._drain_messages(fetcher)
    ]
    for function, names, is_coroutine in expected:
        assert params(function) == names, f"{function.__qualname__}{inspect.signature(function)}"
        assert inspect.iscoroutinefunction(function) is is_coroutine, function.__qualname__
    assert params(BulkConsumer._drain_messages) == params(consumer._drain_messages)
    assert isinstance(consumer.consumer_stopped_errors, tuple) and consumer.consumer_stopped_errors


def test_aiokafka_producer_reaches_fausts_underlying_producer(tmp_path: Path) -> None:
    from faust.exceptions import NotReady

    from streams.faust_internals import aiokafka_producer

    app = _faust_app(tmp_path)
    with pytest.raises(NotReady):  # Faust's answer before the producer service starts
        aiokafka_producer(app)


# clickhouse-driver -------------------------------------------------------------------------------


class _Sink:
    def __init__(self):
        self.data = bytearray()

    def sendall(self, chunk) -> None:
        self.data += chunk


COLUMNS = [("n", "UInt32"), ("s", "String"), ("a", "Array(UInt16)"), ("m", "Nullable(String)")]
ROWS = [(1, "a", [1, 2], None), (7, "żółw", [], "x"), (4_000_000_000, "", [65535], "")]


def _offline_client(revision: int):
    """A clickhouse-driver Client whose connection writes to memory, as if connected to a
    server of this protocol revision whose INSERT sample block has COLUMNS."""
    from clickhouse_driver import Client
    from clickhouse_driver.block import ColumnOrientedBlock
    from clickhouse_driver.bufferedwriter import BufferedSocketWriter
    from clickhouse_driver.connection import ServerInfo
    from clickhouse_driver.result import QueryInfo

    client = Client(host="localhost")
    conn = client.connection
    sink = _Sink()
    conn.fout = BufferedSocketWriter(sink, 1 << 20)
    conn.server_info = conn.context.server_info = ServerInfo("ClickHouse", 18, 16, 1, revision, "UTC", "unit", revision)
    conn.block_out = conn.get_block_out_stream()
    conn.connected = True
    # what a server would answer, without one
    client.establish_connection = lambda settings: setattr(client, "last_query", QueryInfo())
    client.receive_sample_block = lambda: ColumnOrientedBlock(COLUMNS)
    client.receive_profile_events = lambda: None
    client.receive_end_of_insert_query = lambda: None
    return client, sink


@pytest.mark.parametrize("revision", [54413, 54448])  # 18.16's; the last before start times in the query packet
def test_our_insert_sends_the_drivers_own_bytes(revision: int) -> None:
    from projections.clickhouse.driver_internals import insert_block, native, takes_blocks

    sql = "INSERT INTO t (n, s, a, m) VALUES"
    theirs, their_bytes = _offline_client(revision)
    assert theirs.execute(sql, [list(c) for c in zip(*ROWS)], columnar=True) == len(ROWS)

    ours, our_bytes = _offline_client(revision)
    assert takes_blocks(ours)
    block = native().encode(COLUMNS, [list(c) for c in zip(*ROWS)])
    assert insert_block(ours, sql, block) is True
    assert len(their_bytes.data) > len(block) and bytes(our_bytes.data) == bytes(their_bytes.data)


def test_a_connection_with_per_column_serialization_flags_takes_no_blocks() -> None:
    from clickhouse_driver import defines

    from projections.clickhouse.driver_internals import insert_block, native, takes_blocks

    client, sent = _offline_client(defines.DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION)
    assert not takes_blocks(client)
    assert insert_block(client, "INSERT INTO t VALUES", native().encode(COLUMNS, [[1], ["a"], [[]], [None]])) is False
    assert not sent.data


def test_native_blocks_round_trip() -> None:
    from projections.clickhouse.driver_internals import native

    event_id = uuid.UUID("9f1c6a3e-0000-4000-8000-00000000ff00").bytes  # not UTF-8: decoded as bytes
    columns = [
        ("n", "UInt64"),
        ("s", "String"),
        ("f", "FixedString(16)"),
        ("t", "DateTime('UTC')"),
        ("a", "Array(UInt32)"),
        ("m", "Nullable(String)"),
    ]
    rows = [
        (1, "a", event_id, datetime(2025, 3, 1, 12, 0, 5, tzinfo=UTC), [1, 2, 3], None),
        (2**64 - 1, "żółw", b"0123456789abcdef", datetime(2030, 1, 1, tzinfo=UTC), [], "x"),
        (0, "", b"short", datetime(1970, 1, 1, tzinfo=UTC), [4_000_000_000], ""),
    ]
    expected = [
        rows[0],
        (2**64 - 1, "żółw", "0123456789abcdef", rows[1][3], [], "x"),  # FixedString text is read as str
        (0, "", "short", rows[2][3], [4_000_000_000], ""),  # padded with zeros, read without them
    ]
    block = native().encode(columns, [list(c) for c in zip(*rows)])
    assert native().decode(block) == ([t for _, t in columns], expected)
    assert native().decode(block + block) == ([t for _, t in columns], expected + expected)  # a stream of blocks
    assert native().decode(b"") == ([], [])
    assert "column n (UInt64)" in native().explain(columns, [(-1, "a", event_id, rows[0][3], [], None)])

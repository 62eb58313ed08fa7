"""The producer SDK's shortcuts (producers/sdk.py) against kafka-python's own code: no broker.

The gateway against the real stack is tested in tests/stack/test_gateway.py.
"""

from __future__ import annotations

import hashlib
import random

from kafka.partitioner.default import murmur2 as kafka_murmur2


def test_the_sdks_shortcuts_compute_what_kafka_python_would():
    """producers/sdk.py picks partitions itself with a vectorised murmur2, writes record
    batches itself and gives kafka-python a compiled CRC-32C: each must give kafka-python's
    own results, byte for byte."""
    import os

    from kafka.record import default_records, util
    from kafka.record.memory_records import MemoryRecordsBuilder

    from producers.sdk import BATCH_BYTES, build_batches, encode_headers
    from schemas.topics import murmur2, murmur2_many

    rng = random.Random(4)
    keys = [os.urandom(rng.randrange(0, 80)) for _ in range(5000)]
    keys += [hashlib.sha256(str(i).encode()).hexdigest().encode() for i in range(5000)]  # subject_ids
    expected = [kafka_murmur2(k) for k in keys]
    assert [murmur2(k) for k in keys] == expected
    assert murmur2_many(keys).tolist() == expected
    for size in (0, 1, 7, 61, 4096, 100_003):
        data = os.urandom(size)
        assert default_records.calc_crc32c(memoryview(data)) == util.crc32c_py(data)

    # Enough rows for several batches, with values past the varint table's 16 KiB.
    rows, headers = [], []
    for i in range(2500):
        h = [("trace_id", os.urandom(rng.randrange(0, 40))), ("source", b"nhdp-sdk")]
        headers.append(h)
        rows.append(
            (i, os.urandom(rng.randrange(0, 70)), os.urandom(rng.choice([0, 200, 900, 20_000])), encode_headers(h))
        )
    for compression in (0, 3):  # none, lz4
        built = build_batches(rows, 1_624_000_000_000, {"message_version": 2, "compression_attrs": compression})
        assert len(built) > 1 and [i for members, _ in built for i in members] == list(range(len(rows)))
        sequence = 0
        for members, ours in built:
            theirs = MemoryRecordsBuilder(2, compression, BATCH_BYTES)
            for i in members:
                assert theirs.append(1_624_000_000_000, rows[i][1], rows[i][2], headers[i]) is not None
            for builder in (ours, theirs):
                builder.set_producer_state(7, 1, sequence, False)
                builder.close()
            assert bytes(ours.records().next_batch()._buffer) == bytes(theirs.records().next_batch()._buffer)
            sequence += len(members)

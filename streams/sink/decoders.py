"""The sink's decoder processes: decode and shape a batch off the sink's own core."""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Sequence

from projections.clickhouse.native import encode_block
from projections.clickhouse.shaping import EVENT_COLUMNS, INDEX_COLUMNS, REGIONS, VOID_COLUMNS, shape
from projections.clickhouse.store import AnalyticsStoreError
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from streams.routing import Router

log = logging.getLogger("nhdp.sink")


_decoder_router = None


def _start_decoder(settings) -> None:
    global _decoder_router

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sink stops it, on its own schedule
    _decoder_router = Router(Codec(RegistryClient.for_settings(settings)))
    # A batch's objects are acyclic and die with the call, so the collector would only rescan
    # them while they live (7% of the decoding). It runs between batches instead, when nothing
    # is left to scan: the modules loaded by now are frozen out of it.
    gc.collect()
    gc.freeze()
    gc.disable()
    parent = os.getppid()

    def orphaned() -> None:  # a sink killed outright cannot stop it: leave with it
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphaned, name="nhdp-sink-decoder-parent", daemon=True).start()


# The tables whose rows only the decoders make (Shaped's first three parts): they arrive as
# encoded blocks (analytics_store.Block) when the store can take them.
BLOCK_TABLES = (("events", EVENT_COLUMNS), ("event_index", INDEX_COLUMNS), ("voids", VOID_COLUMNS))


def decode_and_shape(
    values: list[bytes],
    partitions: list[int],
    offsets: list[int],
    block_types: Sequence[list[tuple[str, str]]] | None = None,
) -> tuple[bytes, int]:
    """In the decoding process: raw messages → (the pickled shape() of the good ones, how many were good).

    Pickled here so that the sink unpickles it on its own thread (where
    run() keeps the collector off), not on the executor's result thread. With block_types
    (the column types of BLOCK_TABLES), those rows are sent encoded: the sink
    process plans every batch on one thread, and unpickling and encoding
    ~30 values per event there was a third of its time."""
    gc.collect()  # the collector is off here (_start_decoder), and the last batch is gone: nothing to scan
    good, _bad = _decoder_router.split(values)  # the worker dead-letters the bad ones, with the reason
    shaped = shape([(partitions[i], offsets[i], ev) for i, ev in good], REGIONS)
    parts = list(shaped)
    if block_types is not None:
        for i, types in enumerate(block_types):
            if parts[i]:
                try:
                    parts[i] = encode_block(types, parts[i])
                except AnalyticsStoreError:
                    pass  # sent as rows: the sink's insert then names the column at fault
    return pickle.dumps((tuple(parts), shaped.skipped), protocol=pickle.HIGHEST_PROTOCOL), len(good)

"""Faust's (and, through it, aiokafka's) private API, in one place: bulk delivery and resuming.

Faust delivers every message on its own: its drain loop awaits
`wait_first(callback(message), suspend_flow.wait())` (two tasks per message),
and the conductor, the stream and its Event objects follow. With py-spy that
was ~75% of the stream worker's CPU and capped it at a quarter of what a plain
consumer reads and decodes.

This keeps all of Faust that matters to us (group membership, rebalances and
their signals, flow control, the Fetcher service, the producer) and replaces
only the per-message delivery: each `getmany` result (at most
`broker_max_poll_records` records, returned as soon as any are fetched) is
handed as one list of aiokafka `ConsumerRecord`s to the app's `bulk_handler`.
So a batch is as large as the backlog allows and as small as the traffic
makes it: the "take(n, within)" of the agent it replaces, without a timer.

Safety does not depend on this loop: the handler applies each batch with its
offsets in one transaction and skips offsets at or below the tracking record,
so a batch fetched just before a rebalance and applied after it changes
nothing twice. Faust's own committed offsets are not used for resuming.

The private API used, all of it here and only here:

- `Consumer._drain_messages(fetcher)`, overridden by `BulkConsumer`: the method
  Faust's Fetcher service runs as its background task. Our loop reads
  `Consumer._wait_next_records(timeout)` (a fetch of the active partitions,
  respecting flow control), `Consumer._read_offset` (Faust's per-partition read
  position), `Service._stopped` of the consumer and the fetcher,
  `app.monitor.stream_inbound_time` (Faust's stalled-stream check reads it) and
  commits with `Consumer._commit(offsets)`;
- `App._new_transport()`, overridden by `App` so that the app's consumer is a
  `BulkConsumer` (through `Transport.Consumer`);
- `Consumer._commit(offsets)` again in `commit_and_seek`: the worker commits the
  tracking record's positions before Faust's post-rebalance seek reads them;
- `Producer._ensure_producer()`, in `aiokafka_producer`: Faust's underlying
  aiokafka producer, whose `create_batch`/`send_batch` copy a fetch to the
  province topics as whole record batches instead of one send per message (a
  fifth of the worker's event loop).

Every one of these is checked against the faust-streaming version pinned in
pyproject.toml (import fails on any other); tests/unit/test_third_party.py
checks that Faust's Fetcher runs our drain loop and that the methods above
exist with the signatures used here, without a broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import version
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from infra.tools import require_pinned

PINNED = "0.15.3"


def check_version(installed: str) -> None:
    require_pinned("faust-streaming", PINNED, __name__, installed)


check_version(version("faust-streaming"))


BulkHandler = Callable[[list[Any]], Awaitable[None]]


COMMIT_EVERY_S = 2.8  # Faust's default commit interval


class BulkConsumer(faust_aiokafka.Consumer):
    async def _drain_messages(self, fetcher: Any) -> None:
        app = cast(App, self.app)
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        inbound = app.monitor.stream_inbound_time
        pending: dict[Any, int] = {}
        committed_at = time.monotonic()
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                records, active = await self._wait_next_records(app.bulk_within)
                if records and not self.should_stop and self.flow_active:
                    # (flow stopped while fetching = a rebalance began: the positions are
                    # about to be re-seeked from the tracking record; these are not handled)
                    handled = {tp: rs for tp, rs in records.items() if rs and (active is None or tp in active)}
                    if handled:
                        await app.bulk_handler([r for rs in handled.values() for r in rs])
                        now = time.monotonic()
                        for tp, rs in handled.items():
                            pending[tp] = rs[-1].offset + 1
                            self._read_offset[tp] = rs[-1].offset
                            inbound[tp] = now  # Faust's stalled-stream check reads these
                if pending and (not records or time.monotonic() - committed_at >= COMMIT_EVERY_S):
                    # Kafka's committed offsets only follow the tracking record (resuming never
                    # reads them): they keep the group's lag right for Kafka's own tools.
                    assigned = self.assignment()
                    offsets = {tp: o for tp, o in pending.items() if tp in assigned}
                    pending.clear()
                    committed_at = time.monotonic()
                    if offsets and self.flow_active:
                        await self._commit(offsets)
        except self.consumer_stopped_errors:
            if not self.transport.app.should_stop:
                raise
        except asyncio.CancelledError:
            if not self.transport.app.should_stop:
                raise


class Transport(faust_aiokafka.Transport):
    Consumer = BulkConsumer


class App(faust.App):
    """A Faust app whose subscribed topics are delivered in bulk to `bulk_handler`.

    Subscribe with `subscribe(topic, handler, within=…)`, not an agent:
    nothing is delivered per message."""

    bulk_handler: BulkHandler
    bulk_within: float = 0.5

    def subscribe(self, topic: faust.TopicT, handler: BulkHandler, *, within: float) -> None:
        self.topics.add(topic)
        self.bulk_handler = handler
        self.bulk_within = within

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)


async def commit_and_seek(app: faust.App, offsets: Mapping[Any, int]) -> None:
    """Commit `offsets` as the group's positions and seek the consumer there.

    Faust awaits `on_rebalance_complete` right before it seeks every partition to
    the group's committed offset (perform_seek), so committing first makes that
    seek land where ours does."""
    await app.consumer._commit(offsets)
    await app.consumer.seek_wait(offsets)


def aiokafka_producer(app: faust.App) -> Any:
    """The started app's aiokafka `AIOKafkaProducer` (its `create_batch`/`send_batch` are public aiokafka API)."""
    return app.producer._ensure_producer()

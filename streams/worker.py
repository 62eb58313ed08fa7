"""The stream worker: `health.events` → DLQ, province topics, PostgreSQL projections.

The Faust app's consumer hands over each fetched batch whole
(streams.faust_internals, the one module that uses Faust's private API:
Faust's per-message delivery cost three quarters of the worker's CPU). For
each batch:

1. messages at or below the partition's tracking offset are dropped: they
   were applied before a restart or rebalance;
2. each message is decoded (codec) and checked; a failure goes to
   `health.events.dlq` with its reason and origin in headers;
3. every good event is copied byte for byte to `province.<code>.events`, in one
   record batch per topic partition;
4. the good events and the batch's last offsets are applied to the
   projections in ONE PostgreSQL transaction (the tracking record).

Steps 2–3 are acknowledged by Kafka before step 4 commits, so a crash in
between re-sends them (at least once; consumers dedupe by event_id) but
never loses them. Step 4 is effectively once because the offsets commit with
the state. Faust's own committed offsets are not trusted: on assignment the
worker seeks every partition to tracking offset + 1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faust
from prometheus_client import Counter, Histogram
from psycopg_pool import ConnectionPool

from infra.process import COLLECT_EVERY_S, write_atomically
from infra.settings import KAFKA_SASL_MECHANISM, Settings, get_settings
from projections.faults import apply_isolating
from projections.postgres.projector import Projector
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from schemas.topics import PROJECTOR_GROUP, TOPIC_DLQ, TOPIC_EVENTS, dlq_headers, partitions_of, province_topic
from streams import faust_internals
from streams.routing import Router

log = logging.getLogger("nhdp.worker")

BATCH_SIZE = 5000
RESUME_TIMEOUT_S = 60.0  # committing and seeking to the tracking record takes well under a second
BATCH_WITHIN_S = 0.5  # how long one fetch waits for a first record (a batch is whatever is there)
REVOKE_WAIT_S = 5.0

PROCESSED = Counter("nhdp_worker_events_total", "Events handled by the worker", ["outcome"])
RETRIES = Counter("nhdp_worker_retries_total", "Batches retried because a dependency failed (transient)")
BATCH_SECONDS = Histogram("nhdp_worker_batch_seconds", "Time to route and project one batch")


def dead_letter_headers(m, reason: str) -> list[tuple[str, bytes]]:
    return dlq_headers(m.headers, reason, m.topic, m.partition, m.offset)


class Worker(faust.Worker):
    """Faust's worker without its terminal spinner.

    At a log level of WARN or above, Faust's spinner sets the root logger to
    DEBUG so that it can spin on every record: every debug call in the
    process then builds a LogRecord (aiokafka logs one per message sent),
    which cost ~5% of the worker's event loop. The spinner has no use in a
    background service anyway."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None


def broker_credentials(settings: Settings) -> faust.SASLCredentials:
    """SCRAM as this process's principal; TLS too under NHDP_KAFKA_SECURITY_PROTOCOL=SASL_SSL.

    Faust picks SASL_SSL only when given an SSL context, never from a protocol name. The default
    context verifies the brokers against the system's CAs (a private CA: SSL_CERT_FILE)."""
    tls = ssl.create_default_context() if settings.kafka_security_protocol == "SASL_SSL" else None
    return faust.SASLCredentials(
        username=settings.principal, password=settings.password, mechanism=KAFKA_SASL_MECHANISM, ssl_context=tls
    )


def create_app(
    settings: Settings, *, namespace: str = "proj", group: str = PROJECTOR_GROUP, ready_file: Path | None = None
) -> faust.App:

    app = faust_internals.App(
        group,
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        broker_credentials=broker_credentials(settings),
        store="memory://",
        web_enabled=False,
        topic_allow_declare=False,  # the contract's topics are created by `nhdp up`
        topic_disable_leader=True,
        topic_partitions=settings.kafka_partitions,
        broker_commit_every=BATCH_SIZE,
        datadir=str(settings.data_dir / "faust"),
        consumer_auto_offset_reset="earliest",
        # A worker that dies without leaving the group (SIGKILL, a lost host)
        # holds its partitions until this expires: 10 s, not Faust's 60 s.
        broker_session_timeout=10.0,
        producer_acks=-1,
        producer_compression_type=settings.kafka_compression_type,
        broker_max_poll_records=BATCH_SIZE,  # one fetch is one batch (streams.faust_internals)
        producer_max_batch_size=512 * 1024,  # province copies go as whole batches (copy_to_provinces)
        Worker=Worker,
    )
    events = app.topic(TOPIC_EVENTS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    pool = ConnectionPool(
        settings.postgres_url, min_size=1, max_size=2, open=False, check=ConnectionPool.check_connection
    )
    state: dict[str, Any] = {}

    def projector() -> Projector:
        if "projector" not in state:
            pool.open()
            state["projector"] = Projector(pool, namespace=namespace)
            state["projector"].ensure_schema()
            state["router"] = Router(Codec(RegistryClient.for_settings(settings)))
        return state["projector"]

    @app.on_rebalance_complete.connect
    async def seek_to_tracking(app_, **kwargs):
        # The tracking record, not Faust's committed offset, says where we are.
        # Faust sends this signal after each rebalance and awaits it right
        # before it seeks every partition to the group's committed offset
        # (perform_seek) and resumes the flow; on_partitions_assigned runs
        # concurrently with that seek, so a seek made there can be undone by
        # it. So: commit the tracking positions (perform_seek then seeks to
        # them) and seek there ourselves too, in the consumer's own thread
        # (perform_seek does not seek a partition whose committed offset is 0).
        assigned = {tp for tp in app_.consumer.assignment() if tp.topic == TOPIC_EVENTS}
        if assigned:
            positions = await asyncio.to_thread(lambda: projector().positions(group))
            resume = {tp: positions.get((tp.topic, tp.partition), -1) + 1 for tp in assigned}
            # once per rebalance: where this worker resumes (and, if it ever hangs here, the last line logged)
            log.warning("resuming at the tracking record: %s", {tp.partition: o for tp, o in sorted(resume.items())})

            def give_up(reason: object) -> None:
                # Consuming without this seek could skip events, and a worker stuck here
                # holds its partitions while doing nothing (seen rarely, when a rebalance
                # races the group coordinator). Exiting is safe: nothing of this
                # assignment was applied, and the supervisor (`nhdp up`, systemd…)
                # starts the worker again, which resumes from the tracking record.
                log.critical(
                    "could not resume at the tracking record within %.0fs (%r); exiting so that "
                    "the worker is restarted",
                    RESUME_TIMEOUT_S,
                    reason,
                )
                logging.shutdown()
                os._exit(75)

            # A thread, not asyncio.wait_for: on timeout wait_for also waits for the
            # cancelled call to end, and a call stuck in the consumer thread need not
            # (seen: no exit, a worker still stuck minutes after its deadline).
            watchdog = threading.Timer(RESUME_TIMEOUT_S, give_up, args=("timed out",))
            watchdog.daemon = True
            watchdog.start()
            try:
                await faust_internals.commit_and_seek(app_, resume)
            except Exception as exc:
                give_up(exc)
            finally:
                watchdog.cancel()
        if ready_file is not None:
            write_atomically(ready_file, str(sorted(tp.partition for tp in assigned)))

    busy = asyncio.Lock()

    async def project(records: list) -> None:
        async with busy:
            started = time.perf_counter()
            delay = 0.5
            while True:
                try:
                    await handle_batch(app, records)
                    break
                except Exception:
                    log.exception("batch of %d failed; retrying in %.1fs", len(records), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            BATCH_SECONDS.observe(time.perf_counter() - started)

    app.subscribe(events, project, within=BATCH_WITHIN_S)

    # The collector on a schedule (infra.process.COLLECT_EVERY_S): left to itself, its full
    # collections rescanned Faust's heap every few batches, a quarter of this process's CPU.
    @app.task
    async def freeze_startup_heap() -> None:
        gc.collect()
        gc.freeze()
        gc.disable()

    @app.timer(interval=COLLECT_EVERY_S)
    async def collect_cycles() -> None:
        gc.collect()

    @app.on_partitions_revoked.connect
    async def finish_batch(app_, revoked, **kwargs):
        # Let the batch in hand land before the partitions move, so that the next
        # owner does not do it again. Not needed for safety (the tracking record
        # is), hence bounded: PostgreSQL being down must not hold the rebalance.
        try:
            await asyncio.wait_for(busy.acquire(), REVOKE_WAIT_S)
        except TimeoutError:
            return
        busy.release()

    async def handle_batch(app_: faust.App, msgs: list) -> None:
        proj = projector()
        router: Router = state["router"]
        good, bad = await asyncio.to_thread(router.split, [m.value for m in msgs])
        sends = [
            await app_.producer.send(
                TOPIC_DLQ, msgs[i].key, msgs[i].value, None, None, dead_letter_headers(msgs[i], reason)
            )
            for i, reason in bad
        ]
        sends += await copy_to_provinces(faust_internals.aiokafka_producer(app_), msgs, good)
        if sends:
            await asyncio.gather(*sends)
        applied = [(msgs[i].topic, msgs[i].partition, msgs[i].offset, event) for i, event in good]
        # Offsets of DLQ'd messages must be tracked too, or a restart would re-route them.
        marks = [(msgs[i].topic, msgs[i].partition, msgs[i].offset, None) for i, _ in bad]
        rejected = await apply_isolating_async(app_, proj, applied + marks, msgs)
        PROCESSED.labels("projected").inc(len(good) - rejected)
        PROCESSED.labels("dlq").inc(len(bad) + rejected)

    async def copy_to_provinces(kafka, msgs: list, good: list[tuple[int, dict]]) -> list:
        """Copy the good messages, bytes, key and headers unchanged, to their province
        topics: one record batch per topic partition through Faust's own aiokafka
        producer (its compiled batch builder), not one send per message, which was a
        fifth of the worker's event loop. Partitions are the Java client's murmur2 of
        the key, as a per-message send picks them, so a subject keeps its order there."""
        by_topic: dict[str, list[int]] = {}
        for i, event in good:
            by_topic.setdefault(province_topic(event["province_code"]), []).append(i)
        futures = []
        for topic, indexes in by_topic.items():
            partitions = sorted(await kafka.partitions_for(topic))
            by_partition: dict[int, list[int]] = {}
            for i, index in zip(indexes, partitions_of([msgs[i].key or b"" for i in indexes], len(partitions))):
                by_partition.setdefault(partitions[index], []).append(i)
            for partition, members in by_partition.items():
                batch = kafka.create_batch()
                for i in members:
                    m = msgs[i]
                    if batch.append(key=m.key, value=m.value, timestamp=None, headers=list(m.headers or [])) is None:
                        futures.append(await kafka.send_batch(batch, topic, partition=partition))
                        batch = kafka.create_batch()
                        if (
                            batch.append(key=m.key, value=m.value, timestamp=None, headers=list(m.headers or []))
                            is None
                        ):
                            # never dropped: the batch fails and is retried (a first record always fits)
                            raise RuntimeError(f"{topic}: offset {m.offset} does not fit an empty record batch")
                futures.append(await kafka.send_batch(batch, topic, partition=partition))
        return futures

    async def dead_letter(app_, m, reason: str) -> None:
        await (await app_.producer.send(TOPIC_DLQ, m.key, m.value, None, None, dead_letter_headers(m, reason)))

    async def apply_isolating_async(app_, proj, messages, msgs: list) -> int:
        """Apply until it succeeds (projections.faults): PostgreSQL down means back-pressure,
        never a skip; an event it cannot hold goes to the DLQ and the rest is applied."""
        loop = asyncio.get_running_loop()
        delay = [0.5]
        by_position: dict[tuple[int, int], Any] = {}  # built on a first rejection only: 7% of the loop

        def reject(entry, reason: str) -> None:
            if not by_position:
                by_position.update(((m.partition, m.offset), m) for m in msgs)
            m = by_position[(entry[1], entry[2])]
            log.warning("dead-lettering %s[%d]@%d: %s", m.topic, m.partition, m.offset, reason)
            asyncio.run_coroutine_threadsafe(dead_letter(app_, m, reason), loop).result(timeout=60)

        def wait(exc: BaseException) -> None:
            RETRIES.inc()
            log.warning("projection batch failed (%s); retrying in %.1fs", exc, delay[0])
            time.sleep(delay[0])
            delay[0] = min(delay[0] * 2, 10.0)

        return await asyncio.to_thread(
            apply_isolating, lambda part: proj.apply_batch(part, group), messages, reject, wait
        )

    app.projector = projector  # type: ignore[attr-defined]
    return app


def ready_path(settings: Settings, pid: int) -> Path:
    return settings.ready_path("worker", pid)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--nhdp-data" in argv:  # the process manager's marker, not Faust's
        k = argv.index("--nhdp-data")
        del argv[k : k + 2]

    settings = get_settings()
    app = create_app(settings, ready_file=ready_path(settings, os.getpid()))
    app.projector()  # fail fast, before joining the group, if PostgreSQL or the registry is wrong
    sys.argv = ["nhdp-worker", "worker", "-l", "warn", "--without-web", *argv]
    app.main()


if __name__ == "__main__":
    main()

"""Replay for auditors: rebuild every projection from offset 0 into its own namespace.

The rebuild runs the same Router (decode + checks) and the same Projector as
the live worker, so a difference between the rebuilt and the live namespace
is a real defect, not a second implementation disagreeing with the first.
`verify` rebuilds up to exactly the offsets the live projections have applied
(their tracking record), so both sides have seen the same prefix of the log.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from psycopg_pool import ConnectionPool
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from infra.settings import Settings
from projections.faults import apply_isolating
from projections.postgres import tracking
from projections.postgres.projector import Projector
from projections.postgres.read_models import diff_namespaces
from schemas.codec import Codec
from schemas.log import LogPrefix
from schemas.registry_client import RegistryClient
from streams.routing import Router

REPLAY_GROUP = "nhdp-replay"
log = logging.getLogger("nhdp.replay")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


@dataclass
class ReplayResult:
    namespace: str
    events: int
    dlq: int
    seconds: float


def namespace_for(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"replay name {name!r}: use lower-case letters, digits and _, starting with a letter")
    return f"replay_{name}"


def live_positions(pool: ConnectionPool, namespace: str = "proj") -> dict[int, int]:
    with pool.connection() as conn:
        return tracking.applied(conn, namespace)


def rebuild(
    settings: Settings,
    name: str,
    *,
    upto: dict[int, int] | None = None,
    console: Console | None = None,
    batch_size: int = 10_000,
) -> ReplayResult:
    """Rebuild into replay_<name> from offset 0 up to `upto` (inclusive; default: the log's end now)."""

    namespace = namespace_for(name)
    pool = ConnectionPool(settings.postgres_url, min_size=1, max_size=2, open=True)
    projector = Projector(pool, namespace=namespace)
    projector.drop_schema()  # a rebuild starts from nothing, always
    projector.ensure_schema()
    router = Router(Codec(RegistryClient.for_settings(settings)))
    prefix = LogPrefix(settings, upto, batch_size)
    total = prefix.total
    events = dlq = 0
    applier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-apply")
    pending: Future | None = None

    failures = [0]

    def wait(exc: BaseException) -> None:
        failures[0] += 1
        if failures[0] > 30:  # a replay is a tool run by hand: after ~30 s it says why, it does not hang
            raise exc
        log.warning("replay batch failed (%s); retrying in 1s", exc)
        time.sleep(1.0)

    def apply(batch: list[tuple]) -> int:
        """Apply one batch; returns how many events the projector refused (dead-lettered, as live)."""
        # the same rule as the live worker (projections.faults), so the replay refuses the same events
        return apply_isolating(lambda part: projector.apply_batch(part, REPLAY_GROUP), batch, lambda *_: None, wait)

    started = time.perf_counter()
    progress = Progress(
        TextColumn(f"replay → {namespace}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )
    try:
        with progress:
            task = progress.add_task("replay", total=total, rate="")
            for msgs in prefix:
                good, bad = router.split([m.value for m in msgs])
                batch = [(m.topic, m.partition, m.offset, None) for m in msgs]
                for i, event in good:
                    batch[i] = (*batch[i][:3], event)
                # One batch in PostgreSQL while the next is polled and decoded: the two
                # use different cores, and batches are still applied strictly in order.
                if pending is not None:
                    dlq += pending.result()
                pending = applier.submit(apply, batch)
                events += len(msgs)
                dlq += len(bad)
                progress.update(task, advance=len(msgs), rate=f"{events / (time.perf_counter() - started):,.0f} ev/s")
            if pending is not None:
                dlq += pending.result()
    finally:
        applier.shutdown(wait=True)  # never close the pool under a running transaction
        prefix.close()
        pool.close()
    return ReplayResult(namespace, events, dlq, time.perf_counter() - started)


def verify(settings: Settings, name: str, console: Console | None = None) -> list[str]:
    """Rebuild up to the live projections' positions, then list every difference."""

    with ConnectionPool(settings.postgres_url, min_size=1, max_size=1, open=True) as pool:
        upto = live_positions(pool)
        rebuild(settings, name, upto=upto, console=console)
        with pool.connection() as conn:
            return diff_namespaces(conn, "proj", namespace_for(name))

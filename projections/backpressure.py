"""Back-pressure (DESIGN §5): the gateway stops accepting while the projections or the sink are too far behind.

An accepted event is durable in Kafka at once, but it is only useful once the
live projections (PostgreSQL) and the analytics (ClickHouse) reflect it. When
producers outrun them, the log grows without bound and every answer goes stale;
instead, past `gateway_max_backlog` events not yet applied by either, the gateway
answers 503 with Retry-After before it reads a request's body, and producers
retry the same events (duplicates are answered as such, never published twice).

Before that hard limit, the gateway paces: past `gateway_pace_backlog` events behind,
each ingest request waits before its body is read, longer the further behind the
consumers are (pace()). Producers then post at about the rate the consumers apply,
so the answers stay fresh, and on shared cores the consumers get the CPU the
gateway would have spent accepting events that only queue up. The wait costs no
CPU (the body stays in the socket) and answers nothing differently.

The backlog is measured off the request path: a thread asks every POLL_S for the
log's end and both consumers' positions (the same long-lived clients the
freshness headers use). A measurement that fails or grows old refuses nothing:
Kafka or PostgreSQL being down is the gateway's own 503, with its own reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger("nhdp.backpressure")

POLL_S = 0.25
# pace(): the wait grows by PACE_STEP_S for every `pace_backlog` events behind past
# `pace_backlog`, up to PACE_MAX_S; a proportional controller, stable because a wait
# of a few hundred ms already slows a posting client several-fold.
PACE_STEP_S = 0.2
PACE_MAX_S = 1.0
STALE_S = 10.0  # a measurement older than this refuses nothing
BACKLOG = Gauge("nhdp_backlog_events", "Events in health.events not yet applied, by consumer", ["consumer"])


class Backlog:
    """measure() -> (events the projections have not applied, events the sink has not written)."""

    def __init__(
        self, measure: Callable[[], tuple[int, int]], limit: int, pace_backlog: int = 0, poll_s: float = POLL_S
    ):
        self.measure, self.limit, self.pace_backlog, self.poll_s = measure, limit, pace_backlog, poll_s
        self.last: tuple[float, int, int] | None = None  # (monotonic time, projections, sink)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nhdp-backlog", daemon=True)
        if limit > 0 or pace_backlog > 0:
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                projections, sink = self.measure()
                self.last = (time.monotonic(), projections, sink)
                BACKLOG.labels("projections").set(projections)
                BACKLOG.labels("analytics").set(sink)
            except Exception as exc:  # down or slow: the gateway's own checks answer for that
                log.debug("backlog not measured: %s", exc)
            if self._stop.wait(self.poll_s):
                return

    def _current(self) -> tuple[float, int, int] | None:
        """The last measurement, unless there is none or it has grown old."""
        last = self.last
        return None if last is None or time.monotonic() - last[0] > STALE_S else last

    def refusal(self) -> str | None:
        """Why the gateway accepts nothing now, or None."""
        last = self._current()
        if self.limit <= 0 or last is None:
            return None
        return refusal(last[1], last[2], self.limit)

    def pace(self) -> float:
        """Seconds an ingest request waits before it is read (0: none)."""
        last = self._current()
        if self.pace_backlog <= 0 or last is None:
            return 0.0
        return pace(max(last[1], last[2]), self.pace_backlog)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def pace(behind: int, pace_backlog: int) -> float:
    if behind <= pace_backlog:
        return 0.0
    return min(PACE_MAX_S, PACE_STEP_S * (behind - pace_backlog) / pace_backlog)


def refusal(projections: int, sink: int, limit: int) -> str | None:
    behind = [(name, n) for name, n in (("live projections", projections), ("analytics", sink)) if n > limit]
    if not behind:
        return None
    what = " and ".join(f"the {name} are {n:,} events behind" for name, n in behind)
    return (
        f"back-pressure: {what} (the limit is {limit:,}, NHDP_GATEWAY_MAX_BACKLOG); "
        "nothing from this request was published. Retry after the Retry-After seconds."
    )

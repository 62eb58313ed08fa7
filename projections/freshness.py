"""How fresh an answer is (DESIGN §5): the log positions it reflects and its lag behind the log's end.

Live summaries reflect the PostgreSQL projections' tracking record, read in the
same transaction as the figures; as_of and analytics answers reflect what the
ClickHouse sink has committed. Both are told in headers, beside the lag behind
the end of `health.events` (asked of Kafka at most every ENDS_TTL_S, through one
long-lived client: a question per request would cost a connection each).

Read-your-writes: a caller that has just posted events may ask an analytics
answer to wait (`wait=<seconds>`) until the sink has committed everything the
log held when the request arrived; it is answered 503 with Retry-After if the
sink is not there in time, never silently stale.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

HEADER_STORE = "NHDP-Store"  # projections (PostgreSQL, live) or analytics (ClickHouse)
HEADER_POSITIONS = "NHDP-Positions"  # partition:next offset, the prefix of the log the answer reflects
HEADER_LAG = "NHDP-Lag"  # messages of health.events past those positions (at most ENDS_TTL_S old)
ENDS_TTL_S = 0.5
POLL_S = 0.1
MAX_WAIT_S = 30.0


def positions_text(positions: dict[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(positions.items()))


def behind(ends: dict[int, int], positions: dict[int, int]) -> int:
    return sum(max(0, end - positions.get(p, 0)) for p, end in ends.items())


def reached(positions: dict[int, int], target: dict[int, int]) -> bool:
    return all(positions.get(p, 0) >= end for p, end in target.items())


class Freshness:
    """The log's end and the sink's committed positions (schemas.log's long-lived clients), cached."""

    def __init__(self, log_end: Callable[[], dict[int, int]], sink_positions: Callable[[], dict[int, int]]):
        self._log_end, self._sink_positions = log_end, sink_positions
        self._ends: tuple[float, dict[int, int] | None] = (0.0, None)  # None: Kafka could not say
        self._refreshing = threading.Lock()
        self._sink_seen: tuple[float, dict[int, int]] = (0.0, {})

    def ends(self, max_age_s: float = ENDS_TTL_S) -> dict[int, int]:
        """The log's end, at most max_age_s old. One caller asks Kafka at a time; the others take
        the last answer rather than queue behind a slow Kafka (a failure is remembered as long)."""
        at, ends = self._ends
        if time.monotonic() - at > max_age_s and self._refreshing.acquire(blocking=at == 0.0 or max_age_s == 0):
            try:
                ends = self._log_end()
            except Exception:
                ends = None
                raise
            finally:
                self._ends = (time.monotonic(), ends)
                self._refreshing.release()
        if ends is None:
            raise ConnectionError("Kafka did not say where the log ends")
        return ends

    def sink_positions(self) -> dict[int, int]:
        """The next offset the sink will write, per partition (its committed offsets)."""
        positions = self._sink_positions()
        self._sink_seen = (time.monotonic(), positions)
        return positions

    def recent_sink_positions(self, max_age_s: float = ENDS_TTL_S) -> dict[int, int] | None:
        """sink_positions() at most max_age_s old (a lower bound of what the store holds), or None
        if Kafka cannot say: the answer is still given, without its freshness."""
        at, positions = self._sink_seen
        if time.monotonic() - at > max_age_s:
            try:
                positions = self.sink_positions()
            except Exception:
                return None
        return positions

    def headers(self, store: str, positions: dict[int, int]) -> dict[str, str]:
        try:
            ends = self.ends()
            lag = str(behind(ends, positions))
            positions = {p: 0 for p in ends} | positions  # a partition with nothing applied yet is at 0
        except Exception:  # Kafka unreachable: the positions still say what the answer reflects
            lag = "unknown"
        return {HEADER_STORE: store, HEADER_POSITIONS: positions_text(positions), HEADER_LAG: lag}

    def wait_for_sink(self, timeout_s: float) -> dict[int, int] | None:
        """The sink's positions once they reach the log's end as of now; None if not within timeout_s."""
        target = self.ends(max_age_s=0.0)  # raises if Kafka cannot say: the caller answers 503
        deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
        while True:
            positions = self.sink_positions()
            if reached(positions, target):
                return positions
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

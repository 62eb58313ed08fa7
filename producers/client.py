"""HTTP client of `POST /v1/events`, with the retry rule the gateway promises.

A 503 (Kafka or PostgreSQL down) or a dropped connection means "send the
same batch again later": events the gateway had already accepted come back
as duplicates, never as second copies, so retrying the whole batch is safe.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class Tally:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0

    def add(self, answer: dict[str, Any], offset: int = 0) -> None:
        self.accepted += answer["accepted"]
        self.duplicates += answer["duplicates"]
        for r in answer["rejected"]:
            self.rejected.append({**r, "index": r["index"] + offset})


class GatewayClient:
    def __init__(self, base_url: str, *, timeout: float = 120.0, max_wait_s: float = 600.0):
        self._http = httpx.Client(base_url=base_url, timeout=timeout)
        self.max_wait_s = max_wait_s

    def post(self, events: Sequence[dict[str, Any]], tally: Tally | None = None) -> dict[str, Any]:
        """POST one batch; retry 503s and connection failures until max_wait_s."""
        body = orjson.dumps(events)
        deadline = time.monotonic() + self.max_wait_s
        while True:
            try:
                resp = self._http.post("/v1/events", content=body, headers={"content-type": "application/json"})
                if resp.status_code == 200:
                    return resp.json()
                if resp.status_code != 503:
                    raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:500]}")
                wait = float(resp.headers.get("retry-after", "2"))
            except httpx.TransportError:
                wait = 2.0
            if time.monotonic() + wait > deadline:
                raise RuntimeError(f"gateway unavailable for {self.max_wait_s:.0f}s; batch not confirmed")
            if tally is not None:
                tally.retries += 1
            time.sleep(wait)

    def close(self) -> None:
        self._http.close()

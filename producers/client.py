"""HTTP client of `POST /v1/events`, with the retry rule the gateway promises.

Each event goes with the token of its source: a producer token names one
source (schemas/access.py), so a batch of several sources is sent as one
request per source, and the answers are merged back in the batch's order.

A 503 (Kafka or PostgreSQL down) or a dropped connection means "send the
same batch again later": events the gateway had already accepted come back
as duplicates, never as second copies, so retrying the whole batch is safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
    def __init__(
        self,
        base_url: str,
        token_for: Callable[[str], str],
        *,
        timeout: float = 120.0,
        max_wait_s: float = 600.0,
    ):
        """token_for(source): a bearer token whose events may carry that source."""
        self._http = httpx.Client(base_url=base_url, timeout=timeout)
        self.token_for = token_for
        self.max_wait_s = max_wait_s

    def post(self, events: Sequence[dict[str, Any]], tally: Tally | None = None) -> dict[str, Any]:
        """POST one batch, one request per source; the answer as if it were one request."""
        groups: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            source = event.get("source") if isinstance(event, dict) else None
            groups.setdefault(source if isinstance(source, str) else "", []).append(i)
        if len(groups) == 1:
            return self._post(events, self.token_for(next(iter(groups)) or "unknown"), tally)
        merged: dict[str, Any] = {"accepted": 0, "duplicates": 0, "rejected": []}
        for source, indexes in groups.items():
            answer = self._post([events[i] for i in indexes], self.token_for(source or "unknown"), tally)
            merged["accepted"] += answer["accepted"]
            merged["duplicates"] += answer["duplicates"]
            merged["rejected"] += [{**r, "index": indexes[r["index"]]} for r in answer["rejected"]]
        merged["rejected"].sort(key=lambda r: r["index"])
        return merged

    def _post(self, events: Sequence[Any], token: str, tally: Tally | None) -> dict[str, Any]:
        """POST one request; retry 503s and connection failures until max_wait_s."""
        body = orjson.dumps(events)
        headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        deadline = time.monotonic() + self.max_wait_s
        while True:
            try:
                resp = self._http.post("/v1/events", content=body, headers=headers)
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

"""The live summaries' request coalescing (projections.api.Coalescer): pure logic, no services."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson

from projections.api import Coalescer


def test_concurrent_requests_share_one_query_and_later_ones_run_their_own():
    calls = []
    release = threading.Event()

    def compute():
        calls.append(time.monotonic())
        release.wait(5)
        return {"doses_administered": len(calls)}, {"NHDP-Positions": f"0:{len(calls)}"}

    async def scenario():
        live = Coalescer()
        waiting = [asyncio.ensure_future(live.get(("national",), compute)) for _ in range(50)]
        await asyncio.sleep(0.05)
        release.set()
        first = await asyncio.gather(*waiting)
        again = await live.get(("national",), compute)  # after the query ended: a new one, never a cached answer
        other = await live.get(("province", "79"), compute)
        return first, again, other

    first, again, other = asyncio.run(scenario())
    assert {r.body for r in first} == {orjson.dumps({"doses_administered": 1})}
    assert first[0].media_type == "application/json"
    assert {r.headers["NHDP-Positions"] for r in first} == {"0:1"}  # the freshness of the answer they share
    assert orjson.loads(again.body) == {"doses_administered": 2}
    assert orjson.loads(other.body) == {"doses_administered": 3}
    assert len(calls) == 3


def test_a_requester_that_goes_away_does_not_cancel_the_others_and_failures_reach_everyone():
    release = threading.Event()

    def slow():
        release.wait(5)
        return [1, 2, 3], {}

    def broken():
        raise RuntimeError("PostgreSQL is down")

    async def scenario():
        live = Coalescer()
        leaving = asyncio.ensure_future(live.get(("provinces",), slow))
        staying = asyncio.ensure_future(live.get(("provinces",), slow))
        await asyncio.sleep(0.05)
        leaving.cancel()
        await asyncio.sleep(0.01)
        release.set()
        kept = await staying
        failures = await asyncio.gather(*(live.get(("national",), broken) for _ in range(3)), return_exceptions=True)
        return leaving, kept, failures

    leaving, kept, failures = asyncio.run(scenario())
    assert leaving.cancelled()
    assert orjson.loads(kept.body) == [1, 2, 3]
    assert all(isinstance(f, RuntimeError) and str(f) == "PostgreSQL is down" for f in failures)

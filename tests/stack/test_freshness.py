"""Freshness is part of every answer (issue 14, part 5): positions and lag in headers and /metrics,
and read-your-writes for the analytics with `wait` instead of sleeping."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import api, post, valid_event

pytestmark = pytest.mark.stack


def positions(answer: httpx.Response) -> dict[int, int]:
    text = answer.headers["NHDP-Positions"]
    return {int(p): int(o) for p, o in (item.split(":") for item in text.split(","))} if text else {}


def test_every_summary_and_analytics_answer_says_how_fresh_it_is(stack_settings):
    with api(stack_settings, timeout=30) as client:
        for path, store in [
            ("/v1/national/summary", "projections"),
            ("/v1/provinces", "projections"),
            ("/v1/provinces/79/summary", "projections"),
            ("/v1/national/summary?as_of=2021-08-10T00:00:00Z", "analytics"),
            ("/v1/analytics/doses?group_by=province", "analytics"),
            ("/v1/analytics/coverage", "analytics"),
        ]:
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.headers["NHDP-Store"] == store, path
            assert int(answer.headers["NHDP-Lag"]) >= 0, path
            assert positions(answer), path
        metrics = client.get("/metrics").text
        assert "nhdp_sink_lag{" in metrics and "nhdp_consumer_lag{" in metrics


def test_read_your_writes_with_wait(stack_settings):
    day = "2020-01-03"  # a day no other test writes
    event = valid_event("DoseAdministered")
    event["occurred_at"] = f"{day}T08:00:00+07:00"
    with api(stack_settings, timeout=60) as client:
        params = {"from": day, "to": day}
        before = sum(r["doses"] for r in client.get("/v1/analytics/doses", params=params | {"wait": 20}).json()["rows"])
        assert post(stack_settings, [event]).json()["accepted"] == 1
        # No sleep, no polling: the answer waits until the sink holds what the log held at the request.
        answer = client.get("/v1/analytics/doses", params=params | {"wait": 20})
        assert answer.status_code == 200, answer.text
        assert sum(r["doses"] for r in answer.json()["rows"]) == before + 1
        assert int(answer.headers["NHDP-Lag"]) >= 0
        as_of = client.get("/v1/national/summary", params={"as_of": "2020-01-04T00:00:00Z", "wait": 20})
        assert as_of.status_code == 200 and as_of.json()["doses_administered"] >= 1
        bad = client.get("/v1/analytics/doses", params={"wait": 31})
        assert bad.status_code in (400, 422) and "wait" in bad.text

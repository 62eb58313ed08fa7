"""The fault suite, short version (issue 14): bench/faults.py's faults against a private stack under load.

Workers and the sink SIGKILLed at random moments (the supervisor brings them
back), the Kafka broker restarted, ClickHouse stopped, PostgreSQL restarted; then
every accepted event is counted exactly once, live and in the analytics, and a
replay and verify-analytics find 0 differences. The long version's figures are in
bench/RESULTS.md (`.venv/bin/python bench/faults.py`).
"""

from __future__ import annotations

import pytest

from bench.faults import SHORT, run, show
from nhdp import stack

pytestmark = pytest.mark.stack


@pytest.mark.timeout(1200)
def test_nothing_is_lost_or_counted_twice_through_kills_and_outages():
    with stack.private("faults") as settings:
        report = run(settings, SHORT)
    show(report)
    assert report.accepted > 0
    assert (report.lost, report.double_counted) == (0, 0), report
    assert report.counted_live == report.counted_analytics == report.accepted
    assert report.replay_differences == []
    assert report.analytics_differences == []
    assert len(report.recoveries) >= SHORT.worker_kills + SHORT.sink_kills + 2

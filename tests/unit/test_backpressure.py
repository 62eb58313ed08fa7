"""Back-pressure's rule (projections/backpressure.py), without a stack: the stack test is
tests/stack/test_limits.py::test_the_gateway_refuses_while_the_projections_are_behind…"""

from __future__ import annotations

import time

import pytest

from projections.backpressure import PACE_MAX_S, PACE_STEP_S, Backlog, pace, refusal


def test_within_the_limit_nothing_is_refused():
    assert refusal(100, 100, 100) is None
    assert refusal(0, 0, 1) is None


def test_the_reason_names_who_is_behind_by_how_much_and_the_setting():
    message = refusal(250_000, 10, 200_000)
    assert message.startswith("back-pressure: the live projections are 250,000 events behind")
    assert "analytics" not in message.split("(")[0]
    assert "the limit is 200,000, NHDP_GATEWAY_MAX_BACKLOG" in message
    both = refusal(300, 400, 200)
    assert "the live projections are 300 events behind and the analytics are 400 events behind" in both


def wait_measured(backlog: Backlog) -> None:
    deadline = time.monotonic() + 5
    while backlog.last is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_measurement_that_fails_refuses_nothing():
    def down() -> tuple[int, int]:
        raise ConnectionError("Kafka did not say where the log ends")

    backlog = Backlog(down, limit=10, poll_s=0.01)
    try:
        time.sleep(0.1)
        assert backlog.last is None and backlog.refusal() is None
    finally:
        backlog.close()


def test_the_latest_measurement_decides_and_an_old_one_refuses_nothing(monkeypatch):
    behind = [(50, 0)]
    backlog = Backlog(lambda: behind[-1], limit=10, poll_s=0.01)
    try:
        wait_measured(backlog)
        assert "50 events behind" in backlog.refusal()
        behind.append((5, 3))
        deadline = time.monotonic() + 5
        while backlog.refusal() is not None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        backlog.close()
    at, projections, sink = backlog.last
    backlog.last = (at - 60, 50, 0)  # measured a minute ago: Kafka has not answered since
    assert backlog.refusal() is None


def test_a_limit_of_zero_turns_it_off():
    backlog = Backlog(lambda: (10**9, 10**9), limit=0)
    assert backlog.refusal() is None and not backlog._thread.is_alive()


def test_pacing_waits_nothing_up_to_its_backlog_then_grows_with_it_to_a_bound():
    assert pace(0, 20_000) == 0 and pace(20_000, 20_000) == 0
    assert pace(30_000, 20_000) == pytest.approx(PACE_STEP_S / 2)
    assert pace(40_000, 20_000) == pytest.approx(PACE_STEP_S)
    waits = [pace(n, 20_000) for n in range(0, 400_000, 5_000)]
    assert waits == sorted(waits) and max(waits) == PACE_MAX_S


def test_pacing_follows_the_larger_backlog_and_an_old_measurement_paces_nothing():
    backlog = Backlog(lambda: (1_000, 40_000), limit=0, pace_backlog=20_000, poll_s=0.01)
    try:
        wait_measured(backlog)
        assert backlog.pace() == pytest.approx(PACE_STEP_S)
        assert backlog.refusal() is None  # pacing alone never refuses
    finally:
        backlog.close()
    at, projections, sink = backlog.last
    backlog.last = (at - 60, projections, sink)
    assert backlog.pace() == 0


def test_a_pace_backlog_of_zero_turns_pacing_off():
    backlog = Backlog(lambda: (10**9, 10**9), limit=0, pace_backlog=0)
    assert backlog.pace() == 0 and not backlog._thread.is_alive()

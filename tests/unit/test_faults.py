"""projections.faults: which failures are permanent, and how a batch is applied around one."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pg

from projections.clickhouse.store import AnalyticsStoreError
from projections.faults import apply_isolating, is_permanent, reason_of
from projections.postgres.projector import InvalidEvent


class Store:
    """Pure logic under test needs something to apply to: a list that refuses some values."""

    def __init__(self, poison=(), outages=0, invalid=()):
        self.rows: list[tuple] = []
        self.calls = 0
        self.poison, self.outages, self.invalid = set(poison), outages, set(invalid)

    def apply(self, part):
        self.calls += 1
        if self.outages:
            self.outages -= 1
            raise psycopg.OperationalError("connection refused")
        for _, p, o, event in part:
            if event in self.invalid:
                raise InvalidEvent("health.events", p, o, "bad payload")
            if event in self.poison:
                raise pg.NumericValueOutOfRange("bigint out of range")
        self.rows += part  # all or nothing, as one transaction


def batch(n):
    return [("health.events", i % 2, i, f"e{i}") for i in range(n)]


def test_a_poisoned_event_is_isolated_and_the_rest_applied_in_order():
    store, rejected, waits = Store(poison={"e6", "e13"}), [], []
    count = apply_isolating(store.apply, batch(20), lambda e, r: rejected.append((e, r)), waits.append)
    assert count == 2 and not waits
    assert [e[2] for e, _ in rejected] == [6, 13]
    assert rejected[0][1].startswith("unstorable: NumericValueOutOfRange: bigint out of range")
    # every offset is recorded once, in log order; the refused ones as None
    assert [r[2] for r in store.rows] == list(range(20))
    assert [r[3] for r in store.rows if r[3] is None] == [None, None]
    assert store.calls < 20  # halving, not one call per event


def test_a_dependency_that_is_down_is_waited_for_and_nothing_is_rejected():
    store, waits = Store(outages=3), []
    assert apply_isolating(store.apply, batch(5), lambda *a: pytest.fail("rejected"), waits.append) == 0
    assert len(waits) == 3 and [r[3] for r in store.rows] == [f"e{i}" for i in range(5)]


def test_an_invalid_event_is_named_by_the_projector_itself():
    store, rejected = Store(invalid={"e3"}), []
    assert apply_isolating(store.apply, batch(8), lambda e, r: rejected.append((e, r)), lambda exc: None) == 1
    assert rejected == [(("health.events", 1, 3, "e3"), "invalid: bad payload")]
    assert store.calls == 2


def test_only_data_errors_are_permanent():
    assert is_permanent(pg.NumericValueOutOfRange("x"))
    assert is_permanent(pg.CharacterNotInRepertoire("x"))
    assert is_permanent(pg.UniqueViolation("x"))
    assert not is_permanent(psycopg.OperationalError("connection refused"))
    assert not is_permanent(pg.DeadlockDetected("x"))
    assert not is_permanent(RuntimeError("a bug is retried, never blamed on an event"))
    assert is_permanent(AnalyticsStoreError("DateTime out of range", code=321))
    assert not is_permanent(AnalyticsStoreError("gone", code=321, retryable=True))
    assert not is_permanent(AnalyticsStoreError("too many parts", code=252))
    assert reason_of(AnalyticsStoreError("a\n  b", code=6)) == "unstorable: AnalyticsStoreError: a b"


def test_freshness_positions_and_lag():
    from projections.freshness import behind, positions_text, reached

    assert positions_text({1: 40, 0: 12}) == "0:12,1:40"
    assert behind({0: 15, 1: 40, 2: 3}, {0: 12, 1: 41}) == 3 + 0 + 3
    assert reached({0: 15, 1: 40}, {0: 15, 1: 39})
    assert not reached({0: 15}, {0: 15, 1: 1})


def test_a_batch_refused_everywhere_is_not_dead_lettered_one_by_one():
    # Every event refused: a cause outside the events. After MAX_REJECTS it waits as for an outage.
    from projections.faults import MAX_REJECTS

    store, rejected = Store(poison={f"e{i}" for i in range(100)}), []

    def give_up(exc):
        raise TimeoutError("the test stops the wait")

    with pytest.raises(TimeoutError):
        apply_isolating(store.apply, batch(100), lambda e, r: rejected.append(e), give_up)
    assert len(rejected) == MAX_REJECTS

"""The pure parts of the ClickHouse analytics (issue 6): no server, no chDB.

The timeline of a person's doses (projections.clickhouse.shaping.timeline) against
DESIGN §4 by definition, and the sink's reading of an event (shape) against the
PostgreSQL projector's (_prepare). The engines themselves are tested in
tests/stack/test_analytics.py.
"""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from projections.clickhouse.rollups import packed
from projections.clickhouse.schema import NEVER_MS, PEOPLE
from projections.clickhouse.shaping import Fact, shape, timeline
from projections.counting import DOSE
from projections.postgres.projector import InvalidEvent, _prepare
from schemas.topics import TOPIC_EVENTS
from tests.strategies import avro_records

NEVER = NEVER_MS


def _state_at(doses: dict, t: float) -> tuple[str | None, str | None]:
    """DESIGN §4 by definition: the counted doses at as_of t, the earliest's province, fully or not."""
    alive = sorted((d[0], k, d) for k, d in doses.items() if d[0] < t and not d[3] < t)
    if not alive:
        return None, None
    province = alive[0][2][1]
    fully = len(alive) >= 2 or any(d[2] for _, _, d in alive)
    return province, province if fully else None


@hsettings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 20),
            st.sampled_from(["01", "79", "48"]),
            st.booleans(),
            st.one_of(st.just(NEVER), st.integers(0, 22)),
        ),
        max_size=5,
    )
)
def test_timeline_points_sum_to_the_state_at_every_time(raw):
    doses = {f"{i:08x}-0000-4000-8000-000000000000": (t, p, int(j), v) for i, (t, p, j, v) in enumerate(raw)}
    points = timeline(doses)
    for t in [x + 0.5 for x in range(-1, 24)]:
        people = {code: 0 for code in ("01", "79", "48")}
        fully = dict(people)
        for c, kind, code, delta in points:
            if c < t:
                (people if kind == PEOPLE else fully)[code] += delta
        province, full = _state_at(doses, t)
        assert people == {c: int(c == province) for c in people}, (t, sorted(points))
        assert fully == {c: int(c == full) for c in fully}, (t, sorted(points))


@hsettings(max_examples=200, deadline=None)
@given(avro_records())
def test_figure_view_is_the_projectors(pair):
    """The sink reads an event exactly as the PostgreSQL projector does (kind, province, flag, doses…)."""
    _, record = pair
    shaped = shape([(0, 7, record)], {})
    try:
        ((_, _, event_id, row, void, _, _),) = _prepare([(TOPIC_EVENTS, 0, 7, record)])
    except InvalidEvent:
        assert shaped.skipped == 1 and shaped[0] == []
        return
    event_rows, index_rows, void_rows, facts, voids = shaped
    assert len(event_rows) == 1
    if row is None:
        assert facts == {} and index_rows == []
        assert (void is None) == (voids == {})
        if void is not None:
            assert voids[event_id][0] == void[0]
        return
    fact = Fact(*facts[event_id])
    _, kind, province, us, subject, vaccine, number, _, flag, amount, _, _, _ = row
    assert (fact.kind, fact.province, fact.t_ms) == (kind, province, us // 1000)
    assert fact.flag == (1 if flag else 0) and fact.amount == (amount or 0)
    if kind == DOSE:
        assert (fact.subject, fact.vaccine, fact.dose_number) == (subject, vaccine, number)


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=40), st.integers(min_value=1, max_value=600))
def test_stale_days_are_packed_in_order_within_the_dose_budget(counts, budget):
    """doses_daily recomputes runs of days together: every day once, in order, and a run over
    the budget only when it is a single day."""
    days = [(date(2021, 7, 1) + timedelta(days=i), [i]) for i in range(len(counts))]
    doses = {day: n for (day, _), n in zip(days, counts)}
    groups = packed(days, doses, budget)
    assert [d for g in groups for d in g] == days
    for g in groups:
        assert g and (len(g) == 1 or sum(doses[day] for day, _ in g) <= budget)

"""The simulator: determinism, well-formed events, and expected figures equal to an
independent brute-force reading of the emitted stream (DESIGN §4, literally).

Pure logic, no services: small scales keep this fast.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timedelta
from functools import cache

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.simulator import simulate, write
from schemas.figures import FIGURES
from schemas.reference import provinces

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
CITIZEN_ID = re.compile(r"^(\d{9}|\d{12})$")
CITIZEN_TYPES = {
    "HealthDeclarationSubmitted",
    "VaccinationRegistered",
    "AppointmentScheduled",
    "CheckedIn",
    "DoseAdministered",
    "AdverseEventReported",
}


@cache
def national_events(seed: int, days: int = 2, daily_doses: int = 5_000) -> tuple[dict, ...]:
    return tuple(simulate("national", seed=seed, days=days, daily_doses=daily_doses).events())


@cache
def hcmc_events(seed: int = 2021, scale: float = 0.01) -> tuple[dict, ...]:
    return tuple(simulate("hcmc-2021-06", seed=seed, scale=scale).events())


def t(ev_or_text) -> datetime:
    text = ev_or_text["occurred_at"] if isinstance(ev_or_text, dict) else ev_or_text
    return datetime.fromisoformat(text)


# ---------------------------------------------------------------- the reference projector


def reference(events, as_of: datetime | None = None) -> dict:
    """DESIGN §4 read literally from the events alone: duplicates of an event_id count once, a voided
    event never happened (if the void occurred before as_of), a person counts in the province of
    their earliest valid dose by (occurred_at, event_id)."""
    seen: dict[str, dict] = {}
    for e in events:
        seen.setdefault(e["event_id"], e)
    live = [e for e in seen.values() if as_of is None or t(e) < as_of]
    voided = {e["payload"]["voided_event_id"] for e in live if e["event_type"] == "RecordVoided"}
    valid = [e for e in live if e["event_id"] not in voided and e["event_type"] != "RecordVoided"]

    refs = provinces()
    zero = lambda: {  # noqa: E731
        "registrations": 0,
        "declarations": 0,
        "declarations_with_symptoms": 0,
        "doses_administered": 0,
        "doses_by_number": Counter(),
        "doses_by_vaccine": Counter(),
        "people_vaccinated": 0,
        "people_fully_vaccinated": 0,
        "doses_allocated": 0,
        "adverse_events": 0,
        "serious_adverse_events": 0,
    }
    prov = {code: zero() for code in refs}
    doses_of: dict[str, list[dict]] = {}
    for e in valid:
        f, p = prov[e["province_code"]], e["payload"]
        et = e["event_type"]
        if et == "VaccinationRegistered":
            f["registrations"] += 1
        elif et == "HealthDeclarationSubmitted":
            f["declarations"] += 1
            f["declarations_with_symptoms"] += bool(p["symptoms"])
        elif et == "DoseAdministered":
            f["doses_administered"] += 1
            f["doses_by_number"][str(p["dose_number"])] += 1
            f["doses_by_vaccine"][p["vaccine"]] += 1
            doses_of.setdefault(p["citizen_id"], []).append(e)
        elif et == "VaccineAllocated":
            f["doses_allocated"] += p["doses"]
        elif et == "AdverseEventReported":
            f["adverse_events"] += 1
            f["serious_adverse_events"] += p["severity"] == "serious"
    for doses in doses_of.values():
        first = min(doses, key=lambda e: (t(e), e["event_id"]))
        f = prov[first["province_code"]]
        f["people_vaccinated"] += 1
        if len(doses) >= 2 or any(e["payload"]["vaccine"] == "janssen" for e in doses):
            f["people_fully_vaccinated"] += 1

    def finish(f: dict, population: int) -> dict:
        f["doses_by_number"] = {k: v for k, v in f["doses_by_number"].items() if v}
        f["doses_by_vaccine"] = {k: v for k, v in f["doses_by_vaccine"].items() if v}
        f["coverage_pct"] = f["people_vaccinated"] / population * 100
        f["full_coverage_pct"] = f["people_fully_vaccinated"] / population * 100
        f["doses_remaining"] = f["doses_allocated"] - f["doses_administered"]
        return f

    nat = zero()
    for f in prov.values():
        for k, v in f.items():
            nat[k] += v  # Counter + Counter for the two splits
    return {
        "national": finish(nat, sum(r.population for r in refs.values())),
        "provinces": {code: finish(f, refs[code].population) for code, f in prov.items()},
    }


def assert_same_figures(got: dict, want: dict, label: str = "") -> None:
    assert set(got["provinces"]) == set(want["provinces"]) == set(provinces())
    for scope, g, w in [("national", got["national"], want["national"])] + [
        (code, got["provinces"][code], want["provinces"][code]) for code in sorted(want["provinces"])
    ]:
        assert list(g) == list(FIGURES), f"{label} {scope}: figure names"
        for name in FIGURES:
            if name.endswith("_pct"):
                assert g[name] == pytest.approx(w[name], abs=1e-9), f"{label} {scope} {name}"
            else:
                assert g[name] == w[name], f"{label} {scope} {name}: {g[name]!r} != {w[name]!r}"


# ---------------------------------------------------------------- determinism and shape


def test_same_seed_same_events_different_seed_different():
    a = list(simulate("national", seed=7, days=1, daily_doses=2_000).events())
    b = list(simulate("national", seed=7, days=1, daily_doses=2_000).events())
    c = list(simulate("national", seed=8, days=1, daily_doses=2_000).events())
    assert a == b
    assert a != c
    assert {e["event_id"] for e in a}.isdisjoint({e["event_id"] for e in c})
    h1 = list(simulate("hcmc-2021-06", seed=3, scale=0.002).events())
    h2 = list(simulate("hcmc-2021-06", seed=3, scale=0.002).events())
    assert h1 == h2


def test_plan_only_replay_equals_the_rendering_pass():
    rendered = simulate("national", seed=11, days=1, daily_doses=3_000)
    events = list(rendered.events())
    planned = simulate("national", seed=11, days=1, daily_doses=3_000)
    assert planned.total_events == len(events) == rendered.total_events
    assert planned.expected() == rendered.expected()
    cut = planned.window[0] + timedelta(hours=12)
    assert planned.expected(cut) == rendered.expected(cut)


@pytest.mark.parametrize("which", ["national", "hcmc"])
def test_every_event_passes_the_gateway_validation(which):
    from schemas.models import validate_event  # the gateway's own validation

    events = national_events(1) if which == "national" else hcmc_events()
    for i, e in enumerate(events):
        validated, errors = validate_event(e)
        assert validated is not None and not errors, f"event #{i} {e}: {errors}"


@pytest.mark.parametrize("which", ["national", "hcmc"])
def test_events_are_well_formed(which):
    events = national_events(1) if which == "national" else hcmc_events()
    codes = set(provinces())
    for e in events:
        assert list(e) == ["event_id", "event_type", "occurred_at", "province_code", "source", "payload"]
        assert UUID.match(e["event_id"]), e
        assert RFC3339.match(e["occurred_at"]) and e["occurred_at"].endswith("+07:00"), e
        assert t(e).year == 2021
        assert e["province_code"] in codes
        assert 1 <= len(e["source"]) <= 64
        p = e["payload"]
        if e["event_type"] in CITIZEN_TYPES:
            assert CITIZEN_ID.match(p["citizen_id"]), e
        if e["event_type"] == "AppointmentScheduled":
            assert t(p["slot_end"]) > t(p["slot_start"]), e
            assert t(p["slot_end"]) - t(p["slot_start"]) in (timedelta(minutes=m) for m in (30, 45, 60))
        if e["event_type"] in ("DoseAdministered", "AppointmentScheduled"):
            assert 1 <= p["dose_number"] <= 5
        if e["event_type"] == "CheckedIn":
            assert p["appointment_id"]
        if e["event_type"] == "VaccineAllocated":
            assert p["doses"] > 0


@pytest.mark.parametrize("which", ["national", "hcmc"])
def test_no_duplicates_and_every_void_follows_its_target(which):
    events = national_events(2) if which == "national" else hcmc_events(seed=5)
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    position = {eid: i for i, eid in enumerate(ids)}
    by_id = {e["event_id"]: e for e in events}
    voids = [e for e in events if e["event_type"] == "RecordVoided"]
    assert voids
    for i, v in enumerate(events):
        if v["event_type"] != "RecordVoided":
            continue
        target = by_id.get(v["payload"]["voided_event_id"])
        assert target is not None, v
        assert target["event_type"] != "RecordVoided"
        assert position[target["event_id"]] < i
        assert t(target) < t(v)
        assert target["province_code"] == v["province_code"]
        assert v["payload"]["reason"].startswith("entered in error: ")
    # about 0.5% of records are re-entered, and a few doses are voided outright
    share = len(voids) / (len(events) - len(voids))
    assert 0.003 < share < 0.02, share
    targets = Counter(by_id[v["payload"]["voided_event_id"]]["event_type"] for v in voids)
    assert {
        "DoseAdministered",
        "VaccinationRegistered",
        "HealthDeclarationSubmitted",
        "AppointmentScheduled",
        "CheckedIn",
    } <= set(targets)


def test_people_follow_a_realistic_sequence():
    events = hcmc_events(seed=9)
    valid_ids = {e["event_id"] for e in events} - {
        e["payload"]["voided_event_id"] for e in events if e["event_type"] == "RecordVoided"
    }
    per: dict[str, list[dict]] = {}
    for e in events:
        if e["event_id"] in valid_ids and "citizen_id" in e["payload"]:
            per.setdefault(e["payload"]["citizen_id"], []).append(e)
    assert all(cid.startswith("079") and len(cid) == 12 for cid in per)
    order = [
        "VaccinationRegistered",
        "AppointmentScheduled",
        "HealthDeclarationSubmitted",
        "CheckedIn",
        "DoseAdministered",
    ]
    for cid, evs in per.items():
        visits = [e for e in evs if e["event_type"] in order]
        visits.sort(key=lambda e: (t(e), order.index(e["event_type"])))
        kinds = [e["event_type"] for e in visits]
        assert kinds[0] == "VaccinationRegistered", (cid, kinds)
        doses = [e for e in visits if e["event_type"] == "DoseAdministered"]
        for dose in doses:  # each dose comes after a check-in with the appointment of the same site
            checkins = [e for e in visits if e["event_type"] == "CheckedIn" and t(e) < t(dose)]
            assert checkins and checkins[-1]["payload"]["site_id"] == dose["payload"]["site_id"]
        if len(doses) == 2:
            assert t(doses[1]) - t(doses[0]) >= timedelta(weeks=4)
            assert [d["payload"]["dose_number"] for d in doses] == [1, 2]


# ---------------------------------------------------------------- the hcmc scenario's totals


def test_hcmc_at_full_scale_has_the_historical_totals():
    sim = simulate("hcmc-2021-06")
    assert sim.planned_doses == 804_000
    start, end = sim.window
    assert (start.date().isoformat(), end.date().isoformat()) == ("2021-06-19", "2021-06-24")
    before, after = sim.expected(start), sim.expected(end)
    hcm = after["provinces"]["79"]
    assert hcm["doses_allocated"] == 836_000 == before["provinces"]["79"]["doses_allocated"]
    in_window = hcm["doses_administered"] - before["provinces"]["79"]["doses_administered"]
    assert abs(in_window - 804_000) <= 8_040, in_window
    assert hcm["doses_by_vaccine"]["astrazeneca"] > 0.95 * hcm["doses_administered"]
    assert 0.01 < hcm["doses_by_number"]["2"] / hcm["doses_administered"] < 0.03
    assert 0.001 < hcm["adverse_events"] / hcm["doses_administered"] < 0.003
    others = [f for code, f in after["provinces"].items() if code != "79"]
    assert all(f["doses_administered"] == f["registrations"] == f["doses_allocated"] == 0 for f in others)
    assert after["national"]["doses_administered"] == hcm["doses_administered"]


def test_hcmc_allocations_are_the_three_recipients():
    events = hcmc_events(scale=0.05)
    voided = {e["payload"]["voided_event_id"] for e in events if e["event_type"] == "RecordVoided"}
    allocations = [e for e in events if e["event_type"] == "VaccineAllocated" and e["event_id"] not in voided]
    assert sorted((e["payload"]["recipient"], e["payload"]["doses"]) for e in allocations) == [
        ("armed_forces", 1_500),
        ("police", 1_000),
        ("province_health", 39_300),
    ]
    assert {e["province_code"] for e in allocations} == {"79"}
    assert {e["payload"]["vaccine"] for e in allocations} == {"astrazeneca"}
    assert all(t(e) < datetime.fromisoformat("2021-06-19T00:00:00+07:00") for e in allocations)


# ---------------------------------------------------------------- expected figures vs the reference


def edge_cases(events) -> dict[str, int]:
    """How often the tricky cases occur in a stream (so the comparison below means something)."""
    by_id = {e["event_id"]: e for e in events}
    voids = [e for e in events if e["event_type"] == "RecordVoided"]
    voided = {v["payload"]["voided_event_id"]: v for v in voids}
    doses: dict[str, list[dict]] = {}
    for e in events:
        if e["event_type"] == "DoseAdministered":
            doses.setdefault(e["payload"]["citizen_id"], []).append(e)
    cross = moved = ties_across = 0
    for evs in doses.values():
        provs = {e["province_code"] for e in evs}
        if len(provs) > 1:
            cross += 1
            first = min(evs, key=lambda e: (t(e), e["event_id"]))
            if first["event_id"] in voided and any(e["event_id"] not in voided for e in evs):
                moved += 1
        times = Counter(t(e) for e in evs)
        ties_across += any(
            n > 1 and len({e["province_code"] for e in evs if t(e) == ts}) > 1 for ts, n in times.items()
        )
    reasons = Counter(v["payload"]["reason"] for v in voids)
    return {
        "cross_province_people": cross,
        "earliest_dose_voided_province_moves": moved,
        "same_time_doses_in_two_provinces": ties_across,
        "wrong_vaccine_reentries": reasons["entered in error: wrong vaccine"],
        "wrong_time_reentries": reasons["entered in error: wrong time"],
        "allocation_voids": sum(
            by_id[v["payload"]["voided_event_id"]]["event_type"] == "VaccineAllocated" for v in voids
        ),
        "janssen": sum(e["payload"]["vaccine"] == "janssen" for evs in doses.values() for e in evs),
        "adverse_events": sum(e["event_type"] == "AdverseEventReported" for e in events),
    }


def cutoffs(sim, events) -> list[datetime | None]:
    """None, the window's edges and noon of each day, and either side of each first-dose void."""
    start, end = sim.window
    cuts: list[datetime | None] = [None, start, end, start - timedelta(days=40)]
    cuts += [start + timedelta(days=d, hours=12) for d in range(sim.days)]
    by_id = {e["event_id"]: e for e in events}
    first_dose_voids = [
        v
        for v in events
        if v["event_type"] == "RecordVoided"
        and by_id[v["payload"]["voided_event_id"]]["event_type"] == "DoseAdministered"
        and by_id[v["payload"]["voided_event_id"]]["payload"]["dose_number"] == 1
    ]
    for v in first_dose_voids[:3]:
        cuts += [t(v), t(v) + timedelta(seconds=1)]  # the void counts only strictly before as_of
    # just after two doses of one person at the same instant in two provinces: the tie-break decides
    at: dict[tuple[str, datetime], set[str]] = {}
    for e in events:
        if e["event_type"] == "DoseAdministered":
            at.setdefault((e["payload"]["citizen_id"], t(e)), set()).add(e["province_code"])
    ties = sorted(ts for (_, ts), provs in at.items() if len(provs) > 1)
    cuts += [ts + timedelta(seconds=1) for ts in ties[:2]]
    return cuts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_expected_figures_equal_the_reference_national(seed):
    sim = simulate("national", seed=seed, days=2, daily_doses=5_000)
    events = national_events(seed)
    cases = edge_cases(events)
    assert all(cases.values()), cases  # every tricky case is exercised at this size
    for cut in cutoffs(sim, events):
        assert_same_figures(sim.expected(cut), reference(events, cut), f"seed {seed} as_of {cut}")


def test_expected_figures_equal_the_reference_with_second_doses_in_the_window():
    # 35 days: second doses of people first vaccinated inside the window, some elsewhere
    sim = simulate("national", seed=4, days=35, daily_doses=300, start=datetime(2021, 7, 1).date())
    events = list(sim.events())
    assert len(events) == sim.total_events
    citizens_in_window: dict[str, list[dict]] = {}
    start = sim.window[0]
    for e in events:
        if e["event_type"] == "DoseAdministered" and t(e) >= start:
            citizens_in_window.setdefault(e["payload"]["citizen_id"], []).append(e)
    both = [evs for evs in citizens_in_window.values() if {d["payload"]["dose_number"] for d in evs} == {1, 2}]
    assert len(both) > 50
    assert any(len({d["province_code"] for d in evs}) > 1 for evs in both)
    for cut in cutoffs(sim, events)[:8]:
        assert_same_figures(sim.expected(cut), reference(events, cut), f"as_of {cut}")


def test_expected_figures_equal_the_reference_hcmc():
    sim = simulate("hcmc-2021-06", scale=0.01)
    events = hcmc_events()
    for cut in cutoffs(sim, events):
        assert_same_figures(sim.expected(cut), reference(events, cut), f"as_of {cut}")


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32), hours=st.integers(min_value=-48, max_value=24 * 5))
def test_expected_figures_equal_the_reference_any_seed(seed, hours):
    sim = simulate("national", seed=seed, days=1, daily_doses=1_500)
    events = list(sim.events())
    cut = sim.window[0] + timedelta(hours=hours)
    assert_same_figures(sim.expected(cut), reference(events, cut), f"seed {seed} as_of {cut}")
    assert_same_figures(sim.expected(), reference(events), f"seed {seed}")


def test_as_of_needs_an_offset():
    sim = simulate("national", seed=1, days=1, daily_doses=100)
    with pytest.raises(ValueError):
        sim.expected(datetime(2021, 8, 2))
    assert sim.expected("2021-08-02T00:00:00+07:00") == sim.expected(datetime.fromisoformat("2021-08-01T17:00:00Z"))


def test_write_emits_jsonl_and_expected(tmp_path):
    sim = simulate("national", seed=5, days=1, daily_doses=1_000)
    summary = write(sim, tmp_path, progress=False)
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert summary["events"] == len(lines) == sim.total_events
    assert [orjson.loads(x) for x in lines] == list(sim.events())
    expected = json.loads((tmp_path / "expected.json").read_text())
    assert expected["scenario"]["scenario"] == "national"
    assert {"national": expected["national"], "provinces": expected["provinces"]} == sim.expected()

"""The PostgreSQL projections against a real PostgreSQL (DESIGN §4, §7).

Figures are checked against `reference()`, a dict-based computation that
follows DESIGN §4 literally. Each test works in a namespace of its own.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.postgres import read_models
from projections.postgres.projector import BatchResult, InvalidEvent, Projector
from schemas.reference import provinces

pytestmark = pytest.mark.stack

T0 = datetime(2021, 6, 1, tzinfo=UTC)
GROUP = "test-projections"
TOPIC = "health.events"
SCALARS = (
    "registrations",
    "declarations",
    "declarations_with_symptoms",
    "doses_administered",
    "people_vaccinated",
    "people_fully_vaccinated",
    "doses_allocated",
    "adverse_events",
    "serious_adverse_events",
)


# -- events, as the Avro codec returns them (decoded, without citizen_id) ------------


def _event(
    event_type: str, province: str, subject: str | None, payload: dict, minutes: float = 0, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": T0 + timedelta(minutes=minutes),
        "province_code": province,
        "source": "test",
        "subject_id": subject,
        "trace_id": None,
        "payload": payload,
    }


def declaration(province="79", symptoms=(), subject="s-decl", minutes=0, event_id=None):
    payload = {"symptoms": list(symptoms), "contact_with_confirmed_case": False, "channel": "app"}
    return _event("HealthDeclarationSubmitted", province, subject, payload, minutes, event_id)


def registration(province="79", subject="s-reg", minutes=0, event_id=None):
    payload = {"birth_year": 1980, "sex": "female", "priority_group": "general", "channel": "app"}
    return _event("VaccinationRegistered", province, subject, payload, minutes, event_id)


def appointment(province="79", subject="s-appt", minutes=0, event_id=None):
    payload = {
        "appointment_id": "a1",
        "site_id": "site-1",
        "slot_start": T0,
        "slot_end": T0 + timedelta(hours=1),
        "dose_number": 1,
    }
    return _event("AppointmentScheduled", province, subject, payload, minutes, event_id)


def check_in(province="79", subject="s-appt", minutes=0, event_id=None):
    payload = {"site_id": "site-1", "appointment_id": None}
    return _event("CheckedIn", province, subject, payload, minutes, event_id)


def dose(subject, province="79", minutes=0, vaccine="pfizer", number=1, event_id=None, site="site-1"):
    payload = {"site_id": site, "vaccine": vaccine, "lot_number": "L1", "dose_number": number, "vaccinator_id": None}
    return _event("DoseAdministered", province, subject, payload, minutes, event_id)


def adverse(province="79", severity="mild", subject="s-ae", minutes=0, event_id=None):
    payload = {"severity": severity, "dose_event_id": None, "symptoms": ["fever"]}
    return _event("AdverseEventReported", province, subject, payload, minutes, event_id)


def allocation(
    province="79", doses=1000, vaccine="pfizer", recipient="province_health", allocation_id="alloc-1", event_id=None
):
    payload = {"allocation_id": allocation_id, "vaccine": vaccine, "doses": doses, "recipient": recipient}
    return _event("VaccineAllocated", province, None, payload, 0, event_id)


def void(target: dict, province="79", minutes=0, event_id=None):
    payload = {"voided_event_id": target["event_id"], "reason": "entered in error"}
    return _event("RecordVoided", province, None, payload, minutes, event_id)


# -- the reference: DESIGN §4, literally --------------------------------------------


def reference(events: list[dict]) -> dict[str, dict[str, Any]]:
    """{province: {figure: value}} with only non-zero figures (keyed ones as dicts)."""
    unique: dict[str, dict] = {}
    for e in events:  # a re-sent event_id is the same fact
        unique.setdefault(e["event_id"].lower(), e)
    voided = {e["payload"]["voided_event_id"].lower() for e in unique.values() if e["event_type"] == "RecordVoided"}
    # a void of a void has no effect: voided voids are still in force
    valid = [e for eid, e in unique.items() if eid not in voided and e["event_type"] != "RecordVoided"]

    figures: dict[str, Counter] = defaultdict(Counter)
    by_number: dict[str, Counter] = defaultdict(Counter)
    by_vaccine: dict[str, Counter] = defaultdict(Counter)
    doses_of: dict[str, list[dict]] = defaultdict(list)
    for e in valid:
        f, p, t = figures[e["province_code"]], e["payload"], e["event_type"]
        if t == "VaccinationRegistered":
            f["registrations"] += 1
        elif t == "HealthDeclarationSubmitted":
            f["declarations"] += 1
            f["declarations_with_symptoms"] += bool(p["symptoms"])
        elif t == "DoseAdministered":
            f["doses_administered"] += 1
            by_number[e["province_code"]][str(p["dose_number"])] += 1
            by_vaccine[e["province_code"]][p["vaccine"]] += 1
            doses_of[e["subject_id"]].append(e)
        elif t == "VaccineAllocated":
            f["doses_allocated"] += p["doses"]
        elif t == "AdverseEventReported":
            f["adverse_events"] += 1
            f["serious_adverse_events"] += p["severity"] == "serious"
    for doses in doses_of.values():
        earliest = min(doses, key=lambda e: (e["occurred_at"], uuid.UUID(e["event_id"])))
        f = figures[earliest["province_code"]]
        f["people_vaccinated"] += 1
        if len(doses) >= 2 or any(d["payload"]["vaccine"] == "janssen" for d in doses):
            f["people_fully_vaccinated"] += 1

    out: dict[str, dict[str, Any]] = {}
    for prov in set(figures) | set(by_number) | set(by_vaccine):
        d: dict[str, Any] = {k: v for k, v in figures[prov].items() if v}
        if by_number[prov]:
            d["doses_by_number"] = {k: v for k, v in by_number[prov].items() if v}
        if by_vaccine[prov]:
            d["doses_by_vaccine"] = {k: v for k, v in by_vaccine[prov].items() if v}
        if d:
            out[prov] = d
    return out


def reference_subjects(events: list[dict]) -> dict[str, tuple]:
    """{subject: (province of the earliest valid dose, its event_id, valid doses, fully)}."""
    unique: dict[str, dict] = {}
    for e in events:
        unique.setdefault(e["event_id"].lower(), e)
    voided = {e["payload"]["voided_event_id"].lower() for e in unique.values() if e["event_type"] == "RecordVoided"}
    doses_of: dict[str, list[dict]] = defaultdict(list)
    for eid, e in unique.items():
        if e["event_type"] == "DoseAdministered" and eid not in voided:
            doses_of[e["subject_id"]].append(e)
    out = {}
    for subject, doses in doses_of.items():
        first = min(doses, key=lambda e: (e["occurred_at"], uuid.UUID(e["event_id"])))
        fully = len(doses) >= 2 or any(d["payload"]["vaccine"] == "janssen" for d in doses)
        out[subject] = (first["province_code"], first["event_id"], len(doses), fully)
    return out


def projected_subjects(conn: psycopg.Connection, namespace: str) -> dict[str, tuple]:
    rows = conn.execute(
        f"SELECT subject_id, province, first_dose, valid_doses, fully FROM {namespace}.subjects WHERE valid_doses > 0"
    ).fetchall()
    return {s: (p, str(f), n, fully) for s, p, f, n, fully in rows}


def projected(conn: psycopg.Connection, namespace: str) -> dict[str, dict[str, Any]]:
    """The projection's figures in reference() form, read through read_models."""
    out = {}
    for p in read_models.all_provinces(conn, namespace, None):
        d = {k: p[k] for k in SCALARS if p[k]}
        for k in ("doses_by_number", "doses_by_vaccine"):
            if p[k]:
                d[k] = p[k]
        if d:
            out[p["province_code"]] = d
    return out


def check(conn, namespace, events):
    got, want = projected(conn, namespace), reference(events)
    assert got == want
    assert projected_subjects(conn, namespace) == reference_subjects(events)
    # national = sum over provinces
    nat = read_models.national_summary(conn, namespace, None)
    for k in SCALARS:
        assert nat[k] == sum(p.get(k, 0) for p in want.values()), k
    assert nat["doses_remaining"] == nat["doses_allocated"] - nat["doses_administered"]


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def dsn(stack_settings) -> str:
    return stack_settings.postgres_url


def new_namespace() -> str:
    return f"t_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def proj(dsn):
    p = Projector(dsn, new_namespace())
    p.ensure_schema()
    yield p
    p.drop_schema()
    p.close()


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


class Feed:
    """Assigns Kafka positions: each partition's offsets count up from 0."""

    def __init__(self, projector: Projector, topic: str = TOPIC):
        self.p, self.topic = projector, topic
        self.next: dict[int, int] = defaultdict(int)

    def messages(self, events, partition=0):
        out = []
        for e in events:
            out.append((self.topic, partition, self.next[partition], e))
            self.next[partition] += 1
        return out

    def apply(self, events, partition=0) -> BatchResult:
        return self.p.apply_batch(self.messages(events, partition), GROUP)


# -- each figure ---------------------------------------------------------------------


def test_every_figure(proj, conn):
    events = [
        registration("79"),
        registration("79"),
        registration("01"),
        declaration("79"),
        declaration("79", ["fever"]),
        declaration("01", ["cough", "fatigue"]),
        dose("a", "79", 1, "pfizer", 1),
        dose("a", "79", 2, "pfizer", 2),
        dose("b", "01", 1, "astrazeneca", 1),
        dose("c", "79", 1, "janssen", 1),
        adverse("79", "mild"),
        adverse("79", "serious"),
        adverse("01", "severe"),
        allocation("79", 804_000),
        allocation("79", 30_000, recipient="armed_forces", allocation_id="a2"),
        allocation("01", 5_000, vaccine="astrazeneca", allocation_id="a3"),
        appointment("79"),
        check_in("79"),
    ]
    r = Feed(proj).apply(events)
    assert r == BatchResult(applied=len(events), skipped_offsets=0, duplicates=0)

    hcm = read_models.province_summary(conn, proj.namespace, "79", None)
    assert hcm["province_code"] == "79" and hcm["name"] == provinces()["79"].name_vi
    assert {k: hcm[k] for k in (*SCALARS, "doses_by_number", "doses_by_vaccine", "doses_remaining")} == {
        "registrations": 2,
        "declarations": 2,
        "declarations_with_symptoms": 1,
        "doses_administered": 3,
        "people_vaccinated": 2,
        "people_fully_vaccinated": 2,
        "doses_allocated": 834_000,
        "adverse_events": 2,
        "serious_adverse_events": 1,
        "doses_by_number": {"1": 2, "2": 1},
        "doses_by_vaccine": {"janssen": 1, "pfizer": 2},
        "doses_remaining": 834_000 - 3,
    }
    assert hcm["coverage_pct"] == round(2 / hcm["population"] * 100, 6)
    assert hcm["full_coverage_pct"] == round(2 / hcm["population"] * 100, 6)

    nat = read_models.national_summary(conn, proj.namespace, None)
    assert nat["registrations"] == 3 and nat["declarations_with_symptoms"] == 2
    assert nat["doses_by_vaccine"] == {"astrazeneca": 1, "janssen": 1, "pfizer": 2}
    assert nat["people_vaccinated"] == 3 and nat["people_fully_vaccinated"] == 2
    assert nat["doses_allocated"] == 839_000 and nat["doses_remaining"] == 839_000 - 4
    assert nat["coverage_pct"] == round(3 / nat["population"] * 100, 6)
    check(conn, proj.namespace, events)


def test_all_provinces_and_populations(proj, conn):
    Feed(proj).apply([dose("a", "79")])
    provinces = read_models.all_provinces(conn, proj.namespace, None)
    assert len(provinces) == 63
    assert [p["province_code"] for p in provinces] == sorted(p["province_code"] for p in provinces)
    quiet = next(p for p in provinces if p["province_code"] == "01")
    assert quiet["doses_administered"] == 0 and quiet["doses_by_vaccine"] == {} and quiet["coverage_pct"] == 0.0
    assert isinstance(quiet["coverage_pct"], float) and isinstance(quiet["registrations"], int)
    pops = {code: 1000 for code in (p["province_code"] for p in provinces)}
    hcm = read_models.province_summary(conn, proj.namespace, "79", pops)
    assert hcm["population"] == 1000 and hcm["coverage_pct"] == 0.1
    assert read_models.province_summary(conn, proj.namespace, "00", None) is None
    assert list(read_models.national_summary(conn, proj.namespace, None))[1:] == list(read_models.FIGURES)


# -- duplicates ---------------------------------------------------------------------


def test_duplicates_count_once(proj, conn):
    feed = Feed(proj)
    d, r, a = dose("a", "79"), registration("79"), allocation("79", 100)
    # within one batch
    res = feed.apply([d, d, r, r, a, a])
    assert res == BatchResult(applied=3, skipped_offsets=0, duplicates=3)
    # redelivered later at different offsets, and on another partition
    assert feed.apply([dict(d), dict(r)]).duplicates == 2
    assert feed.apply([a, d], partition=3).duplicates == 2
    # upper-case event_id is the same uuid
    assert feed.apply([{**r, "event_id": r["event_id"].upper()}]).duplicates == 1
    check(conn, proj.namespace, [d, r, a])
    assert read_models.citizen_record(conn, proj.namespace, "a")["valid_doses"] == 1


def test_batch_reapplied_is_skipped_by_tracking(proj, conn):
    feed = Feed(proj)
    events = [dose("a", "79"), registration("01"), declaration("79", ["fever"])]
    msgs = feed.messages(events, partition=2)
    assert proj.apply_batch(msgs, GROUP).applied == 3
    assert proj.apply_batch(msgs, GROUP) == BatchResult(applied=0, skipped_offsets=3, duplicates=0)
    # a batch overlapping the recorded offset applies only the new part
    more = feed.messages([registration("01")], partition=2)
    assert proj.apply_batch(msgs[1:] + more, GROUP) == BatchResult(applied=1, skipped_offsets=2, duplicates=0)
    assert proj.positions(GROUP) == {(TOPIC, 2): 3}
    # another consumer group has its own record (and still counts each event once)
    assert proj.apply_batch(msgs, "other-group") == BatchResult(applied=0, skipped_offsets=0, duplicates=3)
    check(conn, proj.namespace, events + [more[0][3]])


def test_positions_and_wait_for(proj):
    feed = Feed(proj)
    assert proj.positions(GROUP) == {}
    feed.apply([registration()] * 1 + [registration()], partition=0)
    feed.apply([None, None, None], partition=5)  # consumed, nothing to apply: still recorded
    assert proj.positions(GROUP) == {(TOPIC, 0): 1, (TOPIC, 5): 2}
    proj.wait_for({(TOPIC, 0): 1, (TOPIC, 5): 2}, timeout=1)
    with pytest.raises(TimeoutError, match=r"health.events\[0\] at 1 < 2"):
        proj.wait_for({(TOPIC, 0): 2}, timeout=0.1)

    done = threading.Event()

    def waiter():
        proj.wait_for({(TOPIC, 0): 2}, timeout=10, consumer_group=GROUP)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(0.1)
    feed.apply([registration()], partition=0)
    t.join(5)
    assert done.is_set()


def _without_vaccine(e):
    del e["payload"]["vaccine"]


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (_without_vaccine, "vaccine"),
        (lambda e: e.update(event_id="not-a-uuid"), "UUID"),
        (lambda e: e.update(province_code=None), "province_code"),
        (lambda e: e["payload"].update(dose_number="2"), "dose_number"),
        (lambda e: e.update(occurred_at=datetime(2021, 6, 1)), "time zone"),
    ],
)
def test_invalid_event_is_refused_before_writing(proj, conn, spoil, reason):
    bad = dose("a", "79")
    spoil(bad)
    with pytest.raises(InvalidEvent) as e:
        proj.apply_batch([(TOPIC, 0, 0, registration()), (TOPIC, 0, 1, bad)], GROUP)
    assert (e.value.partition, e.value.offset) == (0, 1) and reason in str(e.value)
    assert proj.positions(GROUP) == {}
    assert projected(conn, proj.namespace) == {}


def test_epoch_millis_occurred_at(proj, conn):
    """schemas.codec returns occurred_at as epoch milliseconds by default."""
    early = dose("a", "01", minutes=1)
    late = dose("a", "79", minutes=2)
    late["occurred_at"] = int(late["occurred_at"].timestamp() * 1000)
    Feed(proj).apply([late, early])
    rec = read_models.citizen_record(conn, proj.namespace, "a")
    assert [d["province_code"] for d in rec["doses"]] == ["01", "79"]
    assert rec["doses"][1]["occurred_at"] == "2021-06-01T00:02:00Z"


# -- voids --------------------------------------------------------------------------


def _targets():
    return {
        "registrations": registration("79"),
        "declarations": declaration("79"),
        "declarations_with_symptoms": declaration("79", ["fever"]),
        "doses_administered": dose("v", "79", vaccine="janssen"),
        "doses_allocated": allocation("79", 500),
        "adverse_events": adverse("79", "mild"),
        "serious_adverse_events": adverse("79", "serious"),
    }


@pytest.mark.parametrize("order", ["void_after", "void_before", "same_batch", "same_batch_void_first"])
def test_void_makes_target_count_as_never_happened(proj, conn, order):
    targets = _targets()
    keep = [
        registration("79"),
        declaration("79", ["cough"]),
        dose("k", "79", vaccine="pfizer"),
        allocation("79", 7, allocation_id="keep"),
        adverse("79", "serious"),
    ]
    voids = [void(t) for t in targets.values()]
    feed = Feed(proj)
    feed.apply(keep)
    if order == "void_after":
        feed.apply(list(targets.values()), partition=0)
        check(conn, proj.namespace, keep + list(targets.values()))
        feed.apply(voids, partition=1)
    elif order == "void_before":
        feed.apply(voids, partition=1)
        check(conn, proj.namespace, keep + voids)
        feed.apply(list(targets.values()), partition=0)
    elif order == "same_batch":
        feed.apply(list(targets.values()) + voids)
    else:
        feed.apply(voids + list(targets.values()))
    check(conn, proj.namespace, keep + list(targets.values()) + voids)
    ref = reference(keep)["79"]
    assert projected(conn, proj.namespace)["79"] == ref
    assert ref["people_vaccinated"] == 1 and "people_fully_vaccinated" not in ref
    assert read_models.citizen_record(conn, proj.namespace, "v")["doses"] == []
    # the allocation ledger keeps the voided allocation, marked
    ledger = conn.execute(
        f"SELECT allocation_id, doses, voided FROM {proj.namespace}.allocations ORDER BY 1"
    ).fetchall()
    assert ledger == [("alloc-1", 500, True), ("keep", 7, False)]


def test_void_of_void_and_of_unknown_change_nothing(proj, conn):
    d = dose("a", "79")
    v = void(d)
    vv = void(v)  # decided: a void of a void has no effect; nothing is un-voided
    ghost = void({"event_id": str(uuid.uuid4())})
    appt = appointment("79")
    void_appt = void(appt)
    feed = Feed(proj)
    feed.apply([d, vv, ghost, void_appt, appt])
    feed.apply([v])
    assert projected(conn, proj.namespace) == {}
    feed.apply([v, vv], partition=1)  # redelivered voids are harmless
    check(conn, proj.namespace, [d, v, vv, ghost, appt, void_appt])
    assert projected(conn, proj.namespace) == {}


def test_the_record_keeps_visits_lots_and_serious_adverse_events_voids_honoured(proj, conn):
    """What a scan at a site shows: appointments and check-ins (once each, a voided one left out), a dose's lot,
    serious adverse events; none of them moves a figure."""
    d = dose("hb", "79")
    kept, voided = appointment("79", "hb"), appointment("79", "hb")
    voided["payload"] = voided["payload"] | {"appointment_id": "a2"}
    check_in = _event("CheckedIn", "79", "hb", {"site_id": "site-1", "appointment_id": "a1"}, 5)
    serious, mild = adverse("79", "serious", "hb"), adverse("79", "mild", "hb")
    feed = Feed(proj)
    feed.apply([d, kept, void(voided), check_in, serious, mild])
    feed.apply([voided, check_in, kept], partition=1)  # late target of a void, and re-deliveries
    record = read_models.citizen_record(conn, proj.namespace, "hb")
    assert [a["appointment_id"] for a in record["appointments"]] == ["a1"]
    assert [c["event_id"] for c in record["check_ins"]] == [check_in["event_id"]]
    assert record["check_ins"][0]["appointment_id"] == "a1" and record["doses"][0]["lot_number"] == "L1"
    assert record["adverse_events"] == 2 and [e["event_id"] for e in record["serious_adverse_events"]] == [
        serious["event_id"]
    ]
    feed.apply([void(serious), void(check_in)])
    record = read_models.citizen_record(conn, proj.namespace, "hb")
    assert record["serious_adverse_events"] == [] and record["check_ins"] == [] and record["adverse_events"] == 1
    subjects = conn.execute(f"SELECT subject_id, valid_doses FROM {proj.namespace}.subjects").fetchall()
    assert subjects == [("hb", 1)]  # voids of an adverse event or a visit touch no subject's dose state


def test_two_voids_of_one_target(proj, conn):
    d = dose("a", "79")
    feed = Feed(proj)
    feed.apply([d, void(d), void(d)])
    feed.apply([void(d)], partition=1)
    assert projected(conn, proj.namespace) == {}
    assert read_models.citizen_record(conn, proj.namespace, "a")["voided_doses"] == 1


# -- people_vaccinated and the earliest dose -------------------------------------------


def test_void_of_earliest_dose_moves_the_person(proj, conn):
    first, second = dose("a", "01", minutes=1, number=1), dose("a", "79", minutes=5, number=2)
    feed = Feed(proj)
    feed.apply([first, second])
    f = projected(conn, proj.namespace)
    assert f["01"]["people_vaccinated"] == 1 and f["01"]["people_fully_vaccinated"] == 1
    assert "people_vaccinated" not in f["79"]
    feed.apply([void(first)], partition=1)
    f = projected(conn, proj.namespace)
    assert "01" not in f
    assert f["79"]["people_vaccinated"] == 1 and "people_fully_vaccinated" not in f["79"]
    rec = read_models.citizen_record(conn, proj.namespace, "a")
    assert rec["counted_in_province"] == "79" and rec["voided_doses"] == 1 and not rec["fully_vaccinated"]
    check(conn, proj.namespace, [first, second, void(first)])


def test_late_earlier_dose_moves_the_person(proj, conn):
    later, earlier = dose("a", "79", minutes=10, number=2), dose("a", "01", minutes=1, number=1)
    feed = Feed(proj)
    feed.apply([later])  # dose 2 before dose 1 still counts
    f = projected(conn, proj.namespace)
    assert f == {
        "79": {
            "doses_administered": 1,
            "people_vaccinated": 1,
            "doses_by_number": {"2": 1},
            "doses_by_vaccine": {"pfizer": 1},
        }
    }
    feed.apply([earlier])
    f = projected(conn, proj.namespace)
    assert f["01"]["people_vaccinated"] == 1 and f["01"]["people_fully_vaccinated"] == 1
    assert "people_vaccinated" not in f["79"] and f["79"]["doses_administered"] == 1
    rec = read_models.citizen_record(conn, proj.namespace, "a")
    assert [d["dose_number"] for d in rec["doses"]] == [1, 2]
    assert rec["earliest_dose_event_id"] == earlier["event_id"]


def test_ties_on_occurred_at_broken_by_event_id(proj, conn):
    ids = sorted(str(uuid.uuid4()) for _ in range(2))
    a = dose("a", "79", minutes=3, event_id=ids[1])
    b = dose("a", "01", minutes=3, event_id=ids[0])
    Feed(proj).apply([a, b])
    assert projected(conn, proj.namespace)["01"]["people_vaccinated"] == 1
    check(conn, proj.namespace, [a, b])


def test_janssen_single_dose_is_fully_vaccinated(proj, conn):
    feed = Feed(proj)
    feed.apply([dose("j", "79", vaccine="janssen"), dose("p", "79", vaccine="pfizer")])
    f = projected(conn, proj.namespace)["79"]
    assert f["people_vaccinated"] == 2 and f["people_fully_vaccinated"] == 1
    assert read_models.citizen_record(conn, proj.namespace, "j")["fully_vaccinated"] is True
    assert read_models.citizen_record(conn, proj.namespace, "nobody") is None


def test_citizen_record(proj, conn):
    d2 = dose("a", "79", minutes=30, number=2, vaccine="moderna", site="site-9")
    d1 = dose("a", "79", minutes=1, number=1, vaccine="moderna", site="site-3")
    wrong = dose("a", "79", minutes=15, number=2)
    Feed(proj).apply([d2, wrong, d1, void(wrong)])
    rec = read_models.citizen_record(conn, proj.namespace, "a")
    assert rec["doses"] == [
        {
            "event_id": d1["event_id"],
            "occurred_at": "2021-06-01T00:01:00Z",
            "province_code": "79",
            "vaccine": "moderna",
            "dose_number": 1,
            "site_id": "site-3",
            "lot_number": "L1",
        },
        {
            "event_id": d2["event_id"],
            "occurred_at": "2021-06-01T00:30:00Z",
            "province_code": "79",
            "vaccine": "moderna",
            "dose_number": 2,
            "site_id": "site-9",
            "lot_number": "L1",
        },
    ]
    assert rec["valid_doses"] == 2 and rec["voided_doses"] == 1 and rec["fully_vaccinated"]


# -- any order, any batching, any interleaving, with duplicates -------------------------


@st.composite
def histories(draw):
    """Events over few subjects, provinces and instants, so ties and collisions happen.

    Event ids are drawn too, so that a failing example replays exactly.
    """
    n = draw(st.integers(1, 40))
    events: list[dict] = []
    subjects = ["s1", "s2", "s3", "s4"]
    provinces = ["01", "79", "48"]
    for i in range(n):
        kind = draw(
            st.sampled_from(["dose", "dose", "dose", "void", "void", "decl", "reg", "adverse", "alloc", "appt"])
        )
        prov = draw(st.sampled_from(provinces))
        minutes = draw(st.integers(0, 4))
        eid = str(draw(st.uuids()))
        if kind == "dose":
            e = dose(
                draw(st.sampled_from(subjects)),
                prov,
                minutes,
                draw(st.sampled_from(["pfizer", "janssen"])),
                draw(st.integers(1, 3)),
                event_id=eid,
            )
        elif kind == "void":
            # mostly an earlier event (any type, voids too), else an id never seen
            if events and draw(st.integers(0, 3)) > 0:
                target = draw(st.sampled_from(events))
            else:
                target = {"event_id": str(draw(st.uuids()))}
            e = void(target, prov, minutes, event_id=eid)
        elif kind == "decl":
            e = declaration(prov, draw(st.sampled_from([[], ["fever"]])), minutes=minutes, event_id=eid)
        elif kind == "reg":
            e = registration(prov, minutes=minutes, event_id=eid)
        elif kind == "adverse":
            e = adverse(prov, draw(st.sampled_from(["mild", "serious"])), minutes=minutes, event_id=eid)
        elif kind == "alloc":
            e = allocation(prov, draw(st.integers(1, 1000)), allocation_id=f"a{i}", event_id=eid)
        else:
            e = appointment(prov, minutes=minutes, event_id=eid)
        events.append(e)
    return events


@st.composite
def deliveries(draw):
    """A history delivered through 2–3 partitions, in batches, interleaved, with duplicates."""
    events = draw(histories())
    order = draw(st.permutations(events))
    dups = draw(st.lists(st.sampled_from(events), max_size=8))
    stream = list(order)
    for d in dups:
        stream.insert(draw(st.integers(0, len(stream))), dict(d))
    n_parts = draw(st.integers(2, 3))
    queues: dict[int, list] = {p: [] for p in range(n_parts)}
    for e in stream:
        p = draw(st.integers(0, n_parts - 1))
        queues[p].append((TOPIC, p, len(queues[p]), e))
    batches = []
    cursor = {p: 0 for p in queues}
    while any(cursor[p] < len(queues[p]) for p in queues):
        p = draw(st.sampled_from([p for p in queues if cursor[p] < len(queues[p])]))
        size = draw(st.integers(1, 10))
        batch = queues[p][cursor[p] : cursor[p] + size]
        cursor[p] += size
        batches.append(batch)
        if draw(st.integers(0, 5)) == 0:  # redelivered after a "crash": skipped by the tracking record
            batches.append(batch)
    return events, batches


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(deliveries())
def test_any_order_batching_and_duplicates_give_the_reference_figures(dsn, delivery):
    events, batches = delivery
    p = Projector(dsn, new_namespace())
    p.ensure_schema()
    try:
        for b in batches:
            p.apply_batch(b, GROUP)
        with psycopg.connect(dsn, autocommit=True) as c:
            check(c, p.namespace, events)
    finally:
        p.drop_schema()
        p.close()


# -- concurrent workers -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_concurrent_workers_give_the_reference_figures(dsn, conn, seed):
    """Two workers on different partitions, voids in one and their targets in the other.

    Doses of one subject are spread over both partitions too, which is harsher
    than production (where a subject's events share a partition).
    """
    rng = random.Random(seed)
    ns = new_namespace()
    setup = Projector(dsn, ns)
    setup.ensure_schema()
    try:
        subjects = [f"subj{i}" for i in range(12)]
        provinces = ["01", "79", "48", "92"]
        part = {0: [], 1: []}
        events = []
        for i in range(3000):
            kind = rng.random()
            prov = rng.choice(provinces)
            if kind < 0.55:
                e = dose(
                    rng.choice(subjects),
                    prov,
                    rng.randint(0, 50),
                    rng.choice(["pfizer", "janssen", "moderna"]),
                    rng.randint(1, 3),
                )
            elif kind < 0.7:
                e = registration(prov)
            elif kind < 0.8:
                e = allocation(prov, rng.randint(1, 100), allocation_id=f"a{i}")
            elif kind < 0.85:
                e = adverse(prov, rng.choice(["mild", "serious"]))
            elif events:
                # mostly a recent dose, so the void races its target and the subject's other doses
                recent = events[-40:]
                doses = [x for x in recent if x["event_type"] == "DoseAdministered"]
                e = void(rng.choice(doses) if doses and rng.random() < 0.8 else rng.choice(events))
            else:
                e = registration(prov)
            events.append(e)
            # facts mostly on partition 0, voids mostly on partition 1
            p = (
                (1 if rng.random() < 0.9 else 0)
                if e["event_type"] == "RecordVoided"
                else (0 if rng.random() < 0.8 else 1)
            )
            part[p].append(e)
            if rng.random() < 0.05:
                part[1 - p].append(e)  # a duplicate on the other partition

        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def worker(p: int):
            try:
                projector = Projector(dsn, ns)
                msgs = [(TOPIC, p, i, e) for i, e in enumerate(part[p])]
                barrier.wait()
                i = 0
                r = random.Random(seed * 10 + p)
                while i < len(msgs):
                    n = r.randint(1, 40)
                    projector.apply_batch(msgs[i : i + n], GROUP)
                    i += n
                projector.close()
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(p,)) for p in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        check(conn, ns, events)
        assert setup.positions(GROUP) == {(TOPIC, 0): len(part[0]) - 1, (TOPIC, 1): len(part[1]) - 1}
    finally:
        setup.drop_schema()
        setup.close()


# -- races, made deterministic --------------------------------------------------------
# A statement trigger on counters (the last write of a batch) makes one worker
# sleep while it holds every lock of its batch, uncommitted; the other worker
# then runs into exactly that window.

SLOW = "slow-worker"


def _slow_down(conn, namespace: str, seconds: float = 0.6) -> None:
    conn.execute(f"""
        CREATE FUNCTION {namespace}.slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('application_name') = '{SLOW}' THEN PERFORM pg_sleep({seconds}); END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER slow BEFORE INSERT ON {namespace}.counters
            FOR EACH STATEMENT EXECUTE FUNCTION {namespace}.slow();
    """)


def _in_slow_window(conn) -> None:
    for _ in range(500):
        if conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event = 'PgSleep'", (SLOW,)
        ).fetchone():
            return
        time.sleep(0.01)
    raise AssertionError("the slow worker never reached its window")


def _race(dsn, conn, namespace, slow_batch, fast_batch) -> None:
    slow = Projector(lambda: psycopg.connect(dsn, application_name=SLOW), namespace)
    fast = Projector(dsn, namespace)
    errors = []

    def run():
        try:
            slow.apply_batch(slow_batch, GROUP)
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    _in_slow_window(conn)
    fast.apply_batch(fast_batch, GROUP)
    t.join(30)
    slow.close()
    fast.close()
    assert not errors, errors


@pytest.mark.parametrize("slow", ["target", "void"])
def test_void_racing_its_target(proj, conn, dsn, slow):
    _slow_down(conn, proj.namespace)
    d = dose("a", "79", minutes=1)
    r = registration("79")
    keep = dose("a", "01", minutes=5)
    Feed(proj).apply([keep], partition=9)
    targets = [(TOPIC, 0, 0, d), (TOPIC, 0, 1, r)]
    voids = [(TOPIC, 1, 0, void(d)), (TOPIC, 1, 1, void(r))]
    if slow == "target":
        _race(dsn, conn, proj.namespace, targets, voids)
    else:
        _race(dsn, conn, proj.namespace, voids, targets)
    check(conn, proj.namespace, [keep, d, r, voids[0][3], voids[1][3]])
    assert projected(conn, proj.namespace) == {
        "01": {
            "doses_administered": 1,
            "people_vaccinated": 1,
            "doses_by_number": {"1": 1},
            "doses_by_vaccine": {"pfizer": 1},
        }
    }


def test_recomputation_waits_for_a_concurrent_dose(proj, conn, dsn):
    """A void's recomputation of a subject must see a dose committed while it waited."""
    _slow_down(conn, proj.namespace)
    d0 = dose("a", "01", minutes=1)
    Feed(proj).apply([d0], partition=9)
    d1 = dose("a", "79", minutes=5, number=2)
    # the dose's worker holds subject "a", uncommitted, when the void's worker recomputes it
    _race(dsn, conn, proj.namespace, [(TOPIC, 0, 0, d1)], [(TOPIC, 1, 0, void(d0))])
    check(conn, proj.namespace, [d0, d1, void(d0)])
    assert projected_subjects(conn, proj.namespace) == {"a": ("79", d1["event_id"], 1, False)}


# -- replay comparison ------------------------------------------------------------------


def test_diff_namespaces_names_a_corrupted_row(dsn, conn):
    events = [dose("abc123", "79", 1), dose("abc123", "79", 2, number=2), registration("01"), allocation("79", 10)]
    events.append(appointment("79", "abc123"))
    a, b = Projector(dsn, new_namespace()), Projector(dsn, new_namespace())
    try:
        for p in (a, b):
            p.ensure_schema()
        Feed(a).apply(events)
        # b gets the same history in another order and batching
        Feed(b).apply(events[2:])
        Feed(b).apply(events[:2], partition=1)
        assert read_models.diff_namespaces(conn, a.namespace, b.namespace) == []

        conn.execute(
            f"UPDATE {b.namespace}.counters SET value = value - 1 "
            "WHERE province = '79' AND figure = 'doses_administered'"
        )
        conn.execute(f"UPDATE {b.namespace}.subjects SET valid_doses = 1 WHERE subject_id = 'abc123'")
        conn.execute(
            f"UPDATE {b.namespace}.events SET voided_by = gen_random_uuid() WHERE event_id = %s",
            (events[2]["event_id"],),
        )
        conn.execute(
            f"UPDATE {b.namespace}.visits SET site_id = 'elsewhere' WHERE event_id = %s", (events[4]["event_id"],)
        )
        diff = read_models.diff_namespaces(conn, a.namespace, b.namespace)
        assert f"visit {events[4]['event_id']} site_id: {a.namespace}=site-1 {b.namespace}=elsewhere" in diff
        assert f"province 79 doses_administered: {a.namespace}=2 {b.namespace}=1" in diff
        assert f"national doses_administered: {a.namespace}=2 {b.namespace}=1" in diff
        assert f"subject abc123 valid_doses: {a.namespace}=2 {b.namespace}=1" in diff
        assert f"event {events[2]['event_id']} voided: {a.namespace}=False {b.namespace}=True" in diff
        assert len(diff) == 5
    finally:
        a.drop_schema()
        b.drop_schema()
        a.close()
        b.close()


def test_pool_and_ensure_schema_twice(dsn, conn):
    from psycopg_pool import ConnectionPool

    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
        p = Projector(pool, new_namespace())
        try:
            p.ensure_schema()
            p.ensure_schema()
            Feed(p).apply([registration("79")])
            assert projected(conn, p.namespace) == {"79": {"registrations": 1}}
        finally:
            p.drop_schema()

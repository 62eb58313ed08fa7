"""Analytics on ClickHouse (issue 6), on a real clickhouse-server and a real chDB.

One private stack for the module (Kafka, PostgreSQL, clickhouse-server,
registry, worker, the ClickHouse sink process, the API), so its log holds
only what this module publishes. Two engines read that log:

* "clickhouse": the stack's own sink process writing to clickhouse-server,
  asked through the API (the as_of parameters of DESIGN §5);
* "chdb": the same Sink and Runner driven in this process against a chDB
  folder in a temporary directory (its own consumer group), asked directly
  and through the HTTP endpoint a chDB owner serves to other processes.

The log: a national simulation (producers.simulator) published in two
parts, split at T_SNAP, with the PostgreSQL summaries snapshot in between;
then hand-made voids in 2022 (void before its target, void after, void
moving a person's earliest-dose province, void older than its target).

Oracles: the simulator's own expected(as_of=T), the PostgreSQL projections
(live, and as they stood when the log ended at T_SNAP), a literal
DESIGN §4 computation for the hand-made voids, and PostgreSQL's valid_doses
for /v1/analytics/doses. No mocks, no timed assertions.

The pure parts (the timeline, the figure view) are in tests/unit/test_analytics.py.
"""

from __future__ import annotations

import gc
import random
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from infra.clickhouse import server_service
from infra.settings import Settings
from infra.tools import server_binary
from nhdp import stack
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from projections.clickhouse.connect import open_store
from projections.clickhouse.queries import _GROUP_COLUMN, Analytics, ParameterError
from projections.clickhouse.remote import RemoteAnalytics, serve_queries, sink_secret
from projections.clickhouse.rollups import dirty_dose_days, dirty_hours
from projections.clickhouse.schema import HCM, MIGRATIONS, applied_versions, migrate
from projections.clickhouse.shaping import shape
from projections.clickhouse.writer import Sink, SinkFenced, SubjectFilter
from schemas.codec import Codec
from schemas.figures import FIGURES
from schemas.reference import provinces, regions, unit_of, units
from schemas.registry_client import RegistryClient
from schemas.topics import ANALYTICS_GROUP as GROUP
from schemas.topics import TOPIC_EVENTS
from streams.routing import Router
from streams.sink.audit import wait_caught_up
from streams.sink.runner import Runner
from tests.helpers import api, settings_for, stack_env
from tests.helpers import nhdp_cli as nhdp
from tests.helpers import wait_caught_up as wait_postgres

pytestmark = pytest.mark.stack

UTC = UTC
SIM = simulate("national", seed=11, days=3, daily_doses=1500)  # ~29k events, voids included
LO, HI = SIM.window
T_SNAP = LO + timedelta(hours=30, minutes=17, seconds=29)
CUTS = [
    LO - timedelta(days=60),
    LO,
    LO + timedelta(hours=9, milliseconds=1),
    T_SNAP,
    LO + timedelta(days=2, hours=11),
    HI,
]
CHDB_GROUP = "test-analytics-chdb"
T0 = datetime(2022, 3, 1, tzinfo=UTC)  # the hand-made voids, after every simulated event


# -- the private stack and the two engines ---------------------------------------------------------


@dataclass
class World:
    settings: Settings
    snapshot_national: dict = None
    snapshot_provinces: list = None
    chdb_store: Any = None
    chdb: Analytics = None
    chdb_remote: RemoteAnalytics = None
    chdb_runner: Runner | None = None
    chdb_thread: threading.Thread | None = None

    def start_chdb_sink(self) -> None:
        """The in-process sink: the same Sink and Runner as the sink process, on a chDB folder."""
        self.chdb_runner = Runner(self.settings, Sink(self.chdb_store), group=CHDB_GROUP, rollup_every_s=0.5)
        self.chdb_thread = threading.Thread(target=self.chdb_runner.run, name="chdb-sink", daemon=True)
        self.chdb_thread.start()

    def stop_chdb_sink(self) -> None:
        if self.chdb_runner is not None:
            self.chdb_runner.stop_event.set()
            self.chdb_thread.join(60)
            assert not self.chdb_thread.is_alive()
            assert gc.isenabled(), "the Runner runs the collector itself, and must give it back when it stops"
            self.chdb_runner = self.chdb_thread = None


def publish(settings: Settings, events: list[dict], batch: int = 5000) -> None:
    pseudonymiser = Pseudonymiser.from_settings(settings)
    with EventProducer(settings, source="test-analytics") as producer:
        for i in range(0, len(events), batch):
            producer.publish_json(events[i : i + batch], pseudonymiser)


def caught_up(world_settings: Settings) -> None:
    """PostgreSQL, the sink process and the in-process chDB sink have all applied the whole log."""
    wait_postgres(world_settings, timeout_s=300)
    wait_caught_up(world_settings, GROUP, timeout_s=300)
    wait_caught_up(world_settings, CHDB_GROUP, timeout_s=300)


def _ev(event_type: str, minutes: float, province: str, payload: dict, event_id: str | None = None) -> dict:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat(),
        "province_code": province,
        "source": "test-analytics",
        "payload": payload,
    }


def _dose(citizen: str, minutes: float, province: str, vaccine: str, number: int) -> dict:
    return _ev(
        "DoseAdministered",
        minutes,
        province,
        {
            "citizen_id": citizen,
            "site_id": f"site-{province}",
            "vaccine": vaccine,
            "lot_number": "L1",
            "dose_number": number,
        },
    )


def _void(target: dict, minutes: float) -> dict:
    return _ev(
        "RecordVoided",
        minutes,
        target["province_code"],
        {"voided_event_id": target["event_id"], "reason": "entered in error"},
    )


def custom_events() -> dict[str, dict]:
    """Voids in every order, relative to their targets and to as_of (all on 2022-03-01, UTC)."""
    e: dict[str, dict] = {}
    e["reg"] = _ev(
        "VaccinationRegistered",
        60,
        "01",
        {
            "citizen_id": "001099000001",
            "birth_year": 1980,
            "sex": "female",
            "priority_group": "general",
            "channel": "app",
        },
    )
    e["reg_void"] = _void(e["reg"], 180)  # published after its target, occurs 2 h after it
    e["dose_a"] = _dose("001099000002", 120, "01", "pfizer", 1)
    e["dose_a_void"] = _void(e["dose_a"], 240)  # published BEFORE its target
    e["dose_b1"] = _dose("079099000003", 60, "79", "moderna", 1)
    e["dose_b2"] = _dose("079099000003", 300, "01", "moderna", 2)
    e["dose_b1_void"] = _void(e["dose_b1"], 360)  # the earliest dose voided: the person moves 79 → 01
    # doses in two 2008 provinces of one 2025 unit (74 Bình Dương, 79 in unit 79): one person there under 2025
    e["dose_c1"] = _dose("074099000005", 30, "74", "pfizer", 1)
    e["dose_c2"] = _dose("074099000005", 200, "79", "pfizer", 2)
    e["decl"] = _ev(
        "HealthDeclarationSubmitted",
        120,
        "48",
        {"citizen_id": "048099000004", "symptoms": ["fever"], "contact_with_confirmed_case": False, "channel": "app"},
    )
    e["decl_void"] = _void(e["decl"], 90)  # occurs before its target: the declaration never counts
    return e


def custom_expected(minutes: float | None) -> dict[str, dict[str, int]]:
    """DESIGN §4 literally for the hand-made events at as_of = T0 + minutes (None: no as_of): deltas."""
    t = float("inf") if minutes is None else minutes
    alive = lambda occurred, voided: occurred < t and not voided < t  # noqa: E731
    out = {
        code: {
            "registrations": 0,
            "declarations_with_symptoms": 0,
            "doses_administered": 0,
            "people_vaccinated": 0,
            "people_fully_vaccinated": 0,
        }
        for code in ("01", "48", "74", "79")
    }
    out["01"]["registrations"] += alive(60, 180)
    out["48"]["declarations_with_symptoms"] += alive(120, 90)
    a, b1, b2 = alive(120, 240), alive(60, 360), alive(300, float("inf"))
    out["01"]["doses_administered"] += a + b2
    out["79"]["doses_administered"] += b1
    out["01"]["people_vaccinated"] += a
    c1, c2 = alive(30, float("inf")), alive(200, float("inf"))
    out["74"]["doses_administered"] += c1
    out["79"]["doses_administered"] += c2
    out["74"]["people_vaccinated"] += c1
    out["74"]["people_fully_vaccinated"] += c1 and c2
    if b1:  # earliest counted dose of person b is b1 (79) while it counts, else b2 (01)
        out["79"]["people_vaccinated"] += 1
        out["79"]["people_fully_vaccinated"] += b2
    elif b2:
        out["01"]["people_vaccinated"] += 1
    return out


@pytest.fixture(scope="module")
def world():
    """The stack, the log, the PostgreSQL snapshot at T_SNAP and the in-process chDB sink."""
    if server_binary() is None:
        pytest.skip("clickhouse-server is not installed (apt-get install -y clickhouse-server)")
    # Outside pytest's basetemp: a concurrent pytest run resets it to 0700 (embedded PostgreSQL runs as its own user).
    data = Path(tempfile.mkdtemp(prefix="nhdp-test-analytics-"))
    world = World(settings_for(stack_env(data / "stack")))
    settings = world.settings
    server = None
    try:
        stack.up(settings)
        world.chdb_store = open_store(f"chdb://{data / 'chdb'}?database=nhdp_test", purpose="tests/test_analytics.py")
        world.chdb = Analytics(world.chdb_store)
        world.start_chdb_sink()
        server = serve_queries(Analytics(world.chdb_store), sink_secret(settings))
        world.chdb_remote = RemoteAnalytics(f"http://127.0.0.1:{server.server_address[1]}", sink_secret(settings))

        events = list(SIM.events())
        publish(settings, [e for e in events if datetime.fromisoformat(e["occurred_at"]) < T_SNAP])
        caught_up(settings)
        with api(settings, timeout=60) as client:
            world.snapshot_national = client.get("/v1/national/summary").json()
            world.snapshot_provinces = client.get("/v1/provinces").json()
        publish(settings, [e for e in events if datetime.fromisoformat(e["occurred_at"]) >= T_SNAP])

        custom = custom_events()
        publish(settings, [custom["dose_a_void"], custom["reg"]])
        caught_up(settings)  # the void of dose_a is in both sinks before dose_a arrives
        publish(settings, [custom[k] for k in ("dose_a", "reg_void", "dose_b1", "decl_void", "decl")])
        caught_up(settings)
        publish(settings, [custom["dose_b2"], custom["dose_b1_void"], custom["dose_c1"], custom["dose_c2"]])
        caught_up(settings)
        yield world
    finally:
        if server is not None:
            server.shutdown()
        world.stop_chdb_sink()
        if world.chdb_store is not None:
            world.chdb_store.close()  # one chDB folder per process: free it for other modules
        stack.down(settings)
        shutil.rmtree(data, ignore_errors=True)


class ApiEngine:
    """The clickhouse-server engine, through the HTTP API (the stack's own sink process writes it)."""

    def __init__(self, settings: Settings):
        self.client = api(settings, timeout=60)

    def _get(self, path: str, **params):
        reply = self.client.get(path, params={k: v for k, v in params.items() if v is not None})
        assert reply.status_code == 200, reply.text
        return reply.json()

    def national_summary(self, as_of=None):
        return self._get("/v1/national/summary", as_of=as_of)

    def all_provinces(self, as_of=None, scheme=None):
        return self._get("/v1/provinces", as_of=as_of, scheme=scheme)

    def province_summary(self, code, as_of=None, scheme=None):
        return self._get(f"/v1/provinces/{code}/summary", as_of=as_of, scheme=scheme)

    def doses(self, group_by=None, from_=None, to=None, province=None, scheme=None, as_of=None):
        return self._get(
            "/v1/analytics/doses",
            group_by=group_by,
            **{"from": from_},
            to=to,
            province=province,
            scheme=scheme,
            as_of=as_of,
        )

    def coverage(self, by="province", as_of=None, scheme=None):
        return self._get("/v1/analytics/coverage", by=by, as_of=as_of, scheme=scheme)


@pytest.fixture(params=["clickhouse", "chdb"])
def engine(request, world):
    if request.param == "clickhouse":
        api = ApiEngine(world.settings)
        yield api
        api.client.close()
    else:
        yield world.chdb


def _as_of(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def mismatches(got: dict, want: dict, label: str) -> list[str]:
    """Integers exactly; percentages to 1e-6 (the summaries round to 6 decimals, the simulator does not)."""
    out = []
    for k, v in want.items():
        g = got.get(k)
        if isinstance(v, float):
            if g is None or abs(g - v) > 1e-6:
                out.append(f"{label} {k}: got {g}, want {v}")
        elif g != v:
            out.append(f"{label} {k}: got {g}, want {v}")
    return out


# -- as_of: exact against the simulator, and against PostgreSQL as it stood at T ----------------------


@pytest.mark.parametrize("cut", CUTS, ids=lambda t: t.isoformat())
def test_as_of_equals_the_simulators_figures(engine, cut):
    want = SIM.expected(as_of=cut)
    bad = mismatches(engine.national_summary(as_of=_as_of(cut)), want["national"], "national")
    for got in engine.all_provinces(as_of=_as_of(cut)):
        bad += mismatches(got, want["provinces"][got["province_code"]], f"province {got['province_code']}")
    assert bad == []
    one = engine.province_summary("79", as_of=_as_of(cut))
    assert mismatches(one, want["provinces"]["79"], "79") == [] and one["name"] == provinces()["79"].name_vi


def test_as_of_equals_postgres_when_the_log_ended_at_that_time(engine, world):
    """Before the rest of the log was published, PostgreSQL showed exactly this (doses voided later included)."""
    as_of = T_SNAP.astimezone(timezone(timedelta(hours=-5))).isoformat()  # the same instant, another offset
    assert engine.national_summary(as_of=as_of) == world.snapshot_national
    assert engine.all_provinces(as_of=as_of) == world.snapshot_provinces


@pytest.mark.parametrize("minutes", [30, 90, 150, 210, 270, 330, 359.999, 360, 390, None])
def test_voids_before_and_after_their_targets(engine, minutes):
    as_of = None if minutes is None else _as_of(T0 + timedelta(minutes=minutes))
    base = SIM.expected()  # every simulated event is before T0
    want = custom_expected(minutes)
    for code, deltas in want.items():
        got = engine.province_summary(code, as_of=as_of)
        for figure, delta in deltas.items():
            assert got[figure] == base["provinces"][code][figure] + delta, (code, figure, minutes)
    national = engine.national_summary(as_of=as_of)
    for figure in want["01"]:
        assert national[figure] == base["national"][figure] + sum(d[figure] for d in want.values()), figure


# -- agreement with PostgreSQL -----------------------------------------------------------------------


def test_verify_analytics_agrees_with_postgres(world):
    done = nhdp(world.settings, "verify-analytics")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 differences" in done.stdout


def test_chdb_agrees_with_postgres(world):
    from streams.sink.audit import verify

    diffs, positions = verify(world.settings, analytics=world.chdb, group=CHDB_GROUP)
    assert diffs == [] and sum(positions.values()) >= SIM.total_events


def test_chdb_owner_answers_other_processes_over_http(world):
    """In chDB mode the API asks the sink process; the answers are the same as asked in-process."""
    remote, local = world.chdb_remote, world.chdb
    assert remote.national_summary(as_of=_as_of(T_SNAP)) == local.national_summary(as_of=_as_of(T_SNAP))
    assert remote.coverage(by="region") == local.coverage(by="region")
    assert remote.doses(group_by="vaccine") == local.doses(group_by="vaccine")
    with pytest.raises(ParameterError, match="group_by"):
        remote.doses(group_by="site")


# -- analytics endpoints ---------------------------------------------------------------------------------


def _pg_doses(settings: Settings, group_by: list[str], first, last, codes, scheme: str = "2008") -> list[dict]:
    """PostgreSQL's valid doses grouped; under 2025 each 2008 code mapped to its unit in SQL, and people
    distinct within the unit (not a sum of its parts)."""
    into = unit_of(scheme)
    unit = "CASE province " + " ".join(f"WHEN '{o}' THEN '{n}'" for o, n in sorted(into.items())) + " END"
    cols = {
        "province": unit,
        "day": "(occurred_at AT TIME ZONE 'Asia/Ho_Chi_Minh')::date",
        "vaccine": "vaccine",
        "dose_number": "dose_number",
    }
    select = [f"{cols[k]} AS {k}" for k in group_by]
    sql = f"SELECT {', '.join(select + ['count(*)', 'count(DISTINCT subject_id)'])} FROM proj.valid_doses WHERE true"
    params: list = []
    if first:
        sql += " AND (occurred_at AT TIME ZONE 'Asia/Ho_Chi_Minh')::date BETWEEN %s AND %s"
        params += [first, last]
    if codes:
        sql += f" AND {unit} = ANY(%s)"
        params.append(codes)
    if group_by:  # by position: a GROUP BY name would mean the input column `province`, not the unit
        at = ", ".join(str(i + 1) for i in range(len(group_by)))
        sql += f" GROUP BY {at} ORDER BY {at}"
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(sql, params).fetchall()
    return [
        {**{k: (v.isoformat() if k == "day" else v) for k, v in zip(group_by, r)}, "doses": r[-2], "people": r[-1]}
        for r in rows
    ]


@pytest.mark.parametrize(
    "group_by, first, last, codes",
    [
        (["province", "day", "vaccine", "dose_number"], None, None, None),
        (["province", "day"], LO.date(), (HI - timedelta(days=1)).date(), None),
        (["vaccine", "dose_number"], LO.date(), LO.date(), ["79", "01"]),
        (["day"], None, None, ["48"]),
        ([], None, None, None),
    ],
)
def test_doses_grouped_equal_postgres_valid_doses(engine, world, group_by, first, last, codes):
    got = engine.doses(
        group_by=",".join(group_by) or None,
        from_=first and first.isoformat(),
        to=last and last.isoformat(),
        province=",".join(codes) if codes else None,
    )
    assert got["group_by"] == group_by
    assert got["rows"] == _pg_doses(world.settings, group_by, first, last, codes)


# -- the 2025 units (scheme=2025): sums of their 2008 parts, people once per unit ----------------------

ADDITIVE = [f for f in FIGURES if not f.endswith("coverage_pct")]


def _sum_of_parts(rows_2008: dict[str, dict], parts: tuple[str, ...]) -> dict:
    out: dict = {}
    for figure in [*ADDITIVE, "population"]:
        values = [rows_2008[p][figure] for p in parts]
        if isinstance(values[0], dict):
            keyed: dict = {}
            for v in values:
                for k, n in v.items():
                    keyed[k] = keyed.get(k, 0) + n
            out[figure] = {k: n for k, n in keyed.items() if n}
        else:
            out[figure] = sum(values)
    return out


@pytest.mark.parametrize("minutes", [None, 100, 250])
def test_2025_units_are_the_sums_of_their_2008_parts(engine, minutes):
    """Without as_of through the API: PostgreSQL's counters; with as_of, and chDB: ClickHouse."""
    as_of = None if minutes is None else _as_of(T0 + timedelta(minutes=minutes))
    old = {r["province_code"]: r for r in engine.all_provinces(as_of=as_of)}
    new = engine.all_provinces(as_of=as_of, scheme="2025")
    assert [r["province_code"] for r in new] == sorted(units("2025")) and len(new) == 34
    for row in new:
        unit = units("2025")[row["province_code"]]
        want = _sum_of_parts(old, unit.parts)
        assert {k: row[k] if not isinstance(row[k], dict) else dict(row[k]) for k in want} == want, unit.code
        assert row["name"] == unit.name_vi
        assert row["coverage_pct"] == round(row["people_vaccinated"] / row["population"] * 100, 6)
        if unit.code in ("79", "01", "24"):
            assert engine.province_summary(unit.code, as_of=as_of, scheme="2025") == row
    national = engine.national_summary(as_of=as_of)
    for figure in ("doses_administered", "people_vaccinated", "people_fully_vaccinated", "population"):
        assert sum(r[figure] for r in new) == national[figure], figure
    # person c (doses in 74, then 79; one 2025 unit) is one person there, in both schemes' sums
    if minutes is None or minutes > 30:
        assert old["74"]["people_vaccinated"] >= 1


@pytest.mark.parametrize(
    "group_by, codes",
    [(["province"], None), (["province", "vaccine"], ["79", "24"]), ([], ["79"]), (["day"], None), (["day"], ["79"])],
)
def test_doses_in_2025_units_count_each_person_once_per_unit(engine, world, group_by, codes):
    got = engine.doses(group_by=",".join(group_by) or None, province=",".join(codes) if codes else None, scheme="2025")
    assert got["scheme"] == "2025"
    assert got["rows"] == _pg_doses(world.settings, group_by, None, None, codes, "2025")


@pytest.mark.parametrize("cut", [*CUTS[1:2], *(T0 + timedelta(minutes=m) for m in (100, 250, 359.999, 360))])
def test_doses_as_of_equal_the_summaries_as_of(engine, cut):
    """The dashboard's time travel: doses per province and per day as of T, voids too (those before T)."""
    as_of = _as_of(cut)
    got = {r["province"]: r["doses"] for r in engine.doses(group_by="province", as_of=as_of)["rows"]}
    summaries = engine.all_provinces(as_of=as_of)
    assert got == {r["province_code"]: r["doses_administered"] for r in summaries if r["doses_administered"]}
    by_day = engine.doses(group_by="day", as_of=as_of, scheme="2025")["rows"]
    assert sum(r["doses"] for r in by_day) == engine.national_summary(as_of=as_of)["doses_administered"]
    assert max(r["day"] for r in by_day) <= cut.astimezone(HCM).date().isoformat()


def test_people_of_a_2025_unit_are_distinct_not_the_sum_of_its_parts(engine):
    by_2008 = {r["province"]: r for r in engine.doses(group_by="province")["rows"]}
    by_2025 = {r["province"]: r for r in engine.doses(group_by="province", scheme="2025")["rows"]}
    parts = units("2025")["79"].parts
    assert by_2025["79"]["doses"] == sum(by_2008[p]["doses"] for p in parts if p in by_2008)
    # person c has doses in 74 and 79: counted in both 2008 rows, once in the 2025 unit
    assert by_2025["79"]["people"] < sum(by_2008[p]["people"] for p in parts if p in by_2008)


def test_coverage_in_2025_units_and_why_not_by_region(engine, world):
    got = engine.coverage(scheme="2025")
    assert len(got["rows"]) == 34 and got["scheme"] == "2025"
    old = {r["province_code"]: r for r in engine.coverage()["rows"]}
    for row in got["rows"]:
        parts = units("2025")[row["province_code"]].parts
        for figure in ("population", "people_vaccinated", "people_fully_vaccinated"):
            assert row[figure] == sum(old[p][figure] for p in parts), (row["province_code"], figure)
    assert sorted(r["rank"] for r in got["rows"])[0] == 1
    with pytest.raises((ParameterError, AssertionError), match="regions are groups of the 2008 units"):
        engine.coverage(by="region", scheme="2025")


def test_an_unknown_scheme_or_unit_is_named(world):
    with api(world.settings) as client:
        bad = client.get("/v1/provinces", params={"scheme": "2021"})
        assert bad.status_code == 400 and "use 2008 (63 units) or 2025 (34 units)" in bad.json()["error"]
        gone = client.get("/v1/provinces/02/summary", params={"scheme": "2025"})  # Hà Giang is in Tuyên Quang now
        assert gone.status_code == 404 and "the 34 two-digit 2025 codes" in gone.json()["error"]
        doses = client.get("/v1/analytics/doses", params={"scheme": "2025", "province": "02"})
        assert doses.status_code == 400 and doses.json()["error"].startswith("province: unknown province code '02'")


def _doses_daily_current(store, timeout_s: float = 120.0) -> None:
    """Until the sink has recomputed doses_daily for every day (it does when idle)."""
    deadline = time.monotonic() + timeout_s
    while stale := dirty_dose_days(store):
        assert time.monotonic() < deadline, f"doses_daily still stale for {sorted(stale)}"
        time.sleep(0.5)


@pytest.mark.parametrize("engine_name", ["clickhouse", "chdb"])
def test_doses_by_day_from_doses_daily_equal_events_and_postgres(world, engine_name):
    """Grouped by day, clean days come from doses_daily and stale ones from `events`: every mix
    of the two gives the same rows as `events` alone, and as PostgreSQL."""
    store = (
        open_store(world.settings.analytics_url(), password=world.settings.analytics_password())
        if engine_name == "clickhouse"
        else world.chdb_store
    )
    try:
        _doses_daily_current(store)
        days = [d for (d,) in store.execute("SELECT DISTINCT day FROM doses_daily WHERE doses > 0 ORDER BY day")]
        assert len(days) >= 3
        cases = [
            (["province", "day", "vaccine", "dose_number"], None, None, None),
            (["province", "day"], days[0], days[-1], ["79", "01"]),
            (["day"], None, None, None),
            (["day", "vaccine"], days[1], days[-1], ["48"]),
            (["dose_number", "day"], days[0], days[-2], None),
        ]
        for keys, first, last, codes in cases:
            cols = [_GROUP_COLUMN[k] for k in keys]
            from_events = Analytics._doses_rows(store, keys, cols, first, last, codes, by_day=False)
            assert from_events, (keys, first, last, codes)
            for stale in ([], days[::2], days):
                got = Analytics._doses_rows(store, keys, cols, first, last, codes, by_day=True, stale_days=stale)
                assert got == from_events, (keys, first, last, codes, stale)
            rows = [
                {**{k: (v.isoformat() if k == "day" else v) for k, v in zip(keys, r)}, "doses": r[-2], "people": r[-1]}
                for r in from_events
            ]
            assert rows == _pg_doses(world.settings, keys, first, last, codes)
    finally:
        if engine_name == "clickhouse":
            store.close()


def test_a_void_makes_its_doses_day_stale_until_recomputed(world):
    """A void arriving long after its dose marks the dose's hour changed, so that the dose's
    day in doses_daily is not trusted until recomputed (the void's own hour holds no dose)."""
    from streams.sink.audit import _reset_database

    url = world.settings.analytics_url().rsplit("/", 1)[0] + "/nhdp_test_doses_void"
    _reset_database(url, world.settings.analytics_password())
    records = _first_records(world.settings, 5_000)
    good, _ = Router(Codec(RegistryClient.for_settings(world.settings))).split([r.value for r in records])
    dose = next(ev for _, ev in good if ev["event_type"] == "DoseAdministered")
    store = open_store(url, password=world.settings.analytics_password())
    try:
        sink = Sink(store)
        sink.process([(0, 0, dose)])
        sink.refresh_all()
        day = datetime.fromtimestamp(dose["occurred_at"] / 1000, HCM).date()  # the codec gives epoch ms
        keys = ["day"]
        assert Analytics._doses_rows(store, keys, ["day"], None, None, None, by_day=True) == [(day, 1, 1)]
        void = {
            **dose,
            "event_id": str(uuid.uuid4()),
            "event_type": "RecordVoided",
            "occurred_at": dose["occurred_at"] + 40 * 86_400_000,
            "subject_id": None,
            "payload": {"voided_event_id": dose["event_id"], "reason": "entered in error"},
        }
        sink.process([(0, 1, void)])
        assert day in dirty_dose_days(store)
        assert Analytics._doses_rows(store, keys, ["day"], None, None, None, by_day=True) == []
        sink.refresh_all()
        assert not dirty_dose_days(store)
        assert Analytics._doses_rows(store, keys, ["day"], None, None, None, by_day=True) == []
        ((left,),) = store.execute("SELECT sum(doses) FROM doses_daily FINAL")
        assert left == 0
    finally:
        store.close()
        _reset_database(url, world.settings.analytics_password())


def test_coverage_by_province_and_region_ranked_against_the_nation(engine, world):
    national = engine.national_summary()
    by_province = engine.coverage(by="province")
    assert by_province["national"]["people_vaccinated"] == national["people_vaccinated"]
    assert abs(by_province["national"]["coverage_pct"] - national["coverage_pct"]) < 1e-9
    rows = by_province["rows"]
    assert len(rows) == 63 and [r["rank"] for r in rows] == sorted(r["rank"] for r in rows) and rows[0]["rank"] == 1
    for r in rows:
        summary = engine.province_summary(r["province_code"])
        assert (r["people_vaccinated"], r["coverage_pct"]) == (summary["people_vaccinated"], summary["coverage_pct"])
        assert r["above_national"] == (r["coverage_pct"] > by_province["national"]["coverage_pct"])
    by_region = engine.coverage(by="region")
    assert {r["region"] for r in by_region["rows"]} == set(regions())
    assert sum(r["people_vaccinated"] for r in by_region["rows"]) == national["people_vaccinated"]
    assert sum(r["population"] for r in by_region["rows"]) == national["population"]


@pytest.mark.parametrize(
    "path, param",
    [
        ("/v1/analytics/doses?group_by=province,site", "group_by"),
        ("/v1/analytics/doses?from=01/08/2021", "from"),
        ("/v1/analytics/doses?from=2021-08-03&to=2021-08-01", "from"),
        ("/v1/analytics/doses?province=99", "province"),
        ("/v1/analytics/coverage?by=district", "by"),
        ("/v1/analytics/coverage?as_of=yesterday", "as_of"),
        ("/v1/national/summary?as_of=2021-08-01T00:00:00", "as_of"),
        ("/v1/provinces?as_of=2021-13-01T00:00:00Z", "as_of"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(world, path, param):
    reply = api(world.settings).get(path, timeout=30)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]
    assert message.startswith(f"{param}:")
    if param in ("group_by", "by"):
        assert ("province, day, vaccine, dose_number" if param == "group_by" else "province, region") in message


def test_unknown_province_as_of_is_404_and_as_of_with_plus_offset_is_read(world):
    assert api(world.settings).get("/v1/provinces/99/summary?as_of=2021-08-01T00:00:00Z").status_code == 404
    # '+07:00' unescaped in a query string arrives as ' 07:00'; it is still read as +07:00
    raw = api(world.settings).get("/v1/national/summary?as_of=2021-08-02T06:17:29+07:00", timeout=30)
    assert raw.status_code == 200
    assert raw.json() == ApiEngine(world.settings).national_summary(as_of="2021-08-01T23:17:29Z")


# -- duplicates: a re-processed batch counts once ---------------------------------------------------------


class _RecomputingBeforeTheRows:
    """The database, but each batch's write lets the rollups be recomputed after its hours are
    marked dirty and before its rows go in: where the sink's rollups thread, running beside the
    writer thread, can fall."""

    def __init__(self, store, sink: Sink):
        self.store, self.sink = store, sink

    def insert(self, table: str, columns, rows):
        if table == "events":
            self.sink.refresh_rollups(doses_every_s=0)
        return self.store.insert(table, columns, rows)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def test_a_recompute_beside_the_writes_never_marks_an_hour_clean_too_early(world):
    """Every batch's write is interrupted by a recompute of the rollups and doses_daily between its
    dirty marks and its rows. The recompute marks hours clean with the last completed batch's
    version, so the hours of the batch being written stay dirty: the answers, with no recompute
    after the last write and after one, equal those of writes and recomputes taking turns."""
    batches = _whole_log_in_batches(world.settings, 2000)
    answers = {}
    for name in ("in_turn", "beside"):
        store = _empty_chdb_database(world, name)
        try:
            sink = Sink(store)
            analytics = Analytics(store)
            if name == "in_turn":
                for batch in batches:
                    sink.process(batch)
                    sink.refresh_rollups(doses_every_s=0)
            else:
                beside = _RecomputingBeforeTheRows(store, sink)
                for batch in batches:
                    sink.write(sink.plan(shape(batch, sink._regions), len(batch)), beside)
                answers["beside, before the last recompute"] = _figures(analytics), _doses_by_day(analytics)
                assert answers["beside, before the last recompute"] == answers["in_turn"]
                ((hours,),) = store.execute("SELECT uniqExact(hour) FROM hour_marks")
                assert 0 < len(dirty_hours(store)) < hours  # the recomputes marked hours clean, not the last batch's
                sink.refresh_rollups(doses_every_s=0)
            assert not dirty_hours(store) and not dirty_dose_days(store)
            answers[name] = _figures(analytics), _doses_by_day(analytics)
            if name == "beside":  # a batch that marked its hour dirty and stopped before its rows (a crash)
                ((hour,),) = store.execute("SELECT toUInt32(min(hour)) FROM hour_marks")
                store.insert("hour_marks", ["hour", "mark", "version"], [(hour, 0, sink.next_version())])
                sink.refresh_all()  # returns, leaving that hour dirty: no recompute can vouch for it
                assert dirty_hours(store) == [hour]
                assert (_figures(analytics), _doses_by_day(analytics)) == answers["in_turn"]
        finally:
            store.close()
    assert len(batches) >= 3
    assert answers["beside"] == answers["in_turn"]


def _whole_log_in_batches(settings: Settings, size: int) -> list[list]:
    """Every valid event of the log as the sink decodes it, (partition, offset, event), in batches of `size`."""
    records = _first_records(settings, 10**9)
    good, _ = Router(Codec(RegistryClient.for_settings(settings))).split([r.value for r in records])
    messages = [(records[i].partition, records[i].offset, ev) for i, ev in good]
    return [messages[i : i + size] for i in range(0, len(messages), size)]


def _empty_chdb_database(world, name: str):
    """A store on a new, empty database `name` in the world's chDB folder."""
    store = open_store(f"chdb://{world.chdb_store.path}?database={name}", purpose="tests/test_analytics.py")
    try:
        store.execute(f"DROP DATABASE IF EXISTS {name}")
        store.execute(f"CREATE DATABASE {name}")
    except BaseException:
        store.close()
        raise
    return store


def _doses_by_day(analytics) -> list:
    return analytics.doses(group_by="province,day,vaccine,dose_number")


def _figures(analytics) -> tuple:
    return analytics.national_summary(), analytics.all_provinces(), analytics.national_summary(as_of=_as_of(T_SNAP))


def _first_records(settings: Settings, n: int) -> list:
    consumer = KafkaConsumer(**settings.kafka_python_config(), enable_auto_commit=False)
    try:
        parts = [TopicPartition(TOPIC_EVENTS, p) for p in sorted(consumer.partitions_for_topic(TOPIC_EVENTS))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list = []
        while len(records) < n:
            got = consumer.poll(timeout_ms=2000, max_records=5000)
            if not got:
                break
            records += [r for rs in got.values() for r in rs]
        return records
    finally:
        consumer.close()


def test_chdb_same_batch_again_and_whole_log_again_count_once(world):
    before = _figures(world.chdb)
    store = world.chdb_store
    world.stop_chdb_sink()  # one writer at a time
    records = _first_records(world.settings, 12_000)
    good, _ = Router(Codec(RegistryClient.for_settings(world.settings))).split([r.value for r in records])
    batch = [(records[i].partition, records[i].offset, ev) for i, ev in good]
    store.execute("SYSTEM STOP MERGES events")
    try:
        sink = Sink(store)
        sink.process(batch)  # the same batch inserted again
        random.Random(5).shuffle(batch)
        sink.process(batch[: len(batch) // 2])  # and half of it once more, in another order
        ((raw, distinct),) = store.execute("SELECT count(), uniqExact(event_id) FROM events")
        assert raw > distinct  # the copies are really there, unmerged
        assert _figures(world.chdb) == before
        sink.refresh_all()
        assert _figures(world.chdb) == before
        _commit_group(world.settings, CHDB_GROUP, 0)  # and every batch of the log re-delivered
        world.start_chdb_sink()
        wait_caught_up(world.settings, CHDB_GROUP, timeout_s=300)
        assert _figures(world.chdb) == before
    finally:
        store.execute("SYSTEM START MERGES events")


def test_a_newer_sink_fences_the_older_one(world):
    """One writer per database: a sink started later makes the earlier one stop before it writes."""
    world.stop_chdb_sink()
    try:
        older, newer = Sink(world.chdb_store), Sink(world.chdb_store)
        with pytest.raises(SinkFenced, match="one writer per database"):
            older.process([])
        with pytest.raises(SinkFenced):
            older.refresh_rollups()
        assert newer.process([]).messages == 0
    finally:
        world.start_chdb_sink()


def _commit_group(settings: Settings, group: str, offset: int) -> None:
    consumer = KafkaConsumer(**settings.kafka_python_config(), group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(TOPIC_EVENTS, p) for p in sorted(consumer.partitions_for_topic(TOPIC_EVENTS))]
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp in parts})
    finally:
        consumer.close(autocommit=False)


def test_server_whole_log_reprocessed_from_offset_0_counts_once(world):
    """The sink's group offsets reset to 0 (a forced re-delivery of every batch): nothing moves."""
    api = ApiEngine(world.settings)
    before = _figures(api)
    store = open_store(world.settings.analytics_url(), password=world.settings.analytics_password())
    sink = stack.sink_service(world.settings)
    try:
        sink.stop()
        store.execute("SYSTEM STOP MERGES events")
        _commit_group(world.settings, GROUP, 0)
        sink.start(world.settings.start_timeout_s)
        wait_caught_up(world.settings, GROUP, timeout_s=300)
        ((raw, distinct),) = store.execute("SELECT count(), uniqExact(event_id) FROM events")
        assert raw > distinct
        assert _figures(api) == before
        done = nhdp(world.settings, "verify-analytics")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        store.execute("SYSTEM START MERGES events")
        store.close()
        api.client.close()


# -- ClickHouse down: back-pressure, nothing lost -------------------------------------------------------------


def test_clickhouse_outage_holds_the_batch_and_loses_nothing(world):
    server = server_service(world.settings)
    regs = [
        _ev(
            "VaccinationRegistered",
            60 * 24 * 30 + i,
            "92",
            {
                "citizen_id": f"092099{i:06d}",
                "birth_year": 1990,
                "sex": "male",
                "priority_group": "general",
                "channel": "web",
            },
        )
        for i in range(50)
    ]
    before = SIM.expected()["provinces"]["92"]["registrations"]
    assert server.stop()
    try:
        publish(world.settings, regs)
        wait_postgres(world.settings)  # the worker has them: they were deliverable
        assert sum(A_lag(world.settings).values()) > 0  # the sink cannot commit without ClickHouse's ack
    finally:
        server.start(world.settings.start_timeout_s)
    caught_up(world.settings)
    assert ApiEngine(world.settings).province_summary("92")["registrations"] == before + 50
    assert world.chdb.province_summary("92")["registrations"] == before + 50
    done = nhdp(world.settings, "verify-analytics")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_void_seen_before_a_restart_still_voids_its_late_target(world):
    """Across a restart the sink still knows which events were voided before they arrived."""
    late = _dose("001099000009", 24 * 60 + 60, "27", "sinopharm", 1)  # 2022-03-02 01:00 UTC
    publish(world.settings, [_void(late, 24 * 60 + 120)])  # its void, 02:00, arrives first
    caught_up(world.settings)
    service = stack.sink_service(world.settings)
    service.stop()
    service.start(world.settings.start_timeout_s)
    world.stop_chdb_sink()
    world.start_chdb_sink()  # a fresh Sink: what it remembers is reloaded from ClickHouse
    publish(world.settings, [late])
    caught_up(world.settings)
    base = SIM.expected()["provinces"]["27"]
    for engine in (ApiEngine(world.settings), world.chdb):
        assert engine.province_summary("27")["doses_administered"] == base["doses_administered"]
        between = engine.province_summary("27", as_of=_as_of(T0 + timedelta(minutes=24 * 60 + 90)))
        assert between["doses_administered"] == base["doses_administered"] + 1
        assert between["people_vaccinated"] == base["people_vaccinated"] + 1


def A_lag(settings: Settings) -> dict[int, int]:
    from streams.sink.audit import sink_lag

    return sink_lag(settings, GROUP)


# -- replay: the ClickHouse side rebuilt into its own database ----------------------------------------------------


def test_replay_rebuilds_clickhouse_into_its_own_database(world):
    done = nhdp(world.settings, "replay", "--into", "t6", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    from streams.sink.audit import replay_url

    url = replay_url(world.settings, "t6")
    assert url.endswith("/replay_t6")
    rebuilt = open_store(url, password=world.settings.analytics_password())
    try:
        assert dirty_hours(rebuilt) == []  # every rollup recomputed
        again = Analytics(rebuilt)
        live = ApiEngine(world.settings)
        assert again.all_provinces() == live.all_provinces()
        assert again.national_summary(as_of=_as_of(T_SNAP)) == live.national_summary(as_of=_as_of(T_SNAP))
    finally:
        rebuilt.close()


# -- migrations ------------------------------------------------------------------------------------------------------


def test_migrations_are_recorded_once_and_rerun_harmlessly(world):
    for store in (
        open_store(world.settings.analytics_url(), password=world.settings.analytics_password()),
        world.chdb_store,
    ):
        try:
            assert migrate(store) == []  # `nhdp up` and the sink applied them already
            assert applied_versions(store) == {m.version for m in MIGRATIONS}
            ((n,),) = store.execute("SELECT count() FROM schema_migrations FINAL")
            assert n == len(MIGRATIONS)
            tables = {t for (t,) in store.execute("SHOW TABLES")}
            assert {
                "events",
                "voids",
                "event_index",
                "subjects",
                "points",
                "figures_hourly",
                "figures_daily",
                "hour_marks",
                "sink_batches",
                "schema_migrations",
            } <= tables
            columns = {c for (c, *_) in store.execute("DESCRIBE TABLE events")}
            assert "subject_id" in columns and not columns & {"citizen_id", "name", "birth_year"}
        finally:
            if store is not world.chdb_store:
                store.close()


# -- last: a wrong figure is found ---------------------------------------------------------------------------------


def test_verify_analytics_lists_a_difference_and_fails(world):
    """A row no sink wrote (its hour marked dirty as a writer would): verify names the figure and exits 1."""
    store = open_store(world.settings.analytics_url(), password=world.settings.analytics_password())
    try:
        t = int(datetime(2021, 8, 2, 3, 0, 5, tzinfo=UTC).timestamp())
        store.insert("hour_marks", ["hour", "mark", "version"], [(t - t % 3600, 0, 1 << 62)])
        store.insert(
            "events",
            ["event_id", "event_type", "kind", "occurred_at", "occurred_ms", "province_code"],
            [(uuid.uuid4().bytes, "VaccinationRegistered", 2, t, 0, "79")],
        )
    finally:
        store.close()
    done = nhdp(world.settings, "verify-analytics")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "province 79 registrations" in done.stdout and "national registrations" in done.stdout


def test_subject_filter_loaded_from_chdb_misses_no_stored_subject(world):
    """The sink reads a subject's stored row only if the filter may hold it: it must hold every one."""
    # chDB opens one folder per process: the module's, in a database of its own
    store = open_store(f"chdb://{world.chdb_store.path}?database=subject_filter", purpose="tests/test_analytics.py")
    try:
        store.execute("DROP DATABASE IF EXISTS subject_filter")
        store.execute("CREATE DATABASE subject_filter")
        Sink(store)  # migrations
        rng = random.Random(6)
        stored = [f"{rng.getrandbits(256):064x}" for _ in range(20_000)] + ["", "short", "ü-non-ascii"]
        store.insert("subjects", ["subject_id", "version"], [(s, 1) for s in stored])
        known = SubjectFilter(store, capacity=10_000)
        assert all(known.may_contain(s) for s in stored)
        others = [f"{rng.getrandbits(256):064x}" for _ in range(20_000)]
        assert sum(map(known.may_contain, others)) < 0.02 * len(others)  # ~1% at capacity
        known.add(others[0])
        assert known.may_contain(others[0])
    finally:
        store.close()


def test_planning_while_the_batch_before_is_written_gives_the_same_figures(world):
    """The Runner plans batch k+1 before batch k's write has returned, taking k's rows from memory.
    Over the whole log in small batches (so voids, their targets and people's later doses fall in
    consecutive batches), that gives exactly what planning after each write gives."""
    batches = _whole_log_in_batches(world.settings, 300)
    figures = []
    for name in ("after_each_write", "overlapped"):
        store = _empty_chdb_database(world, name)
        try:
            sink = Sink(store)
            if name == "after_each_write":
                for batch in batches:
                    sink.process(batch)
            else:
                writing = None
                for batch in batches:
                    planned = sink.plan(shape(batch, sink._regions), len(batch), writing)
                    if writing is not None:
                        sink.write(writing)
                    writing = planned
                sink.write(writing)
            sink.refresh_all()
            analytics = Analytics(store)
            figures.append((_figures(analytics), analytics.all_provinces(as_of=_as_of(T_SNAP))))
            # the log has what the overlap must carry across batches: voids and people's later doses
            (voids,) = store.execute("SELECT count() FROM voids")[0]
            (again,) = store.execute("SELECT countIf(length(dose_ids) >= 2) FROM subjects FINAL")[0]
            assert voids > 0 and again > 0
        finally:
            store.close()
    assert figures[0] == figures[1]

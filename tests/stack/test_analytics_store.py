"""The same SQL through both analytics engines: a real clickhouse-server and a real chDB.

Every test that takes `store` runs once per engine and checks against figures
computed here in Python from the generated events, so both engines are held to
one oracle; test_engines_agree also compares the two result sets value for
value and type for type. (Quoting and URL checks, without any engine, are in
tests/unit/test_analytics_store.py.)
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import psutil
import pytest

from infra.clickhouse import config_path, ensure_database, server_service
from infra.settings import CHECKOUT, Settings
from infra.tools import server_binary
from projections.clickhouse.connect import open_store
from projections.clickhouse.native import encode_block
from projections.clickhouse.store import OWNER_LOCK, AnalyticsStore, AnalyticsStoreError
from tests.helpers import private_data_dir

pytestmark = pytest.mark.stack

UTC = UTC
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
INSTALL_HINT = "apt-get install -y clickhouse-server"


def _require_server() -> None:
    if server_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test the native protocol against clickhouse-server: {INSTALL_HINT}")
        pytest.skip(f"clickhouse-server is not installed ({INSTALL_HINT}); the chDB engine is still tested")


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chdb_url() -> Iterator[str]:
    with private_data_dir("chdb") as folder:
        yield f"chdb://{folder}?database=nhdp_test"


@pytest.fixture(scope="module")
def native_store(request):
    _require_server()
    settings = request.getfixturevalue("stack_settings")
    store = open_store(settings.analytics_url(), password=settings.analytics_password())
    yield store
    store.close()


@pytest.fixture(scope="module")
def chdb_store(chdb_url):
    # Module scope: a process may hold one chDB folder at a time, so release it for other modules.
    store = open_store(chdb_url, purpose="tests/test_analytics_store.py")
    yield store
    store.close()


@pytest.fixture(params=["clickhouse", "chdb"])
def store(request):
    return request.getfixturevalue("native_store" if request.param == "clickhouse" else "chdb_store")


# -- a small, deterministic slice of the event log -------------------------------------

FACTS_DDL = """
CREATE TABLE {table} (
    event_id String,
    event_type String,
    occurred_at DateTime('UTC'),
    province_code String,
    subject_id String,
    vaccine String,
    dose_number UInt8,
    severity Nullable(String),
    symptoms Array(String),
    doses UInt32,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (province_code, event_id)
"""
COLUMNS = [
    "event_id",
    "event_type",
    "occurred_at",
    "province_code",
    "subject_id",
    "vaccine",
    "dose_number",
    "severity",
    "symptoms",
    "doses",
    "version",
]
VACCINES = ["astrazeneca", "pfizer", "moderna", "sinopharm", "janssen"]
PROVINCES = ["01", "48", "79", "92"]


def make_events(n: int = 3000, seed: int = 2021) -> list[tuple]:
    rnd = random.Random(seed)
    # Around midnight in Hồ Chí Minh City (17:00 UTC), so the day boundary matters.
    start = datetime(2021, 8, 9, 12, 0, tzinfo=UTC)
    rows = []
    for i in range(n):
        event_type = rnd.choice(["DoseAdministered"] * 4 + ["AdverseEventReported"])
        rows.append(
            (
                str(uuid.UUID(int=rnd.getrandbits(128))),
                event_type,
                start + timedelta(seconds=rnd.randrange(0, 36 * 3600)),
                rnd.choice(PROVINCES),
                f"subject-{rnd.randrange(n // 2):05d}",
                rnd.choice(VACCINES),
                rnd.randint(1, 3),
                rnd.choice(["mild", "serious"]) if event_type == "AdverseEventReported" else None,
                rnd.sample(["fever", "cough", "fatigue"], rnd.randint(0, 2)),
                0,
                i,
            )
        )
    return rows


EVENTS = make_events()
# Redelivery after a crash: the same facts again, plus later versions of a few (which must win).
RETRIES = [r for r in EVENTS[::7]] + [r[:5] + ("pfizer",) + r[6:10] + (10_000 + r[10],) for r in EVENTS[::11]]


def latest() -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for row in EVENTS + RETRIES:
        if row[0] not in out or row[10] > out[row[0]][10]:
            out[row[0]] = row
    return out


@pytest.fixture
def facts(store, request):
    """A fresh facts table holding EVENTS and then RETRIES, inserted as two separate blocks."""
    table = f"facts_{request.node.name.split('[')[0].removeprefix('test_')}"[:60]
    store.execute(f"DROP TABLE IF EXISTS {table}")
    store.execute(FACTS_DDL.format(table=table))
    # Keep the two inserts as two parts, so the queries below must deduplicate by themselves.
    store.execute(f"SYSTEM STOP MERGES {table}")
    assert store.insert(table, COLUMNS, EVENTS) == len(EVENTS)
    assert store.insert(table, COLUMNS, RETRIES) == len(RETRIES)
    yield table
    store.execute(f"DROP TABLE IF EXISTS {table}")


# -- both engines, one oracle --------------------------------------------------------------


def test_duplicates_count_once_despite_unmerged_parts(store, facts):
    truth = latest()
    raw = store.execute(f"SELECT count() FROM {facts}")[0][0]
    # Merges are stopped, so both parts are still there. (26.x already collapses duplicates
    # within one inserted block, optimize_on_insert; 18.16 keeps them: never count raw rows.)
    assert raw >= len(EVENTS) + len({r[0] for r in RETRIES}) > len(truth)

    assert store.execute(f"SELECT count() FROM {facts} FINAL") == [(len(truth),)]
    assert store.execute(f"SELECT count() FROM (SELECT event_id FROM {facts} GROUP BY event_id)") == [(len(truth),)]
    # The highest version wins, with or without FINAL.
    want = Counter(r[5] for r in truth.values())
    by_final = store.execute(f"SELECT vaccine, count() FROM {facts} FINAL GROUP BY vaccine ORDER BY vaccine")
    by_argmax = store.execute(
        f"SELECT v, count() FROM (SELECT event_id, argMax(vaccine, version) AS v FROM {facts} GROUP BY event_id) "
        "GROUP BY v ORDER BY v"
    )
    assert by_final == by_argmax == sorted(want.items())


def test_doses_per_day_in_vietnam(store, facts):
    truth = latest().values()
    want = Counter((r[2].astimezone(HCM).date(), r[3]) for r in truth if r[1] == "DoseAdministered")
    got = store.execute(
        f"""
        SELECT toDate(occurred_at, 'Asia/Ho_Chi_Minh') AS local_day, province_code, count() AS n
        FROM {facts} FINAL
        WHERE event_type = %(type)s
        GROUP BY local_day, province_code
        ORDER BY local_day, province_code
        """,
        {"type": "DoseAdministered"},
    )
    assert got == sorted((d, p, n) for (d, p), n in want.items())
    assert all(type(d) is date and type(n) is int for d, _, n in got)


def test_people_counted_in_province_of_earliest_dose(store, facts):
    doses = [r for r in latest().values() if r[1] == "DoseAdministered"]
    first: dict[str, tuple] = {}
    for r in doses:
        if r[4] not in first or (r[2], r[0]) < (first[r[4]][2], first[r[4]][0]):
            first[r[4]] = r
    want = Counter(r[3] for r in first.values())
    got = store.execute(
        f"""
        SELECT first_province, count() FROM (
            SELECT subject_id, argMin(province_code, (occurred_at, event_id)) AS first_province
            FROM {facts} FINAL WHERE event_type = 'DoseAdministered' GROUP BY subject_id
        ) GROUP BY first_province ORDER BY first_province
        """
    )
    assert got == sorted(want.items())
    assert store.execute(f"SELECT uniqExact(subject_id) FROM {facts} FINAL WHERE event_type = 'DoseAdministered'") == [
        (len(first),)
    ]


def test_conditional_aggregates_arrays_and_nullable(store, facts):
    truth = list(latest().values())
    adverse = [r for r in truth if r[1] == "AdverseEventReported"]
    got = store.execute(
        f"""
        SELECT countIf(dose_number >= 2), sumIf(dose_number, vaccine = 'janssen'),
               countIf(notEmpty(symptoms)), countIf(has(symptoms, 'fever')),
               countIf(severity IS NULL), countIf(severity = 'serious'), max(occurred_at), min(occurred_at)
        FROM {facts} FINAL
        """
    )
    assert got == [
        (
            sum(r[6] >= 2 for r in truth),
            sum(r[6] for r in truth if r[5] == "janssen"),
            sum(bool(r[8]) for r in truth),
            sum("fever" in r[8] for r in truth),
            sum(r[7] is None for r in truth),
            sum(r[7] == "serious" for r in adverse),
            max(r[2] for r in truth),
            min(r[2] for r in truth),
        )
    ]
    symptoms = store.execute(
        f"SELECT symptom, count() FROM {facts} FINAL ARRAY JOIN symptoms AS symptom GROUP BY symptom ORDER BY symptom"
    )
    assert symptoms == sorted(Counter(s for r in truth for s in r[8]).items())
    row = store.execute(
        f"SELECT symptoms, severity, occurred_at FROM {facts} FINAL WHERE event_id = %(id)s", {"id": adverse[0][0]}
    )
    assert row == [(adverse[0][8], adverse[0][7], adverse[0][2])]


def test_parameters_filter_identically(store, facts):
    truth = list(latest().values())
    frm, to = datetime(2021, 8, 10, 7, 0, tzinfo=HCM), datetime(2021, 8, 10, 23, 0, tzinfo=UTC)
    provinces = ("79", "01")
    got = store.execute(
        f"""
        SELECT count() FROM {facts} FINAL
        WHERE occurred_at >= %(from)s AND occurred_at < %(to)s AND province_code IN %(provinces)s
          AND toDate(occurred_at, 'Asia/Ho_Chi_Minh') >= %(day)s
        """,
        {"from": frm, "to": to, "provinces": provinces, "day": date(2021, 8, 10)},
    )
    assert got == [
        (
            sum(
                frm <= r[2] < to and r[3] in provinces and r[2].astimezone(HCM).date() >= date(2021, 8, 10)
                for r in truth
            ),
        )
    ]
    # An empty selection matches nothing instead of failing to parse on 18.16.
    assert store.execute(f"SELECT count() FROM {facts} WHERE province_code IN %(p)s", {"p": ()}) == [(0,)]
    assert store.execute(f"SELECT count() FROM {facts} FINAL WHERE province_code NOT IN %(p)s", {"p": set()}) == [
        (len(truth),)
    ]


def test_types_and_literals(store):
    assert isinstance(store, AnalyticsStore) and store.engine in ("clickhouse", "chdb")
    nasty = "it's a \\ back\nslash\t%(not a param)s 'quoted' \0 tiếng Việt"
    got = store.execute(
        """
        SELECT %(s)s, length(%(s)s), %(d)s, %(t)s, %(u)s, %(xs)s, %(n)s, %(b)s, %(f)s,
               toUUID(%(u)s), CAST(NULL AS Nullable(String)), [toDate('2021-08-10')],
               toDateTime(1628614800, 'Asia/Ho_Chi_Minh'), (1, 'a'), toDecimal64(1.25, 2), 1 / 4, -1
        """,
        {
            "s": nasty,
            "d": date(2021, 8, 10),
            "t": datetime(2021, 8, 10, 20, 0, tzinfo=HCM),
            "u": uuid.UUID(int=7),
            "xs": ["a", "b"],
            "n": None,
            "b": True,
            "f": 0.5,
        },
    )
    from decimal import Decimal

    assert got == [
        (
            nasty,
            len(nasty.encode()),
            date(2021, 8, 10),
            datetime(2021, 8, 10, 13, 0, tzinfo=UTC),
            str(uuid.UUID(int=7)),
            ["a", "b"],
            None,
            1,
            0.5,
            uuid.UUID(int=7),
            None,
            [date(2021, 8, 10)],
            datetime(2021, 8, 10, 17, 0, tzinfo=UTC),
            (1, "a"),
            Decimal("1.25"),
            0.25,
            -1,
        )
    ]
    assert [type(v) for v in got[0][:4]] == [str, int, date, datetime]
    assert store.execute("SELECT number FROM numbers(10) WHERE number > 100") == []


def test_errors_carry_the_servers_message(store):
    with pytest.raises(AnalyticsStoreError) as bad_sql:
        store.execute("SELEC 1")
    assert bad_sql.value.code == 62 and "Syntax error" in str(bad_sql.value) and "SELEC 1" in str(bad_sql.value)
    assert "Stack trace" not in str(bad_sql.value)
    with pytest.raises(AnalyticsStoreError) as missing:
        store.execute("SELECT * FROM no_such_table_here")
    assert missing.value.code == 60 and "no_such_table_here" in str(missing.value)
    with pytest.raises(AnalyticsStoreError, match="no such parameter"):
        store.execute("SELECT %(absent)s", {})

    store.execute("DROP TABLE IF EXISTS typed")
    store.execute("CREATE TABLE typed (a UInt32, b String) ENGINE = MergeTree ORDER BY a")
    with pytest.raises(AnalyticsStoreError, match="column b"):
        store.insert("typed", ["a", "b"], [(1, "x"), (2, 3)])
    with pytest.raises(AnalyticsStoreError, match="row 1 has 1 values"):
        store.insert("typed", ["a", "b"], [(1, "x"), (2,)])
    # The store is still usable after a rejected batch.
    assert store.insert("typed", ["a", "b"], [(1, "x")]) == 1
    assert store.execute("SELECT a, b FROM typed") == [(1, "x")]


def test_engines_agree(native_store, chdb_store):
    """Value for value and type for type, the same SQL gives the same answer on both engines."""
    tables = []
    for s in (native_store, chdb_store):
        s.execute("DROP TABLE IF EXISTS agree")
        s.execute(FACTS_DDL.format(table="agree"))
        s.insert("agree", COLUMNS, EVENTS)
        s.insert("agree", COLUMNS, RETRIES)
        tables.append(s)
    queries = [
        "SELECT province_code, count(), uniqExact(subject_id), countIf(dose_number = 1) FROM agree FINAL GROUP BY province_code ORDER BY province_code",
        "SELECT toDate(occurred_at, 'Asia/Ho_Chi_Minh') AS d, vaccine, count() FROM agree FINAL GROUP BY d, vaccine ORDER BY d, vaccine",
        "SELECT toStartOfDay(occurred_at, 'Asia/Ho_Chi_Minh') AS d, count() FROM agree FINAL GROUP BY d ORDER BY d",
        "SELECT subject_id, argMin(province_code, (occurred_at, event_id)), min(occurred_at), arraySort(groupArray(dose_number)) FROM agree FINAL GROUP BY subject_id ORDER BY subject_id LIMIT 50",
        "SELECT event_id, argMax(vaccine, version), max(version) FROM agree GROUP BY event_id ORDER BY event_id LIMIT 50",
        # Not ORDER BY 1: 18.16 reads a position as the constant 1 and leaves the rows unsorted.
        "SELECT ifNull(severity, 'none') AS sev, count() FROM agree FINAL GROUP BY sev ORDER BY sev",
        "SELECT symptoms, severity, occurred_at, doses FROM agree FINAL ORDER BY event_id LIMIT 20",
        "SELECT province_code, count() AS n FROM agree FINAL GROUP BY province_code HAVING n > 700 ORDER BY province_code",
        "SELECT province_code, vaccine FROM agree FINAL ORDER BY occurred_at, event_id LIMIT 1 BY province_code",
    ]
    for sql in queries:
        a, b = native_store.execute(sql), chdb_store.execute(sql)
        assert a == b, sql
        assert [[type(v) for v in row] for row in a] == [[type(v) for v in row] for row in b], sql
    for s in tables:
        s.execute("DROP TABLE agree")


def test_a_block_encoded_in_another_process_inserts_as_its_rows(store):
    """The sink's decoders encode rows into Native blocks and pickle them to the sink, which
    inserts them as they are (on the server: as the data packet of the INSERT)."""
    for table in ("as_rows", "as_block"):
        store.execute(f"DROP TABLE IF EXISTS {table}")
        store.execute(FACTS_DDL.format(table=table))
    types = [(c, {r[0]: r[1] for r in store.execute("DESCRIBE TABLE as_block")}[c]) for c in COLUMNS]
    assert store.column_types("as_block", COLUMNS) == types
    block = pickle.loads(pickle.dumps(encode_block(types, EVENTS)))
    assert len(block) == len(EVENTS)
    assert store.insert("as_block", COLUMNS, block) == len(EVENTS)
    store.insert("as_rows", COLUMNS, EVENTS)
    sql = "SELECT * FROM {} ORDER BY event_id"
    assert store.execute(sql.format("as_block")) == store.execute(sql.format("as_rows"))
    with pytest.raises(AnalyticsStoreError, match="block of columns"):
        store.insert("as_block", list(reversed(COLUMNS)), block)
    with pytest.raises(AnalyticsStoreError, match="column dose_number"):
        encode_block(types, [EVENTS[0][:6] + ("two",) + EVENTS[0][7:]])
    for table in ("as_rows", "as_block"):
        store.execute(f"DROP TABLE {table}")


# -- chDB ownership ----------------------------------------------------------------------


def _open_in_subprocess(url: str, hold_s: float = 0.0) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import sys, time
        from projections.clickhouse.connect import open_store
        from projections.clickhouse.store import AnalyticsStoreError
        try:
            store = open_store({url!r}, purpose="a second process")
        except AnalyticsStoreError as exc:
            print(exc)
            sys.exit(3)
        print(store.execute("SELECT 42")[0][0])
        time.sleep({hold_s})
        """
    )
    return subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, timeout=120)


def test_chdb_owner_refuses_a_second_process(chdb_store, chdb_url):
    path = str(chdb_store.path)
    result = _open_in_subprocess(chdb_url)
    assert result.returncode == 3, result.stdout + result.stderr
    assert path in result.stdout and f"pid {os.getpid()}" in result.stdout
    assert "tests/test_analytics_store.py" in result.stdout  # the owner's purpose

    # A second store in the owning process shares the lock; closing it keeps the lock held.
    again = open_store(chdb_url)
    assert again.execute("SELECT 1") == [(1,)]
    again.close()
    assert _open_in_subprocess(chdb_url).returncode == 3
    assert chdb_store.execute("SELECT 2") == [(2,)]


def test_chdb_one_folder_per_process(chdb_store, tmp_path):
    with pytest.raises(AnalyticsStoreError, match="one data folder per process"):
        open_store(f"chdb://{tmp_path}")


def test_chdb_lock_is_released_when_the_owner_exits(tmp_path):
    url = f"chdb://{tmp_path / 'owned'}"
    first = _open_in_subprocess(url)
    assert first.returncode == 0 and first.stdout.strip() == "42", first.stdout + first.stderr
    assert (tmp_path / "owned" / OWNER_LOCK).exists()
    # The first owner is gone (its flock went with it): the next process may own the folder.
    second = _open_in_subprocess(url)
    assert second.returncode == 0, second.stdout + second.stderr


# -- the server as a managed service ---------------------------------------------------------


def test_server_starts_and_stops_leaving_no_process(tmp_path, record_property):
    _require_server()
    from nhdp.stack import free_ports

    tcp, http = free_ports(2)
    settings = Settings(data_dir=tmp_path / "data", clickhouse_url=None, clickhouse_port=tcp, clickhouse_http_port=http)
    service = server_service(settings)
    assert service.pid() is None

    started = time.monotonic()
    pid, started_now = service.start(timeout_s=60)
    cold_start_s = time.monotonic() - started
    record_property("clickhouse_cold_start_s", round(cold_start_s, 2))
    try:
        assert started_now and cold_start_s < 30
        assert service.status()["state"] == "up"
        assert service.start(timeout_s=10) == (pid, False)  # idempotent
        assert str(config_path(settings)) in " ".join(psutil.Process(pid).cmdline())

        # Loopback only, and only the two ports we asked for.
        listening = {
            c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        }
        assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", tcp), ("127.0.0.1", http)}

        ensure_database(settings)
        store = open_store(settings.analytics_url(), password=settings.analytics_password())
        try:
            ((database, tz),) = store.execute("SELECT currentDatabase(), timezone()")
            assert database == settings.clickhouse_db and tz in ("UTC", "Etc/UTC")
        finally:
            store.close()
    finally:
        assert service.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert service.pid() is None and not service.pid_file.exists()
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(config_path(settings)) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
    with pytest.raises(AnalyticsStoreError) as down:
        open_store(settings.analytics_url(), password=settings.analytics_password())
    assert down.value.retryable

"""ClickHouse cluster mode, for real: ZooKeeper and 2 shards × 2 replicas of clickhouse-server.

One private stack for the module with NHDP_CLICKHOUSE_CLUSTER_SHARDS=2: PostgreSQL, Kafka,
ZooKeeper, four clickhouse-server processes, the registry, the worker, the sink (writing
through the Distributed tables) and the API. No supervisor: the replica test kills a server
and starts it again itself.

Oracles: the PostgreSQL projections (every figure, `verify`, and valid_doses for
/v1/analytics/doses), and the two replicas of a shard, each asked directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from infra import clickhouse
from infra.tools import server_binary
from nhdp import stack
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from projections.clickhouse.connect import open_store
from projections.postgres import read_models
from streams.sink.audit import verify, wait_caught_up
from tests.helpers import api
from tests.helpers import nhdp_cli as nhdp
from tests.helpers import wait_caught_up as wait_postgres

pytestmark = [pytest.mark.stack, pytest.mark.cluster]

SIM = simulate("national", seed=31, days=2, daily_doses=800)  # ~10k events, voids included
LOCAL_TABLES = ("events", "event_index", "voids", "subjects", "points", "hour_marks", "sink_batches")


@pytest.fixture(scope="module")
def cluster():
    if server_binary() is None or shutil.which("java") is None or shutil.which("mvn") is None:
        pytest.skip("cluster mode needs clickhouse-server, java and mvn")
    data = Path(tempfile.mkdtemp(prefix="nhdp-test-cluster-"))
    settings = stack.private_settings(data, clickhouse_cluster_shards=2, start_timeout_s=180.0)
    try:
        stack.up(settings, supervise=False)
        publish(settings, list(SIM.events()))
        caught_up(settings)
        yield settings
    finally:
        stack.down(settings)
        stack.end_matching(lambda args: str(data) in " ".join(args))
        shutil.rmtree(data, ignore_errors=True)


def publish(settings, events: list[dict], batch: int = 5000) -> None:
    pseudonymiser = Pseudonymiser.from_settings(settings)
    with EventProducer(settings, source="test-cluster") as producer:
        for i in range(0, len(events), batch):
            producer.publish_json(events[i : i + batch], pseudonymiser)


def caught_up(settings, timeout_s: float = 300) -> None:
    wait_postgres(settings, timeout_s=timeout_s)
    wait_caught_up(settings, timeout_s=timeout_s)


def server(settings, shard: int, replica: int):
    """That one server, asked directly (its local tables), not through the Distributed ones."""
    for s, r, tcp, _http, _inter in settings.clickhouse_cluster_servers():
        if (s, r) == (shard, replica):
            return open_store(
                f"clickhouse://127.0.0.1:{tcp}/{settings.clickhouse_db}", password=settings.analytics_password()
            )
    raise KeyError((shard, replica))


def final_counts(settings, shard: int, replica: int) -> dict[str, int]:
    store = server(settings, shard, replica)
    try:
        return {t: store.execute(f"SELECT count() FROM {t}_local FINAL")[0][0] for t in LOCAL_TABLES}
    finally:
        store.close()


def local_rows(settings, shard: int, replica: int) -> int:
    """Rows in that server's parts of events_local, quorum reached or not."""
    store = server(settings, shard, replica)
    try:
        return store.execute("SELECT count() FROM events_local")[0][0]
    finally:
        store.close()


def twins_agree(settings, shard: int, timeout_s: float = 120) -> dict[str, int]:
    """The FINAL counts of a shard's two replicas, once equal (the sink may still be writing rollup marks)."""
    deadline = time.monotonic() + timeout_s
    while (first := final_counts(settings, shard, 1)) != (second := final_counts(settings, shard, 2)):
        assert time.monotonic() < deadline, f"shard {shard}'s replicas differ: {first} != {second}"
        time.sleep(0.5)
    return first


def pg_doses(settings, group_by: list[str]) -> list[dict]:
    select = [f"{k}" for k in group_by] + ["count(*)", "count(DISTINCT subject_id)"]
    sql = f"SELECT {', '.join(select)} FROM proj.valid_doses"
    if group_by:
        sql += f" GROUP BY {', '.join(group_by)} ORDER BY {', '.join(group_by)}"
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(sql).fetchall()
    return [{**dict(zip(group_by, r)), "doses": r[-2], "people": r[-1]} for r in rows]


def test_the_stack_runs_two_shards_of_two_replicas(cluster):
    url = cluster.analytics_url()
    assert url.endswith(f"?cluster={cluster.clickhouse_cluster}")
    names = [step.service.name for step in stack.steps(cluster)]
    assert names[names.index("kafka") + 1 : names.index("registry")] == [
        "zookeeper",
        "clickhouse-1-1",
        "clickhouse-1-2",
        "clickhouse-2-1",
        "clickhouse-2-2",
    ]
    store = open_store(url, password=cluster.analytics_password())
    try:
        engines = dict(store.execute("SELECT name, engine FROM system.tables WHERE database = currentDatabase()"))
        assert engines["events"] == "Distributed" and engines["events_local"] == "ReplicatedReplacingMergeTree"
        assert engines["schema_migrations"] == "Distributed"
        assert {int(v) for (v,) in store.execute("SELECT version FROM schema_migrations FINAL")} == {1, 2}
    finally:
        store.close()
    # users.xml holds the sha256 only; cluster.xml the password the Distributed engine signs in with: both 0600
    for shard, replica, *_ in cluster.clickhouse_cluster_servers():
        root = clickhouse.cluster_server_dir(cluster, shard, replica)
        for path in (root / "users.xml", root / "config.d" / "cluster.xml"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert cluster.analytics_password() not in (root / "users.xml").read_text()


def test_rows_are_sharded_by_event_and_each_shard_has_equal_replicas(cluster):
    counts = {shard: twins_agree(cluster, shard) for shard in (1, 2)}
    assert counts[1]["events"] > 0 and counts[2]["events"] > 0  # both shards hold events
    store = open_store(cluster.analytics_url(), password=cluster.analytics_password())
    try:
        ((total, distinct),) = store.execute("SELECT count(), uniqExact(event_id) FROM events FINAL")
    finally:
        store.close()
    # no event on both shards, and the Distributed table reads exactly the union of the shards
    assert total == distinct == counts[1]["events"] + counts[2]["events"]


def test_analytics_equal_postgres(cluster):
    diffs, positions = verify(cluster)
    assert diffs == []
    assert sum(positions.values()) >= SIM.total_events
    now = datetime.now(UTC).isoformat()
    with api(cluster) as client, psycopg.connect(cluster.postgres_url) as conn:
        national = client.get("/v1/national/summary", params={"as_of": now})
        assert national.status_code == 200, national.text
        assert national.headers["NHDP-Store"] == "analytics"
        want = read_models.national_summary(conn, "proj")
        for figure, value in want.items():
            if figure in national.json() and not isinstance(value, dict):
                assert national.json()[figure] == value, figure
        for group_by in (["province", "vaccine", "dose_number"], ["vaccine"], []):
            doses = client.get("/v1/analytics/doses", params={"group_by": ",".join(group_by)} if group_by else {})
            assert doses.status_code == 200, doses.text
            assert doses.json()["rows"] == pg_doses(cluster, group_by), group_by


def test_verify_analytics_and_a_replay_on_the_cluster(cluster):
    """`nhdp verify-analytics`, and `nhdp replay --verify`, whose database is created on every server."""
    done = nhdp(cluster, "verify-analytics")
    assert done.returncode == 0 and "0 differences" in done.stdout, done.stdout + done.stderr
    done = nhdp(cluster, "replay", "--into", "c1", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    for shard, replica, *_ in cluster.clickhouse_cluster_servers():
        store = server(cluster, shard, replica)
        try:
            assert store.execute("EXISTS TABLE replay_c1.events_local")[0][0] == 1
        finally:
            store.close()


def test_a_replica_killed_while_the_sink_writes_catches_up_and_the_answers_stay_exact(cluster):
    """SIGKILL the twin of the server the sink talks to, while events are posted through the gateway;
    start it again; every figure still equals PostgreSQL's, and the replica has what its twin has."""
    victim = next(s.service for s in stack.steps(cluster) if s.service.name == "clickhouse-1-2")
    more = list(simulate("national", seed=32, days=1, daily_doses=1500).events())
    posted: list[int] = []
    failures: list[str] = []

    def post() -> None:
        with api(cluster, "producer", source="test-cluster", provinces=["*"]) as client:
            for i in range(0, len(more), 250):
                body = [e | {"source": "test-cluster"} for e in more[i : i + 250]]
                for _attempt in range(60):
                    reply = client.post("/v1/events", json=body)
                    if reply.status_code == 200:
                        posted.append(len(body))
                        break
                    time.sleep(float(reply.headers.get("Retry-After", "0.5")))  # back-pressure: send again
                else:
                    failures.append(reply.text)
                    return
                time.sleep(0.05)

    before = sum(wait_positions(cluster).values())
    poster = threading.Thread(target=post, name="poster")
    poster.start()
    try:
        deadline = time.monotonic() + 60
        while sum(wait_positions(cluster).values()) <= before:  # the sink is writing the new events
            assert time.monotonic() < deadline, "the sink wrote nothing"
            time.sleep(0.1)
        pid = victim.pid()
        assert pid is not None
        at_kill = local_rows(cluster, 1, 1)
        os.kill(pid, signal.SIGKILL)
        time.sleep(6)  # events keep arriving while the replica is gone (and its session expires)
        assert victim.pid() is None
        victim.start(cluster.start_timeout_s)
    finally:
        poster.join(300)
    assert not poster.is_alive() and not failures, failures
    assert sum(posted) == len(more)

    caught_up(cluster)
    diffs, _ = verify(cluster)
    assert diffs == []
    # the restarted replica fetched every part it missed: its FINAL counts equal its twin's
    # Meanwhile the sink's insert into shard 1 waited for its quorum (insert_quorum=2), its part on the
    # twin only, and returned once the replica was back and had fetched it; the writes went on after.
    assert twins_agree(cluster, 1)["events"] > at_kill
    sink_log = (cluster.log_dir / "sink.log").read_text()
    assert "dead-lettering" not in sink_log  # waits and retries while the quorum could not be met, never a loss
    # and answers for its shard: asked through the Distributed tables many times (random replica), always exact
    for _ in range(5):
        diffs, _ = verify(cluster)
        assert diffs == []


def wait_positions(settings) -> dict[int, int]:
    from streams.sink.audit import sink_positions

    return sink_positions(settings)

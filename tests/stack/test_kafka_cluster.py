"""Kafka as a 3-node KRaft cluster (`nhdp up --cluster`): nodes die while the gateway takes events.

The whole stack runs on the cluster (replication factor 3, min ISR 2, no
unclean election). What must hold:
- a node SIGKILLed mid-campaign, the active controller included, loses no
  accepted event and duplicates none in any figure: PostgreSQL's projections
  equal a replay of the log and ClickHouse equals PostgreSQL;
- with two of three nodes down the gateway answers 503 and keeps nothing of the
  request; the same request succeeds once the nodes are back.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter

import httpx
import psutil
import psycopg
import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from infra import kafka
from nhdp import stack
from producers.client import GatewayClient, Tally
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from tests.helpers import TopicLog, post, private_data_dir, token, valid_event, wait_caught_up
from tests.stack.test_replay import nhdp

pytestmark = pytest.mark.cluster

LEADER = re.compile(r"\[RaftManager id=(\d+)\] Completed transition to Leader\(.*?epoch=(\d+)")


@pytest.fixture(scope="module")
def cluster():
    with private_data_dir("cluster") as data:
        # and two API processes on one port: the campaign below goes through both
        settings = stack.private_settings(data, kafka_nodes=3, api_processes=2, start_timeout_s=180.0)
        try:
            stack.up(settings)
            yield settings
        finally:
            stack.down(settings)


def services(settings) -> dict[int, object]:
    return {i: svc for i, svc in enumerate(kafka.services(settings), start=1)}


def active_controller(settings) -> int:
    """The KRaft quorum's leader: the node that last completed the move to leader, at the highest
    epoch, in the nodes' logs (the Python clients have no DescribeQuorum)."""
    best = (-1, -1)
    for svc in kafka.services(settings):
        for line in svc.log_file.read_text(errors="replace").splitlines():
            m = LEADER.search(line)
            if m:
                best = max(best, (int(m.group(2)), int(m.group(1))))
    assert best[1] > 0, "no node has led the controller quorum"
    return best[1]


def all_brokers_back(settings, timeout_s: float = 180.0) -> None:
    """Every node restarted by the supervisor, registered, and every partition's replicas in sync."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(**kafka.as_admin(settings).kafka_python_config(), request_timeout_ms=5000)
            try:
                brokers = len(admin.describe_cluster()["brokers"])
                parts = [p for t in admin.describe_topics(["health.events"]) for p in t["partitions"]]
            finally:
                admin.close()
            if brokers == 3 and all(len(p["isr_nodes"]) == 3 for p in parts):
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "the cluster did not heal"
        time.sleep(1)


def kill(svc) -> int:
    pid = svc.pid()
    assert pid is not None, f"{svc.name} is not running"
    os.kill(pid, signal.SIGKILL)
    return pid


def test_topics_are_replicated_three_times_with_two_in_sync_required(cluster):
    admin = KafkaAdminClient(**kafka.as_admin(cluster).kafka_python_config())
    try:
        assert len(admin.describe_cluster()["brokers"]) == 3
        topics = admin.describe_topics(["health.events", "province.79.events", "health.events.dlq"])
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "health.events")])
    finally:
        admin.close()
    for topic in topics:
        assert topic["error_code"] == 0, topic
        assert all(len(p["replica_nodes"]) == 3 for p in topic["partitions"]), topic
    values = configs["topic"]["health.events"]
    assert values["min.insync.replicas"]["value"] == "2"
    assert values["unclean.leader.election.enable"]["value"] == "false"
    assert values["retention.ms"]["value"] == "-1"  # the log of record is kept


def test_two_api_processes_share_the_port(cluster):
    master = psutil.Process(stack.api_service(cluster).pid())
    # (multiprocessing's resource tracker is a child too)
    children = [c for c in master.children() if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(children) == 2
    for child in children:  # each accepts from the one listening socket
        listening = [c for c in child.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.port for c in listening] == [cluster.api_port], child
    for _ in range(20):
        assert httpx.get(f"{cluster.api_url}/healthz", timeout=10).status_code == 200


def test_killing_nodes_mid_campaign_loses_and_duplicates_nothing(cluster):
    """Posted in batches while the active controller, and then another node, are SIGKILLed (the
    supervisor starts each again): every accepted event is in the log and counted exactly once."""
    codec = Codec(RegistryClient.for_settings(cluster))
    log = TopicLog(cluster)
    before = log.ends()
    batches = [[valid_event() for _ in range(100)] + [valid_event("CheckedIn")] for _ in range(40)]
    answers: list[dict] = []
    failure: list[BaseException] = []
    tally = Tally()

    def campaign() -> None:
        client = GatewayClient(cluster.api_url, lambda s: token(cluster, "producer", source=s), max_wait_s=300)
        try:
            for batch in batches:
                answers.append(client.post(batch, tally))
                time.sleep(0.2)
        except BaseException as exc:
            failure.append(exc)
        finally:
            client.close()

    poster = threading.Thread(target=campaign)
    poster.start()
    nodes = services(cluster)
    while len(answers) < 5 and poster.is_alive():
        time.sleep(0.1)
    controller = active_controller(cluster)
    killed = [kill(nodes[controller])]
    time.sleep(6)
    all_brokers_back(cluster)  # the supervisor started it again
    other = next(i for i in nodes if i != active_controller(cluster))
    killed.append(kill(nodes[other]))
    poster.join(600)
    assert not failure, failure
    all_brokers_back(cluster)
    assert all(svc.pid() not in killed for svc in nodes.values())

    events = [e for batch in batches for e in batch]
    assert sum(a["accepted"] + a["duplicates"] for a in answers) == len(events)
    assert all(a["rejected"] == [] for a in answers)
    in_log = Counter(d["event_id"] for d in codec.decode_many([m.value for m in log.read(before)]))
    assert set(in_log) == {e["event_id"] for e in events}, "an accepted event is not in the log"
    log.close()

    wait_caught_up(cluster, timeout_s=300)
    with psycopg.connect(cluster.postgres_url) as conn:
        doses, visits = conn.execute(
            "SELECT (SELECT count(*) FROM proj.events WHERE etype = 3 AND event_id = ANY(%(ids)s::uuid[])),"
            " (SELECT count(*) FROM proj.visits WHERE event_id = ANY(%(ids)s::uuid[]))",
            {"ids": [e["event_id"] for e in events]},
        ).fetchone()
        (counted,) = conn.execute("SELECT sum(value) FROM proj.counters WHERE figure = 'doses_administered'").fetchone()
    assert (doses, visits) == (4000, 40)
    assert counted == 4000  # this stack's log holds only these doses
    replay = nhdp(cluster, "replay", "--verify")
    assert replay.returncode == 0 and "0 differences" in replay.stdout, replay.stdout + replay.stderr
    analytics = nhdp(cluster, "verify-analytics")
    assert analytics.returncode == 0 and "0 differences" in analytics.stdout, analytics.stdout + analytics.stderr


def test_two_nodes_down_means_503_and_nothing_kept(cluster):
    nodes = services(cluster)
    events = [valid_event() for _ in range(20)]
    log = TopicLog(cluster)
    before = log.ends()
    down = [nodes[2], nodes[3]]
    try:
        for svc in down:  # on purpose: the supervisor leaves them down
            svc.stop()
        time.sleep(1.5)  # past the gateway's cached reachability probe
        resp = post(cluster, events)
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"]
        assert resp.json().get("accepted", 0) == 0
    finally:
        for svc in down:
            svc.start(180)
    all_brokers_back(cluster)
    deadline = time.monotonic() + 180
    while (resp := post(cluster, events)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(2)
    assert resp.status_code == 200, resp.text
    # The refused request kept no reservation, so the same request is accepted now, whole. A write
    # the lone node took without its quorum may still reach the log (unacknowledged, then
    # replicated once the nodes return): a second copy of an event_id, which every consumer
    # drops. So: each event in the log, and counted once.
    assert resp.json() == {"accepted": 20, "duplicates": 0, "rejected": []}
    codec = Codec(RegistryClient.for_settings(cluster))
    in_log = {d["event_id"] for d in codec.decode_many([m.value for m in log.read(before)])}
    log.close()
    ids = [e["event_id"] for e in events]
    assert in_log == set(ids)
    wait_caught_up(cluster, timeout_s=300)
    with psycopg.connect(cluster.postgres_url) as conn:
        rows = conn.execute("SELECT count(*) FROM proj.events WHERE etype = 3 AND event_id = ANY(%s::uuid[])", (ids,))
        assert rows.fetchone()[0] == 20
    replay = nhdp(cluster, "replay", "--verify")
    assert replay.returncode == 0 and "0 differences" in replay.stdout, replay.stdout + replay.stderr

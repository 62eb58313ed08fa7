"""The shapes of the local stack beyond one node: settings, and the Kafka nodes' configuration."""

from __future__ import annotations

import os
import stat

import pytest

from infra import kafka
from infra.settings import STACK_FILE, Settings
from nhdp.stack import private_settings


@pytest.fixture(autouse=True)
def no_stack_environment(monkeypatch):
    """Settings from defaults and what each test gives: a whole run's stack fixtures export NHDP_*."""
    for name in [k for k in os.environ if k.startswith("NHDP_")]:
        monkeypatch.delenv(name)


def props(path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_three_nodes_get_a_port_pair_each_two_apart_by_default(tmp_path):
    s = Settings(data_dir=tmp_path, kafka_nodes=3)
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert s.kafka_local_nodes() == [("127.0.0.1", 9092, 9093), ("127.0.0.1", 9094, 9095), ("127.0.0.1", 9096, 9097)]
    assert s.kafka_replication_factor == 3
    one = Settings(data_dir=tmp_path)
    assert one.kafka_local_nodes() == [("127.0.0.1", 9092, 9093)] and one.kafka_replication_factor == 1


def test_a_private_cluster_gets_distinct_free_ports(tmp_path):
    s = private_settings(tmp_path, kafka_nodes=3)
    ports = [p for _, broker, ctl in s.kafka_local_nodes() for p in (broker, ctl)]
    assert len(ports) == 6 and len(set(ports)) == 6
    assert [n.name for n in kafka.nodes(s)] == ["kafka-1", "kafka-2", "kafka-3"]
    assert len({n.folder for n in kafka.nodes(s)}) == 3


def test_the_data_folders_stack_file_keeps_its_shape_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NHDP_DATA_DIR", str(tmp_path))
    (tmp_path / STACK_FILE).write_text("NHDP_KAFKA_NODES=3\n")
    assert Settings().kafka_nodes == 3
    monkeypatch.setenv("NHDP_KAFKA_NODES", "1")
    assert Settings().kafka_nodes == 1


def test_each_cluster_node_is_a_voter_of_one_static_quorum_with_durable_defaults(tmp_path):
    s = private_settings(tmp_path, kafka_nodes=3)
    nodes = kafka.nodes(s)
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    for node in nodes:
        path = kafka.write_config(s, node)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the admin's password
        p = props(path)
        assert p["node.id"] == str(node.node_id)
        assert p["controller.quorum.voters"] == voters and "controller.quorum.bootstrap.servers" not in p
        assert p["listeners"].endswith(f":{node.port},CONTROLLER://127.0.0.1:{node.controller_port}")
        assert p["log.dirs"] == str(node.folder / "data")
        assert (p["default.replication.factor"], p["min.insync.replicas"]) == ("3", "2")
        assert p["offsets.topic.replication.factor"] == "3" and p["transaction.state.log.min.isr"] == "2"
        assert p["unclean.leader.election.enable"] == "false"


def test_one_node_keeps_its_standalone_quorum_and_replication_one(tmp_path):
    s = private_settings(tmp_path)
    (node,) = kafka.nodes(s)
    assert (node.name, node.folder) == ("kafka", tmp_path / "kafka")
    p = props(kafka.write_config(s, node))
    assert p["controller.quorum.bootstrap.servers"] == f"127.0.0.1:{s.kafka_controller_port}"
    assert (p["default.replication.factor"], p["min.insync.replicas"]) == ("1", "1")

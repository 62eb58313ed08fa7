"""The cluster shape of the migrations and the cluster's settings, without a server
(tests/stack/test_clickhouse_cluster.py runs them on real ones)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infra.settings import ConfigError, Settings
from projections.clickhouse.schema import MIGRATIONS, MIGRATIONS_DDL, SHARDING_KEYS, cluster_statements

STATEMENTS = [s for m in MIGRATIONS for s in m.statements] + [MIGRATIONS_DDL]


def _table(statement: str) -> str:
    return re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", statement).group(1)


def test_every_table_has_a_sharding_key_and_nothing_else_has_one():
    assert {_table(s) for s in STATEMENTS} == set(SHARDING_KEYS)


@pytest.mark.parametrize("statement", STATEMENTS, ids=_table)
def test_each_table_becomes_a_replicated_local_table_behind_a_distributed_one(statement):
    table = _table(statement)
    local, distributed = cluster_statements(statement, "nhdp", "c1")
    engine = re.search(r"ENGINE = (\w+)(\(([^)]*)\))?", statement)
    assert f"`nhdp`.`{table}_local` ON CLUSTER `c1`" in local
    # same engine family and version column, on its shard's ZooKeeper path
    want = f"ENGINE = Replicated{engine.group(1)}('/clickhouse/tables/{{shard}}/nhdp/{table}_local', '{{replica}}'"
    assert want + (f", {engine.group(3)})" if engine.group(3) else ")") in local
    # same columns (MATERIALIZED → DEFAULT: the Distributed table computes them), same ORDER BY
    assert local.count(" DEFAULT ") == statement.count(" MATERIALIZED ") and " MATERIALIZED " not in local
    assert statement[statement.index("ORDER BY") :] in local
    assert distributed == (
        f"CREATE TABLE IF NOT EXISTS `nhdp`.`{table}` ON CLUSTER `c1` AS `nhdp`.`{table}_local` "
        f"ENGINE = Distributed(`c1`, `nhdp`, `{table}_local`, {SHARDING_KEYS[table]})"
    )


def test_dedup_keys_decide_the_shard():
    assert SHARDING_KEYS["events"] == SHARDING_KEYS["event_index"] == "cityHash64(event_id)"
    assert SHARDING_KEYS["subjects"] == "cityHash64(subject_id)"
    assert SHARDING_KEYS["voids"] == "cityHash64(target_id)"


def test_cluster_servers_from_the_ports_or_the_defaults(tmp_path: Path):
    one = Settings(data_dir=tmp_path)
    assert one.clickhouse_cluster_servers() == []
    assert "cluster" not in one.analytics_url()
    two = Settings(data_dir=tmp_path, clickhouse_cluster_shards=2, clickhouse_port=9500, clickhouse_http_port=8523)
    assert two.clickhouse_cluster_servers() == [
        (1, 1, 9500, 8523, 9600),
        (1, 2, 9501, 8524, 9601),
        (2, 1, 9502, 8525, 9602),
        (2, 2, 9503, 8526, 9603),
    ]
    ports = ",".join(str(p) for p in range(20000, 20012))
    given = Settings(data_dir=tmp_path, clickhouse_cluster_shards=2, clickhouse_cluster_ports=ports)
    assert given.clickhouse_cluster_servers()[3] == (2, 2, 20009, 20010, 20011)
    with pytest.raises(ConfigError, match="3 ports for each of 4 servers"):
        Settings(
            data_dir=tmp_path, clickhouse_cluster_shards=2, clickhouse_cluster_ports="1,2,3"
        ).clickhouse_cluster_servers()

"""The stores refuse whoever has no password: PostgreSQL (scram-sha-256 everywhere), the ClickHouse
server (the default user's generated password) and, in chDB mode, the sink's query endpoint (a shared
secret). Against the session's real stack; the secrets are 0600 files in a 0700 folder."""

from __future__ import annotations

import os
import stat

import httpx
import psycopg
import pytest

from infra import clickhouse, postgres
from projections.clickhouse.connect import open_store
from projections.clickhouse.queries import Analytics
from projections.clickhouse.remote import AnalyticsUnavailable, RemoteAnalytics, serve_queries
from projections.clickhouse.schema import migrate

pytestmark = pytest.mark.stack

NO_PASSFILE = os.devnull  # so neither ~/.pgpass nor PGPASSFILE can supply one


def local_postgres(settings):
    if not settings.local_postgres:
        pytest.skip("NHDP_POSTGRES_DSN points at an external PostgreSQL; its authentication is its own")


@pytest.mark.parametrize("user, database", [("nhdp", "nhdp"), ("postgres", "postgres")])
def test_postgres_refuses_a_connection_without_a_password(stack_settings, user, database):
    local_postgres(stack_settings)
    with pytest.raises(psycopg.OperationalError) as tcp:
        psycopg.connect(
            host="127.0.0.1", port=stack_settings.postgres_port, user=user, dbname=database, passfile=NO_PASSFILE
        )
    assert "no password supplied" in str(tcp.value)
    # The Unix socket is no way around it either.
    with pytest.raises(psycopg.OperationalError) as sock:
        psycopg.connect(
            host=str(postgres.pg_dir(stack_settings)),
            port=stack_settings.postgres_port,
            user=user,
            dbname=database,
            passfile=NO_PASSFILE,
        )
    assert "no password supplied" in str(sock.value)


@pytest.mark.parametrize("user, database", [("nhdp", "nhdp"), ("postgres", "postgres")])
def test_postgres_refuses_a_wrong_password(stack_settings, user, database):
    local_postgres(stack_settings)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(
            host="127.0.0.1",
            port=stack_settings.postgres_port,
            user=user,
            dbname=database,
            password="not-" + stack_settings.secrets.get(postgres.APP_SECRET),
        )
    assert f'password authentication failed for user "{user}"' in str(info.value)


def test_postgres_urls_name_the_passfile_and_hold_no_password(stack_settings):
    local_postgres(stack_settings)
    for url, role in ((stack_settings.postgres_url, "nhdp"), (stack_settings.postgres_admin_url, "postgres")):
        for secret in (postgres.APP_SECRET, postgres.SUPERUSER_SECRET):
            assert stack_settings.secrets.get(secret) not in url
        assert "passfile=" in url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    hba = (postgres.pg_dir(stack_settings) / "data" / "pg_hba.conf").read_text()
    assert "trust" not in hba.replace("none is trusted", "") and "scram-sha-256" in hba


def test_clickhouse_server_refuses_the_default_user_without_its_password(stack_settings):
    if not stack_settings.local_clickhouse_server:
        pytest.skip("this stack runs embedded chDB (no clickhouse-server installed): see the sink's secret test")
    from clickhouse_driver import Client

    for password in ("", "wrong-" + stack_settings.analytics_password()):
        client = Client("127.0.0.1", port=stack_settings.clickhouse_port, password=password, connect_timeout=5)
        with pytest.raises(Exception) as info:
            client.execute("SELECT 1")
        client.disconnect()
        assert "password" in str(info.value).lower(), info.value
        answer = httpx.get(
            f"http://127.0.0.1:{stack_settings.clickhouse_http_port}/",
            params={"query": "SELECT 1", "user": "default", "password": password},
            timeout=10,
        )
        assert answer.status_code != 200 and "password" in answer.text.lower(), answer.text
    # With it (from settings, never in the URL that `nhdp status` prints), the store opens.
    url = stack_settings.analytics_url()
    assert stack_settings.analytics_password() not in url
    store = open_store(url, password=stack_settings.analytics_password())
    try:
        assert store.execute("SELECT 1") == [(1,)]
    finally:
        store.close()
    users = clickhouse.server_dir(stack_settings) / "users.xml"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert stack_settings.analytics_password() not in users.read_text()  # only its sha256


def test_the_chdb_sink_query_endpoint_needs_the_secret(stack_settings, tmp_path):
    """The loopback endpoint the sink serves in chDB mode, on a real chDB folder."""
    store = open_store(f"chdb://{tmp_path / 'chdb'}?database=access_test", purpose="tests/test_store_access.py")
    server = None
    try:
        migrate(store)
        server = serve_queries(Analytics(store), "the-right-secret")
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert RemoteAnalytics(url, "the-right-secret").status()["engine"] == "chdb"
        for headers in ({}, {"Authorization": "Bearer the-wrong-secret"}, {"Authorization": "the-right-secret"}):
            answer = httpx.post(f"{url}/call/status", json={}, headers=headers, timeout=10)
            assert answer.status_code == 401 and "sink-queries" in answer.json()["error"]
        with pytest.raises(AnalyticsUnavailable, match="refused this process's secret"):
            RemoteAnalytics(url, "the-wrong-secret").status()
    finally:
        if server is not None:
            server.shutdown()
        store.close()


def test_secret_files_are_0600_in_a_0700_folder(stack_settings):
    folder = stack_settings.secrets.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    names = stack_settings.secrets.names()
    expected = {"pgpass", postgres.APP_SECRET, postgres.SUPERUSER_SECRET, "principal-admin", "principal-worker"}
    if stack_settings.local_clickhouse_server:
        expected.add("clickhouse-default")
    assert expected <= set(names), names
    for name in names:
        path = folder / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert path.stat().st_uid == os.geteuid(), name

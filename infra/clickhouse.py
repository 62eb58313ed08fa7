"""A local clickhouse-server (Debian's package) with its data in the data folder.

Used only when NHDP_CLICKHOUSE_URL is unset and a server binary is installed;
otherwise the platform uses embedded chDB (see projections/clickhouse/store.py).

The server runs as whoever runs `nhdp up`, root included: ClickHouse 18.16 does
not refuse root, and since we create its data folder ourselves the folder is
always owned by the user that runs it (later releases refuse only a mismatch
between the two). Its generated config keeps everything under
`<data>/clickhouse/`, listens on 127.0.0.1 only, opens just the native and HTTP
ports from the settings, and logs to stdout, which Managed puts in
`<data>/logs/clickhouse.log`. The `default` user has a generated password
(settings.analytics_password()); users.xml holds only its sha256 and is 0600.

Cluster mode (NHDP_CLICKHOUSE_CLUSTER_SHARDS=n): n shards × 2 replicas, each server in
`<data>/clickhouse-<shard>-<replica>/` with the same config.xml and users.xml plus a
`config.d/cluster.xml` (its macros, its interserver HTTP port on loopback, the cluster,
ZooKeeper from infra/zookeeper.py, the distributed DDL queue). 18.16 cannot authenticate the
interserver port (no interserver credentials yet): any local user could fetch parts from it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from string import Template
from urllib.parse import parse_qs, urlparse
from xml.sax.saxutils import escape

from infra.process import Managed
from infra.settings import Settings
from infra.tools import server_binary

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Per query; a development machine shares its memory with Kafka, PostgreSQL and the JVM.
MAX_MEMORY_USAGE = 4 * 1024**3

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def server_dir(settings: Settings) -> Path:
    return (settings.data_dir / "clickhouse").resolve()


def config_path(settings: Settings) -> Path:
    return server_dir(settings) / "config.xml"


def write_config(settings: Settings, root: Path | None = None, tcp_port: int = 0, http_port: int = 0) -> Path:
    """Render config.xml and users.xml into <data>/clickhouse/ (or root); returns the config path.

    Files are rewritten only when their content changes: a running server
    watches them and would reload on every touch.
    """
    root = root or server_dir(settings)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    users = root / "users.xml"
    values = {
        "tcp_port": str(int(tcp_port or settings.clickhouse_port)),
        "http_port": str(int(http_port or settings.clickhouse_http_port)),
        "data_path": escape(str(data)),
        "users_config": escape(str(users)),
        "max_memory_usage": str(MAX_MEMORY_USAGE),
        "password_sha256_hex": hashlib.sha256((settings.analytics_password() or "").encode()).hexdigest(),
    }
    config = root / "config.xml"
    for target, template in ((users, "clickhouse-users.xml.tmpl"), (config, "clickhouse-config.xml.tmpl")):
        text = Template((TEMPLATES / template).read_text()).substitute(values)
        if not target.exists() or target.read_text() != text:
            _write_private(target, text)
    return config


def _write_private(path: Path, text: str) -> None:
    """0600 from its first byte (users.xml holds the password's hash), replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _client(host: str, port: int, database: str = "default", **kwargs):
    from clickhouse_driver import Client  # here: ~0.15 s that `nhdp status` and `down` need not pay

    return Client(host=host, port=port, database=database, connect_timeout=2, send_receive_timeout=10, **kwargs)


def _is_our_server(settings: Settings, port: int = 0, root: Path | None = None) -> bool:
    """SELECT over the native protocol succeeds, and from the server whose data is ours.

    Checking the data path keeps another stack's server that happens to hold the
    port from being taken for ours; ours then fails with "address in use" and
    Managed reports its log.
    """
    port = port or settings.clickhouse_port
    try:  # not listening yet: say so without the driver, which logs a traceback for every refused connect
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    client = _client("127.0.0.1", port, password=settings.analytics_password() or "")
    try:
        rows = client.execute("SELECT data_path FROM system.databases WHERE name = 'system'")
    finally:
        client.disconnect()
    return bool(rows) and str(rows[0][0]).startswith(str((root or server_dir(settings)) / "data"))


def server_service(settings: Settings) -> Managed:
    """The local clickhouse-server as a Managed service (its config written first)."""
    config = write_config(settings)
    prefix = server_binary() or ["clickhouse-server"]  # absent: start() says it could not run it
    return Managed(
        name="clickhouse",
        run_dir=settings.run_dir,
        log_dir=settings.log_dir,
        command=[*prefix, f"--config-file={config}"],
        marker=str(config),
        ready=lambda: _is_our_server(settings),
        port=settings.clickhouse_port,
        url=f"clickhouse://127.0.0.1:{settings.clickhouse_port}/{settings.clickhouse_db}",
        data_path=server_dir(settings),
        cwd=server_dir(settings),
        # Generous: a server with many parts to load after a crash takes a while to stop cleanly.
        stop_timeout_s=30.0,
    )


# -- cluster mode: n shards × 2 replicas on loopback, coordinated by infra/zookeeper.py ----------------
# A killed replica's ZooKeeper session (and its "is_active" node) outlives it by this much;
# its restarted server waits that long before it takes its place again. Short, on loopback.
SESSION_TIMEOUT_MS = 3000


def cluster_server_dir(settings: Settings, shard: int, replica: int) -> Path:
    return (settings.data_dir / f"clickhouse-{shard}-{replica}").resolve()


def _cluster_xml(settings: Settings, shard: int, replica: int, interserver_port: int) -> str:
    """config.d/cluster.xml of one server: its macros and interserver port, the cluster, ZooKeeper.

    The Distributed engine signs in to the other servers as `default`, so the password is
    here in clear (18.16 has no inter-server secret): the file is 0600 like users.xml.
    """
    password = escape(settings.analytics_password() or "")
    servers = settings.clickhouse_cluster_servers()
    shards = []
    for s in sorted({srv[0] for srv in servers}):
        replicas = "".join(
            f"<replica><host>127.0.0.1</host><port>{tcp}</port><user>default</user>"
            f"<password>{password}</password></replica>"
            for sh, _r, tcp, _h, _i in servers
            if sh == s
        )
        # internal_replication: a Distributed insert writes one replica, the table replicates it.
        shards.append(f"<shard><internal_replication>true</internal_replication>{replicas}</shard>")
    return f"""<?xml version="1.0"?>
<!-- Generated by infra/clickhouse.py for cluster mode; edits are overwritten. 0600: it holds the password. -->
<yandex>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>{int(interserver_port)}</interserver_http_port>
    <macros><shard>{shard}</shard><replica>s{shard}r{replica}</replica></macros>
    <remote_servers><{settings.clickhouse_cluster}>{"".join(shards)}</{settings.clickhouse_cluster}></remote_servers>
    <zookeeper>
        <node><host>127.0.0.1</host><port>{int(settings.zookeeper_port)}</port></node>
        <session_timeout_ms>{SESSION_TIMEOUT_MS}</session_timeout_ms>
        <operation_timeout_ms>2000</operation_timeout_ms>
    </zookeeper>
    <!-- A restarted replica retries taking its place (its old session must expire first) this often, in s. -->
    <merge_tree><zookeeper_session_expiration_check_period>2</zookeeper_session_expiration_check_period></merge_tree>
    <!-- ON CLUSTER DDL: the migrations run once, every server applies them from this queue. -->
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
</yandex>
"""


def cluster_services(settings: Settings) -> list[Managed]:
    """Every server of the local cluster as a Managed service, its config written first."""
    prefix = server_binary() or ["clickhouse-server"]
    out = []
    for shard, replica, tcp, http, interserver in settings.clickhouse_cluster_servers():
        root = cluster_server_dir(settings, shard, replica)
        config = write_config(settings, root, tcp, http)
        extra = root / "config.d"
        extra.mkdir(exist_ok=True)
        text = _cluster_xml(settings, shard, replica, interserver)
        target = extra / "cluster.xml"
        if not target.exists() or target.read_text() != text:
            _write_private(target, text)
        out.append(
            Managed(
                name=f"clickhouse-{shard}-{replica}",
                run_dir=settings.run_dir,
                log_dir=settings.log_dir,
                command=[*prefix, f"--config-file={config}"],
                marker=str(config),
                ready=lambda tcp=tcp, root=root: _is_our_server(settings, tcp, root),
                port=tcp,
                url=f"clickhouse://127.0.0.1:{tcp}/{settings.clickhouse_db}",
                data_path=root,
                cwd=root,
                stop_timeout_s=30.0,
            )
        )
    return out


def ensure_database(settings: Settings) -> None:
    """CREATE DATABASE IF NOT EXISTS for the configured server.

    For chDB this is a no-op: the process that owns the chDB folder creates the
    database when it opens it, and no other process may open the folder.
    """
    url = urlparse(settings.analytics_url())
    if url.scheme not in ("clickhouse", "clickhouses"):
        return
    database = url.path.strip("/") or "default"
    if not _IDENTIFIER.match(database):
        raise ValueError(f"ClickHouse database name {database!r} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    client = _client(
        url.hostname or "127.0.0.1",
        url.port or 9000,
        user=url.username or "default",
        password=settings.analytics_password() or url.password or "",
        secure=url.scheme == "clickhouses",
    )
    cluster = parse_qs(url.query).get("cluster", [""])[0]
    if cluster and not _IDENTIFIER.match(cluster):
        raise ValueError(f"ClickHouse cluster name {cluster!r} must be a plain identifier")
    try:
        # On every server of a cluster: each holds the local tables of its shard.
        client.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`" + (f" ON CLUSTER `{cluster}`" if cluster else ""))
    finally:
        client.disconnect()

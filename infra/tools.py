"""Where installed programs are: the one thing settings needs to know about the machine.

A leaf of the ground layer: it imports nothing of ours, so `infra.settings`
can use it to pick its defaults without an import loop.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_SERVER_PATHS = ("/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server", "/usr/local/bin/clickhouse-server")
_MULTICALL_PATHS = ("/usr/bin/clickhouse", "/usr/local/bin/clickhouse")


def server_binary() -> list[str] | None:
    """The command prefix that runs a ClickHouse server, or None if none is installed.

    /usr/sbin is searched explicitly because it is not on a normal user's PATH,
    and that is where Debian's clickhouse-server lives.
    """
    found = shutil.which("clickhouse-server")
    if found:
        return [found]
    for path in _SERVER_PATHS:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return [path]
    # The single multi-call binary of upstream releases: `clickhouse server`.
    found = shutil.which("clickhouse")
    candidates = ([found] if found else []) + list(_MULTICALL_PATHS)
    for path in candidates:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return [path, "server"]
    return None


def require_pinned(package: str, pinned: str, user: str, installed: str) -> None:
    """ImportError unless `installed` is the version of `package` that module `user`, which uses its
    private API, was checked against (the pin in pyproject.toml)."""
    if installed != pinned:
        raise ImportError(
            f"{user} uses {package} {pinned}'s private API; {installed} is installed. "
            "Install the pinned version (pip install -e .) or re-check that module against the new one."
        )

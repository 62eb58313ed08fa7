"""The embedded engine: chDB in this process (`chdb:///path`), and who owns a chDB folder."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from projections.clickhouse.driver_internals import native
from projections.clickhouse.native import encode_block
from projections.clickhouse.store import (
    OWNER_LOCK,
    AnalyticsStoreError,
    Block,
    check_block,
    insert_target,
    normalise,
    render,
    server_message,
    snippet,
    typed_columns,
)


class _Owner:
    """This process's hold on one chDB folder: the flock'ed owner file and who uses it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.users = 0


_owners: dict[Path, _Owner] = {}


_owners_lock = threading.Lock()


def _default_purpose() -> str:
    return " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200] or "python"


def _acquire(path: Path, purpose: str | None) -> _Owner:
    with _owners_lock:
        owner = _owners.get(path)
        if owner is not None:
            owner.users += 1
            return owner
        if _owners:
            other = next(iter(_owners))
            raise AnalyticsStoreError(
                f"chDB can open one data folder per process and {other} is already open here; "
                f"close its stores before opening {path}",
                engine="chdb",
            )
        path.mkdir(parents=True, exist_ok=True)
        lock_path = path / OWNER_LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AnalyticsStoreError(
                f"the chDB folder {path} is owned by pid {holder.get('pid', '?')} "
                f"({holder.get('purpose', 'purpose unknown')}, since {holder.get('since', '?')}); "
                "only that process may open it: ask it over HTTP, or stop it first",
                engine="chdb",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {
            "pid": os.getpid(),
            "purpose": purpose or _default_purpose(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        owner = _Owner(path, fd)
        owner.users = 1
        _owners[path] = owner
        return owner


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _release(owner: _Owner) -> None:
    with _owners_lock:
        owner.users -= 1
        if owner.users > 0:
            return
        _owners.pop(owner.path, None)
        try:
            os.ftruncate(owner.fd, 0)
        finally:
            os.close(owner.fd)  # drops the flock


_READ_ONLY = re.compile(
    r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*|\(\s*)*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.I | re.S
)


class ChdbStore:
    """chDB with its data in a folder this process owns (see the module docstring)."""

    engine = "chdb"

    def __init__(self, url: str, *, purpose: str | None = None):
        parsed = urlparse(url)
        if parsed.netloc or not parsed.path.startswith("/"):
            raise AnalyticsStoreError(f"chDB URL {url!r} must name an absolute folder: chdb:///abs/path[?database=db]")
        options = parse_qs(parsed.query)
        self.url = url
        self.path = Path(parsed.path).resolve()
        self.database = options.get("database", ["default"])[0]
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.database):
            raise AnalyticsStoreError(f"invalid database name {self.database!r} in {url}")
        self._lock = threading.Lock()
        self._types: dict[str, dict[str, str]] = {}
        self._session = None
        self._owner = _acquire(self.path, purpose)
        try:
            from chdb import session  # here, not at the top: ~0.4 s, and only chDB mode needs it

            # Own session per store: chDB runs sessions on one folder concurrently.
            # UTC so that text dates and plain DateTime columns read as on the local server.
            self._session = session.Session(f"{self.path}?session_timezone=UTC")
            if self.database != "default":
                self.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
                self.execute(f"USE `{self.database}`")
        except BaseException as exc:
            self.close()
            if isinstance(exc, AnalyticsStoreError):
                raise
            raise AnalyticsStoreError(f"cannot open chDB at {self.path}: {exc}", engine=self.engine) from exc

    def _error(self, exc: Exception, sql: str) -> AnalyticsStoreError:
        message, code = server_message(exc)
        return AnalyticsStoreError(f"chDB: {message}\n  query: {snippet(sql)}", code=code, engine=self.engine)

    def _session_or_fail(self):
        if self._session is None:
            raise AnalyticsStoreError(f"the chDB store at {self.path} is closed", engine=self.engine)
        return self._session

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        text = render(sql, params)
        with self._lock:
            session = self._session_or_fail()
            try:
                data = session.query(text, "Native").bytes()
            except Exception as exc:
                raise self._error(exc, text) from exc
            if not _READ_ONLY.match(text):
                self._types.clear()  # DDL may have changed a table we cached
        if not data:
            return []
        types, rows = native().decode(data)
        return normalise(rows, types, None)

    def column_types(self, table: str, columns: Sequence[str]) -> list[tuple[str, str]]:
        """[(column, its type)] of a table: what encode_block needs to make blocks for it."""
        qtable, _ = insert_target(table, columns)
        types = self._types.get(table)
        if types is None:
            rows = self.execute(f"DESCRIBE TABLE {qtable}")
            types = self._types[table] = {row[0]: row[1] for row in rows}
        return typed_columns(types, table, columns, self.engine, "chDB")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence] | Block) -> int:
        if not rows:
            return 0
        qtable, qcolumns = insert_target(table, columns)
        if isinstance(rows, Block):
            check_block(rows, table, columns, self.engine, "chDB")
            block = rows.data
        else:
            block = encode_block(
                self.column_types(table, columns), rows, what=f"chDB: rows for {table}", engine=self.engine
            ).data
        sql = f"INSERT INTO {qtable} ({qcolumns})"
        with self._lock:
            session = self._session_or_fail()
            inserter = None
            try:
                inserter = session.send_insert(sql, "Native")
                inserter.append(block)
                inserter.finish()
            except Exception as exc:
                if inserter is not None:
                    try:
                        inserter.cancel()  # no-op once finished; frees the session otherwise
                    except Exception:
                        pass
                raise self._error(exc, sql) from exc
        return len(rows)

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            owner, self._owner = getattr(self, "_owner", None), None
        if session is not None:
            session.close()
        if owner is not None:
            _release(owner)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # A store dropped without close() must not keep the folder owned for the process's life.
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"<ChdbStore {self.path} database={self.database}>"

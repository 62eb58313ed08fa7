"""Opening a store by URL, and a pool of them for threads."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

from projections.clickhouse.chdb import ChdbStore
from projections.clickhouse.native import NativeStore
from projections.clickhouse.store import AnalyticsStore, AnalyticsStoreError


def open_store(url: str, *, purpose: str | None = None, password: str | None = None) -> AnalyticsStore:
    """`clickhouse://host:port/db` → NativeStore; `chdb:///abs/path[?database=db]` → ChdbStore.

    `purpose` is written into a chDB folder's owner lock so that a refused
    process is told who holds it (default: this program's command line).
    `password`: the server's (settings.analytics_password()); chDB has none.
    """
    scheme = urlparse(url).scheme
    if scheme in ("clickhouse", "clickhouses"):
        return NativeStore(url, password=password)
    if scheme == "chdb":
        return ChdbStore(url, purpose=purpose)
    raise AnalyticsStoreError(
        f"unsupported analytics URL {url!r}: expected clickhouse://host:port/db or chdb:///abs/path"
    )


class PoolBusy(AnalyticsStoreError):
    """Every store of the pool stayed in use for the whole wait: try again shortly."""


class StorePool:
    """Up to `size` stores on one URL, each used by one thread at a time.

    `wait_s` bounds how long acquire() waits for a store (None: as long as it takes).
    A caller on a request's path sets it: a waiting thread is one a slow query holds
    without running it, and enough of them would exhaust the caller's threads."""

    def __init__(
        self,
        url: str,
        size: int = 4,
        purpose: str | None = None,
        wait_s: float | None = None,
        password: str | None = None,
    ):
        self.url, self.size, self.purpose, self.wait_s, self.password = url, size, purpose, wait_s, password
        self._idle: list[AnalyticsStore] = []
        self._all: list[AnalyticsStore] = []
        self._cond = threading.Condition()

    def acquire(self) -> AnalyticsStore:
        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        with self._cond:
            while not self._idle and len(self._all) >= self.size:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolBusy(
                        f"all {self.size} ClickHouse connections stayed busy for {self.wait_s:g} s", retryable=True
                    )
                self._cond.wait(left)
            if self._idle:
                return self._idle.pop()
            self._all.append(None)  # reserve a slot while connecting
        try:
            store = open_store(self.url, purpose=self.purpose, password=self.password)
        except BaseException:
            with self._cond:
                self._all.remove(None)
                self._cond.notify()
            raise
        with self._cond:
            self._all[self._all.index(None)] = store
        return store

    def release(self, store: AnalyticsStore, broken: bool = False) -> None:
        with self._cond:
            if broken:
                self._all.remove(store)
                try:
                    store.close()
                except Exception:
                    pass
            else:
                self._idle.append(store)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            for store in self._all:
                if store is not None:
                    store.close()
            self._all.clear()
            self._idle.clear()

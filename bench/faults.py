"""The fault suite's harness: faults against the real stack under a steady load through the gateway.

    .venv/bin/python bench/faults.py              # the long version (issue 14): 20 worker kills, 10 sink kills,
                                                  # a Kafka restart, ClickHouse down 60 s, a PostgreSQL restart
    .venv/bin/python bench/faults.py --short      # what tests/faults runs in CI

A private stack comes up with its supervisor (`nhdp up`). A load thread posts
DoseAdministered events to the gateway, each batch until it is answered: a 503
or a dropped connection is retried with the same event ids, so the gateway
answers "duplicate" for what it had already accepted. Meanwhile the faults run
one after another; after each, the time to recover runs from the kill (or from the
moment a stopped server is started again) until the projections and the ClickHouse
sink have both reached the end the log had once the service was back.

Then the load stops, both stores catch up, and the checks run:
- every accepted event is counted exactly once, live (PostgreSQL) and in the
  analytics (ClickHouse): accepted = counted, lost = 0, double-counted = 0;
- `nhdp replay --verify`: a rebuild from the log equals the live projections
  (PostgreSQL and ClickHouse), 0 differences;
- `nhdp verify-analytics`: ClickHouse equals PostgreSQL, 0 differences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from infra import clickhouse, kafka, postgres
from infra.settings import Settings
from nhdp import stack
from projections.postgres.tracking import next_offsets
from schemas.api_auth import issue_token
from schemas.log import group_positions, log_end
from schemas.topics import ANALYTICS_GROUP

console = Console(stderr=True)


@dataclass
class Profile:
    worker_kills: int
    sink_kills: int
    clickhouse_down_s: float
    between_s: tuple[float, float]  # load flows this long (random) before each fault


LONG = Profile(worker_kills=20, sink_kills=10, clickhouse_down_s=60.0, between_s=(2.0, 8.0))
SHORT = Profile(worker_kills=2, sink_kills=2, clickhouse_down_s=10.0, between_s=(1.0, 3.0))


@dataclass
class Report:
    accepted: int = 0
    counted_live: int = 0
    counted_analytics: int = 0
    replay_differences: list[str] = field(default_factory=list)
    analytics_differences: list[str] = field(default_factory=list)
    recoveries: list[tuple[str, float]] = field(default_factory=list)
    retried_requests: int = 0
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return max(0, self.accepted - min(self.counted_live, self.counted_analytics))

    @property
    def double_counted(self) -> int:
        return max(0, max(self.counted_live, self.counted_analytics) - self.accepted)

    def ok(self) -> bool:
        return (
            self.accepted > 0
            and self.counted_live == self.accepted
            and self.counted_analytics == self.accepted
            and not self.replay_differences
            and not self.analytics_differences
        )


class Load:
    """Batches of doses posted to the gateway until each is answered; the accepted ids are kept."""

    def __init__(self, settings: Settings, batch: int = 50, pause_s: float = 0.1):
        self.url = f"{settings.api_url}/v1/events"
        token = issue_token(settings, "fault-suite", "producer", ttl="12h", source="fault-suite", provinces=["*"])
        self.headers = {"authorization": f"Bearer {token.token}"}
        self.batch, self.pause_s = batch, pause_s
        self.accepted: set[str] = set()
        self.retries = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fault-load", daemon=True)
        self.error: BaseException | None = None

    def _events(self) -> list[dict]:
        now = datetime.now(UTC)
        return [
            {
                "event_id": str(uuid.uuid4()),
                "event_type": "DoseAdministered",
                "occurred_at": (now - timedelta(seconds=random.randrange(86_400))).isoformat(),
                "province_code": random.choice(["79", "01", "48", "92"]),
                "source": "fault-suite",
                "payload": {
                    "citizen_id": f"{random.randrange(10**12):012d}",
                    "site_id": "79-760-0001",
                    "vaccine": "pfizer",
                    "lot_number": "FF2593",
                    "dose_number": 1,
                },
            }
            for _ in range(self.batch)
        ]

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=30, headers=self.headers) as client:
                while not self.stop.is_set():
                    events = self._events()
                    while True:  # the same batch until it is answered: never dropped
                        try:
                            answer = client.post(self.url, json=events)
                        except httpx.HTTPError:
                            answer = None
                        if answer is not None and answer.status_code == 200:
                            body = answer.json()
                            if body["rejected"]:
                                raise AssertionError(f"the gateway rejected valid events: {body['rejected'][:2]}")
                            self.accepted.update(e["event_id"] for e in events)
                            break
                        self.retries += 1
                        time.sleep(0.5)
                    time.sleep(self.pause_s)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> set[str]:
        self.stop.set()
        self.thread.join(timeout=600)
        if self.error is not None:
            raise self.error
        return self.accepted


def positions_reached(settings: Settings, target: dict[int, int]) -> bool:
    with psycopg.connect(settings.postgres_url, autocommit=True, connect_timeout=5) as conn:
        live = next_offsets(conn)
    sink = group_positions(settings, ANALYTICS_GROUP)
    return all(live.get(p, 0) >= end and sink.get(p, 0) >= end for p, end in target.items())


def recover(settings: Settings, since: float | None = None, timeout_s: float = 300.0) -> float:
    """Seconds from `since` (default: now) until both stores have applied everything the log held
    when this was called."""
    started = time.monotonic() if since is None else since
    target = None
    while True:
        try:
            target = target or log_end(settings)
            if positions_reached(settings, target):
                return time.monotonic() - started
        except Exception:  # a store still coming back: keep asking
            pass
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not recovered within {timeout_s:.0f} s")
        time.sleep(0.25)


def kill(service) -> float:
    """SIGKILL, then wait until the supervisor has it back; the moment of the kill."""
    pid = service.pid()
    if pid is None:
        raise RuntimeError(f"{service.name} is not running")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    deadline = time.monotonic() + 60
    while service.pid() in (None, pid) or not service._ready_quietly():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service.name} was not restarted within 60 s")
        time.sleep(0.1)
    return killed


def restart(service, down_s: float, timeout_s: float) -> float:
    """Stop, stay down, start again; the moment it was started (the outage's end)."""
    service.stop()
    time.sleep(down_s)
    back = time.monotonic()
    service.start(timeout_s)
    return back


def faults(settings: Settings, profile: Profile) -> list[tuple[str, Callable[[], float]]]:
    plan = [("kill the worker", lambda: kill(stack.worker_service(settings)))] * profile.worker_kills
    plan += [("kill the sink", lambda: kill(stack.sink_service(settings)))] * profile.sink_kills
    random.shuffle(plan)
    plan.append(("restart Kafka", lambda: restart(kafka.service(settings), 1.0, settings.start_timeout_s)))
    if settings.local_clickhouse_server:
        plan.append(
            (
                f"stop ClickHouse {profile.clickhouse_down_s:.0f} s",
                lambda: restart(
                    clickhouse.server_service(settings), profile.clickhouse_down_s, settings.start_timeout_s
                ),
            )
        )
    if settings.local_postgres:
        plan.append(("restart PostgreSQL", lambda: restart(postgres.service(settings), 1.0, settings.start_timeout_s)))
    return plan


_NATIONAL: dict = {}  # data folder -> a national token's header


def counted(settings: Settings) -> tuple[int, int]:
    national = _NATIONAL.get(settings.data_dir)
    if national is None:
        national = _NATIONAL[settings.data_dir] = {
            "authorization": f"Bearer {issue_token(settings, 'fault-suite', 'national', ttl='12h').token}"
        }
    live = httpx.get(f"{settings.api_url}/v1/national/summary", headers=national, timeout=30).json()
    rows = httpx.get(f"{settings.api_url}/v1/analytics/doses", headers=national, timeout=30).json()["rows"]
    live = live["doses_administered"]
    return live, sum(r["doses"] for r in rows)


def run(settings: Settings, profile: Profile) -> Report:
    """The faults of profile against the stack of settings, under load; then every check."""
    from streams import replay
    from streams.sink import audit

    report = Report()
    started = time.monotonic()
    load = Load(settings)
    load.start()
    try:
        for name, fault in faults(settings, profile):
            time.sleep(random.uniform(*profile.between_s))
            console.print(f"fault: {name}")
            since = fault()
            report.recoveries.append((name, recover(settings, since)))
            console.print(f"  recovered in {report.recoveries[-1][1]:.1f} s")
    finally:
        accepted = load.finish()
    report.accepted, report.retried_requests = len(accepted), load.retries
    recover(settings)
    report.counted_live, report.counted_analytics = counted(settings)
    report.replay_differences = replay.verify(settings, "faults")
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        upto = {p: o - 1 for p, o in next_offsets(conn).items()}
    audit.rebuild(settings, "faults", upto=upto)
    report.replay_differences += audit.diff_replay(settings, "faults")
    report.analytics_differences, _ = audit.verify(settings, timeout_s=120)
    report.seconds = time.monotonic() - started
    return report


def show(report: Report) -> None:
    table = Table(title="fault suite")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in [
        ("events accepted", f"{report.accepted:,}"),
        ("counted live (PostgreSQL)", f"{report.counted_live:,}"),
        ("counted in the analytics (ClickHouse)", f"{report.counted_analytics:,}"),
        ("lost", f"{report.lost:,}"),
        ("double-counted", f"{report.double_counted:,}"),
        ("replay --verify differences", f"{len(report.replay_differences)}"),
        ("verify-analytics differences", f"{len(report.analytics_differences)}"),
        ("requests retried by the load", f"{report.retried_requests:,}"),
        ("whole run", f"{report.seconds:.0f} s"),
    ]:
        table.add_row(name, value)
    by_kind: dict[str, list[float]] = {}
    for name, seconds in report.recoveries:
        by_kind.setdefault(name, []).append(seconds)
    for name, values in by_kind.items():
        table.add_row(
            f"recovery after '{name}' (n={len(values)})",
            f"max {max(values):.1f} s, mean {sum(values) / len(values):.1f} s",
        )
    console.print(table)
    for line in (report.replay_differences + report.analytics_differences)[:20]:
        console.print(f"[red]differs[/] {line}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="the CI version")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    profile = SHORT if args.short else LONG
    load_before = os.getloadavg()
    with stack.private("faults") as settings:
        report = run(settings, profile)
    show(report)
    console.print(f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f}")
    if args.json:
        figures = {k: v for k, v in report.__dict__.items() if k != "recoveries"} | {
            "lost": report.lost,
            "double_counted": report.double_counted,
            "recoveries": report.recoveries,
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())

"""The supervisor `nhdp up` leaves running (infra/supervisor.py): a killed worker, sink and API come back,
ready and counted; `down` stops the supervisor first, so nothing comes back after it; a private stack's
clean-up ends the supervisor too.

A private stack of this module's own: killing services would disturb the session stack's tests."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from nhdp import stack

pytestmark = pytest.mark.stack

BACK_WITHIN_S = 10.0
# A worker is ready once it holds partitions. Those of the killed one move only when its
# Kafka session (10 s, streams/worker.py) has expired, whatever restarted it how fast.
WORKER_READY_WITHIN_S = 30.0


def processes_of(settings) -> list[psutil.Process]:
    """Every live process whose command line names this stack's data folder."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(settings.data_dir.resolve()) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                mine.append(proc)
        except psutil.Error:
            pass
    return mine


def rows(settings) -> dict[str, dict]:
    return {r["service"]: r for r in stack.status(settings)}


@pytest.fixture(scope="module")
def supervised():
    """A private stack, up with its supervisor; afterwards every supervisor it had is gone."""
    supervisors: list[int] = []
    with stack.private("supervision") as settings:
        yield settings, supervisors
        supervisors.append(stack.supervisor_service(settings).pid())
    alive = [described(pid) for pid in set(supervisors) if pid is not None and running(pid)]
    assert not alive, f"stack.private() left the supervisor running: {alive}"


def running(pid: int) -> bool:
    """Alive and not a zombie: one that has exited but whose parent (this process, which started it)
    has not reaped it yet still has its pid (CI saw this once after `down`)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def described(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{pid} {proc.status()} {' '.join(proc.cmdline())[:200]}"
    except psutil.Error as e:
        return f"{pid} ({e})"


def test_killed_worker_sink_and_api_come_back_ready_and_counted(supervised):
    settings, supervisors = supervised
    before_rows = rows(settings)
    assert before_rows["supervisor"]["state"] == "up"
    supervisors.append(before_rows["supervisor"]["pid"])
    services = {"worker": stack.worker_service(settings), "sink": stack.sink_service(settings)}
    services["api"] = stack.api_service(settings)
    old = {name: svc.pid() for name, svc in services.items()}
    assert all(old.values()) and all(before_rows[name]["restarts"] == 0 for name in services)

    killed_at = time.monotonic()
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    new: dict[str, float] = {}  # seconds after the kill each had a new process
    ready: dict[str, float] = {}  # and was ready by the stack's own check
    while len(ready) < len(services):
        elapsed = time.monotonic() - killed_at
        assert elapsed < WORKER_READY_WITHIN_S, f"after {elapsed:.0f}s: new {new}, ready {ready}"
        for name, svc in services.items():
            pid = svc.pid()
            if pid is not None and pid != old[name]:
                new.setdefault(name, elapsed)
                if name not in ready and svc._ready_quietly():
                    ready[name] = elapsed
        time.sleep(0.1)
    print(f"\nback after the kill (s): new process {new}, ready {ready}")
    assert all(s < BACK_WITHIN_S for s in new.values()), new
    assert ready["api"] < BACK_WITHIN_S and ready["sink"] < BACK_WITHIN_S, ready
    assert httpx.get(f"{settings.api_url}/healthz", timeout=5).status_code == 200

    after = rows(settings)
    for name in services:
        row = after[name]
        assert row["state"] == "up" and row["pid"] not in (None, old[name])
        assert row["restarts"] >= 1, row
        assert row["last_exit"].startswith(f"pid {old[name]} gone"), row  # `up` started it: not the supervisor's child
        assert row["last_restart"] > time.time() - 120
    assert after["registry"]["restarts"] == 0 and after["kafka"]["restarts"] == 0
    assert after["supervisor"]["pid"] == before_rows["supervisor"]["pid"]


def test_down_stops_the_supervisor_first_and_nothing_comes_back(supervised):
    settings, supervisors = supervised
    supervisor = stack.supervisor_service(settings).pid()
    assert supervisor is not None
    stopped = stack.down(settings)
    assert stopped[0] == "supervisor" and {"registry", "worker", "sink", "api", "kafka"} <= set(stopped), stopped
    assert not running(supervisor), described(supervisor)
    time.sleep(3)  # six polls, had a supervisor survived
    assert processes_of(settings) == []
    assert all(r["state"] in ("down", "embedded") for r in stack.status(settings)), stack.status(settings)

    # `up` again: every service and a new supervisor, counting from zero (a stop marker does not outlive a start).
    stack.up(settings)
    again = rows(settings)
    assert again["supervisor"]["state"] == "up" and again["supervisor"]["pid"] != supervisor
    supervisors.append(again["supervisor"]["pid"])
    assert all(r["state"] in ("up", "embedded") for r in again.values()), again
    assert all(r["restarts"] in (0, None) for r in again.values()), again
    worker = stack.worker_service(settings)
    old = worker.pid()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + BACK_WITHIN_S
    while worker.pid() in (None, old):
        assert time.monotonic() < deadline, "the new supervisor did not restart the worker"
        time.sleep(0.1)

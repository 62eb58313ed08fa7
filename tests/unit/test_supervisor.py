"""The supervisor (infra/supervisor.py): its back-off, its state file, and its loop over real OS processes.

Nothing of the stack is needed: the services are sleeping Python processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from infra.process import Managed, pid_record
from infra.supervisor import Backoff, Supervisor, exit_reason, last_words, read_state, write_state

# -- the back-off ---------------------------------------------------------------------------------


def test_backoff_doubles_from_half_a_second_to_thirty():
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(0) == 0.5  # never less than the first wait
    assert backoff.delay(10**6) == 30  # no overflow however long a service keeps failing
    assert backoff.reset_after_s == 60


# -- the state file -------------------------------------------------------------------------------


def test_state_file_round_trips_and_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "supervisor.json"
    state = {"pid": 42, "services": {"worker": {"restarts": 2, "last_restart": 1.5, "last_exit": "x", "attempt": 1}}}
    write_state(path, state)
    assert read_state(path) == state
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A leftover temporary file, however open, does not widen the next one.
    leftover = tmp_path / f".supervisor.json.{os.getpid()}.tmp"
    leftover.write_text("old")
    leftover.chmod(0o644)
    write_state(path, state | {"pid": 43})
    assert read_state(path)["pid"] == 43
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["supervisor.json"]  # replaced, nothing left beside it


def test_a_missing_or_broken_state_file_reads_as_empty(tmp_path):
    assert read_state(tmp_path / "none.json") == {}
    (tmp_path / "half.json").write_text('{"pid": 4')
    assert read_state(tmp_path / "half.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_state(tmp_path / "list.json") == {}


@pytest.mark.parametrize(
    ("code", "how", "reason"),
    [
        ("import sys; sys.exit(3)", None, "exited with status 3"),
        ("import time; time.sleep(60)", 9, "killed by SIGKILL"),
    ],
)
def test_exit_reasons_in_words(code, how, reason):
    proc = subprocess.Popen([sys.executable, "-c", code])
    if how:
        os.kill(proc.pid, how)
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = 0  # reaped here: keep Popen from waiting for it again
    assert exit_reason(status) == reason


# -- the loop -------------------------------------------------------------------------------------


def service(tmp_path, name: str = "sleeper", code: str = "import time; time.sleep(60)", ready: bool = True) -> Managed:
    marker = f"--nhdp-data {tmp_path}"
    svc = Managed(
        name=name,
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "logs",
        command=[sys.executable, "-c", code, *marker.split()],
        marker=marker,
        ready=lambda: False,
        stop_timeout_s=5,
    )
    svc.ready = lambda: ready and svc.pid() is not None
    return svc


@contextmanager
def supervising(tmp_path, *services: Managed, backoff: Backoff) -> Iterator[Supervisor]:
    (tmp_path / "run").mkdir(exist_ok=True)
    supervisor = Supervisor(
        services, tmp_path / "run" / "supervisor.json", start_timeout_s=10, backoff=backoff, poll_s=0.05
    )
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield supervisor
    finally:
        stop.set()
        thread.join(10)
        for svc in services:
            svc.stop()


def until(check: Callable[[], object], timeout_s: float = 10.0) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)
    return value


def orphan(svc: Managed) -> int:
    """Start svc as `nhdp up` leaves it: recorded in its pid file, but nobody's child here (its parent has exited)."""
    svc.run_dir.mkdir(parents=True, exist_ok=True)
    svc.log_dir.mkdir(parents=True, exist_ok=True)
    svc.log_file.write_text("starting\nthe last words of the first one\n")
    spawn = f"import subprocess; print(subprocess.Popen({list(svc.command)!r}, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"
    pid = int(subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True, check=True).stdout)
    svc.pid_file.write_text(json.dumps(pid_record(pid, svc.command)))
    return pid


def test_a_killed_service_is_started_again_and_counted_but_one_stopped_on_purpose_is_not(tmp_path):
    svc = service(tmp_path)
    first = orphan(svc)

    def record(restarts: int) -> dict | None:
        r = read_state(tmp_path / "run" / "supervisor.json").get("services", {}).get("sleeper", {})
        return r if r.get("restarts") == restarts else None

    with supervising(tmp_path, svc, backoff=Backoff(first_s=0.05, reset_after_s=0.5)) as supervisor:
        until(lambda: supervisor._seen.get("sleeper") == first)
        os.kill(first, signal.SIGKILL)
        second = until(lambda: (pid := svc.pid()) not in (None, first) and pid)
        state = until(lambda: record(1))
        assert state["last_restart"] > time.time() - 30
        # Started as `nhdp up` starts it, so not the supervisor's child: the reason is the log's last line.
        assert state["last_exit"] == (
            f"pid {first} gone (exit status unknown: not the supervisor's child); "
            "last log line: the last words of the first one"
        )

        # The supervisor's own child this time: the exit status is known.
        os.kill(second, signal.SIGKILL)
        third = until(lambda: (pid := svc.pid()) not in (None, second) and pid)
        assert until(lambda: record(2))["last_exit"] == f"pid {second} killed by SIGKILL"
        # Up longer than reset_after_s: the next crash's restart waits the first wait again.
        until(lambda: supervisor.records["sleeper"].attempt == 0, timeout_s=5)

        assert svc.stop()  # on purpose
        time.sleep(0.5)  # ten polls
        assert svc.pid() is None and supervisor.records["sleeper"].restarts == 2
        fourth, started = svc.start(10)  # wanted again: supervised again
        assert started and fourth != third
        os.kill(fourth, signal.SIGKILL)
        until(lambda: svc.pid() not in (None, fourth))
        assert until(lambda: record(3))


def failing(state: dict) -> dict:
    return state.get("services", {}).get("failing", {})


def test_a_service_that_keeps_failing_is_retried_ever_later(tmp_path):
    svc = service(tmp_path, "failing", "import sys; sys.exit(3)", ready=False)  # dies before it is ready
    backoff = Backoff(first_s=0.1, max_s=10)
    started = time.monotonic()
    with supervising(tmp_path, svc, backoff=backoff) as supervisor:
        record = until(lambda: (r := failing(read_state(supervisor.state_path))).get("restarts", 0) >= 3 and r)
        elapsed = time.monotonic() - started
    # The first restart waits 0.1 s, the second 0.2 s, the third 0.4 s; none can come sooner.
    assert elapsed >= 0.1 + 0.2 + 0.4
    assert record["last_exit"] == "restart failed: failing exited during start-up."


def test_the_counts_survive_a_new_supervisor(tmp_path):
    svc = service(tmp_path)
    path = tmp_path / "run" / "supervisor.json"
    (tmp_path / "run").mkdir()
    write_state(path, {"services": {"sleeper": {"restarts": 5, "last_exit": "x", "unknown": 1}}})
    supervisor = Supervisor([svc], path, start_timeout_s=10)
    assert supervisor.records["sleeper"].restarts == 5 and supervisor.records["sleeper"].last_exit == "x"


def test_the_last_words_are_those_since_the_last_start(tmp_path):
    svc = service(tmp_path)
    svc.log_dir.mkdir()
    svc.log_file.write_text("--- 2026-01-01T00:00:00 starting: a\nold trouble\n\n--- 2026-01-01T00:01:00 starting: a\n")
    assert last_words(svc) == "nothing in its log since it started"
    with svc.log_file.open("a") as f:
        f.write("Traceback …\nRuntimeError: Kafka consumer failed\n\n")
    assert last_words(svc) == "last log line: RuntimeError: Kafka consumer failed"


def test_stop_does_not_wait_for_a_parent_that_never_reaps(tmp_path):
    # The supervisor is a child of whatever ran `up`: `nhdp demo` or a test run lives on without reaping
    # it, so once stopped it stays a zombie. `nhdp down` from another shell must not wait for it to vanish.
    svc = service(tmp_path)
    svc.stop_timeout_s = 20
    svc.run_dir.mkdir(parents=True)
    spawn = f"import subprocess, time; p = subprocess.Popen({list(svc.command)!r}); print(p.pid, flush=True); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        svc.pid_file.write_text(json.dumps(pid_record(pid, svc.command)))
        began = time.monotonic()
        assert svc.stop()
        assert time.monotonic() - began < 5
    finally:
        parent.kill()
        parent.wait()

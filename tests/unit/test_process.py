"""Pid files (infra/process.py): a running service is never taken for a dead one, nor a stranger for it.

Real OS processes; nothing of the stack is needed."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from infra.process import Managed, pid_record, started_at


def sleeper(tmp_path, marker: str = "--nhdp-data /nowhere") -> Managed:
    svc = Managed(
        name="sleeper",
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "logs",
        command=[sys.executable, "-c", "import time; time.sleep(60)", *marker.split()],
        marker=marker,
        ready=lambda: False,
        stop_timeout_s=5,
    )
    svc.ready = lambda: svc.pid() is not None
    return svc


def test_every_start_is_ready_at_once_and_keeps_its_pid_file(tmp_path):
    # Before start times were recorded, ~2% of starts read an empty command line
    # (the program's arguments are set after Popen returns), dropped the pid file
    # as stale and then waited for readiness until the timeout.
    svc = sleeper(tmp_path)
    for _ in range(40):
        pid, started = svc.start(timeout_s=10)
        assert started and svc.pid() == pid and svc.pid_file.exists()
        assert svc.stop()
        assert svc.pid() is None and not svc.pid_file.exists()


def test_a_recorded_start_time_identifies_the_process_whatever_its_command_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        svc = sleeper(tmp_path, marker="--a-marker-this-process-does-not-carry")
        svc.run_dir.mkdir(parents=True)
        svc.pid_file.write_text(json.dumps(pid_record(proc.pid, [])))
        assert svc.pid() == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_recycled_pid_is_not_taken_for_the_service_and_its_file_is_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--nhdp-data", "/nowhere"])
    try:
        svc = sleeper(tmp_path)
        svc.run_dir.mkdir(parents=True)
        # Same pid and even the marker, but another start time: another process.
        svc.pid_file.write_text(json.dumps(pid_record(proc.pid, []) | {"since_boot": started_at(proc.pid) - 100}))
        assert svc.pid() is None and not svc.pid_file.exists()
        assert not svc.stop()
        assert psutil.Process(proc.pid).is_running()  # never signalled
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("carries", [True, False])
def test_an_older_pid_file_without_a_start_time_goes_by_the_marker(tmp_path, carries):
    marker = "--nhdp-data /nowhere"
    args = marker.split() if carries else []
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])
    try:
        svc = sleeper(tmp_path, marker=marker)
        svc.run_dir.mkdir(parents=True)
        svc.pid_file.write_text(json.dumps({"pid": proc.pid, "command": []}))
        assert (svc.pid() == proc.pid) is carries
    finally:
        proc.kill()
        proc.wait()

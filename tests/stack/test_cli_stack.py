"""`nhdp up/status/down` as a user runs them: a second, private stack driven by the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import orjson
import psutil
import pytest

from nhdp import stack
from tests.helpers import private_data_dir, settings_for, stack_env

pytestmark = pytest.mark.stack


def nhdp(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "nhdp.cli", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("NHDP_")} | env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"nhdp {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def status(env: dict) -> dict[str, dict]:
    out = orjson.loads(nhdp(env, "status", "--json").stdout)
    return {row["service"]: row for row in out["services"]} | {"_endpoints": out["endpoints"]}


def processes_of(data_dir) -> list[psutil.Process]:
    """Every live process whose command line mentions this stack's data folder."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(data_dir) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                mine.append(proc)
        except psutil.Error:
            pass
    return mine


@pytest.fixture
def cli_data():
    """The CLI stack's data folder (outside pytest's basetemp: see tests.helpers.private_data_dir)."""
    with private_data_dir("cli") as data:
        yield data


@pytest.fixture
def cli_env(cli_data):
    env = stack_env(cli_data)
    yield env
    nhdp(env, "down", check=False)


def test_up_status_twice_stale_pid_and_down(cli_env, cli_data):
    t0 = time.monotonic()
    first = nhdp(cli_env, "up")
    cold_s = time.monotonic() - t0
    assert "kafka" in first.stdout and "registry" in first.stdout
    print(f"cold `nhdp up` (jars cached): {cold_s:.1f}s")

    st = status(cli_env)
    services = [s for s in st if not s.startswith("_")]
    assert {"postgres", "kafka", "registry"} <= set(services)
    assert all(st[s]["state"] in ("up", "embedded") for s in services), st
    assert st["_endpoints"]["kafka"] == cli_env["NHDP_KAFKA_BOOTSTRAP_SERVERS"]
    kafka_pid = st["kafka"]["pid"]

    # A second `up` finds the running services: same broker, no second one.
    again = nhdp(cli_env, "up")
    assert "already running" in again.stdout
    assert status(cli_env)["kafka"]["pid"] == kafka_pid
    brokers = [p for p in processes_of(cli_data) if "kafka.Kafka" in " ".join(p.cmdline())]
    assert len(brokers) == 1

    # A killed registry leaves a stale pid file: detected, cleaned, restarted by `up`. (The
    # supervisor would restart it first, tests/stack/test_supervision.py: stopped for this part.)
    assert st["supervisor"]["state"] == "up"
    stack.supervisor_service(settings_for(cli_env)).stop()
    reg_pid = st["registry"]["pid"]
    os.kill(reg_pid, signal.SIGKILL)
    psutil.Process(reg_pid).wait(10) if psutil.pid_exists(reg_pid) else None
    pid_file = cli_data / "run" / "registry.pid"
    assert pid_file.exists()
    assert status(cli_env)["registry"]["state"] == "down"
    assert not pid_file.exists()
    nhdp(cli_env, "up")
    st = status(cli_env)
    assert st["registry"]["state"] == "up" and st["registry"]["pid"] != reg_pid
    assert st["supervisor"]["state"] == "up"

    nhdp(cli_env, "down")
    time.sleep(0.5)
    assert processes_of(cli_data) == []
    assert all(v["state"] in ("down", "embedded") for k, v in status(cli_env).items() if not k.startswith("_"))

    refused = nhdp(cli_env, "reset", check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    nhdp(cli_env, "reset", "--yes")
    assert not (cli_data / "kafka").exists() and not (cli_data / "postgres").exists()


def test_a_service_that_cannot_start_is_named_with_its_command_and_log(cli_env):
    # Something else already holds Kafka's port.
    host, port = cli_env["NHDP_KAFKA_BOOTSTRAP_SERVERS"].split(":")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((host, int(port)))
    squatter.listen()
    try:
        proc = nhdp(cli_env | {"NHDP_START_TIMEOUT_S": "40"}, "up", check=False)
    finally:
        squatter.close()
    assert proc.returncode != 0
    assert "kafka" in proc.stderr and "command:" in proc.stderr and "kafka.Kafka" in proc.stderr
    assert "last lines:" in proc.stderr

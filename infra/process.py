"""Background services that the project starts itself, tracked by pid files.

Each service is one detached process with a pid file in `<data>/run/NAME.pid`
and a log in `<data>/logs/NAME.log`. A pid file is trusted only if that pid is
alive *and* its command line still carries the service's marker (normally the
data folder), so a stale file left by a killed run, or a recycled pid, is
detected and removed instead of being mistaken for a running service.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import psutil


class ServiceError(RuntimeError):
    """A service failed to start or stop. The message names it, its command and its log."""


def tail(path: Path, lines: int = 25) -> str:
    try:
        data = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda e: None):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512  # on disk; Kafka indexes are sparse
            except OSError:
                pass
    return total


@dataclass
class Managed:
    """One background process: how to start it, how to know it is ready."""

    name: str
    run_dir: Path
    log_dir: Path
    command: Sequence[str]
    # A string that must appear in the live process's command line.
    marker: str
    ready: Callable[[], bool]
    port: int | None = None
    url: str | None = None
    data_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # Run as this OS user (PostgreSQL refuses to run as root).
    user: str | None = None
    stop_timeout_s: float = 20.0
    stop_signal_name: str = "SIGTERM"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    # -- state ---------------------------------------------------------------
    def pid(self) -> int | None:
        """The live pid of this service, or None; removes a stale pid file."""
        try:
            pid = int(json.loads(self.pid_file.read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
            return None
        if self._is_ours(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def _is_ours(self, pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return self.marker in " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def status(self) -> dict:
        pid = self.pid()
        up = pid is not None and self._ready_quietly()
        return {
            "service": self.name,
            "state": "up" if up else ("starting" if pid else "down"),
            "pid": pid,
            "port": self.port,
            "url": self.url,
            "data_bytes": dir_size(self.data_path) if self.data_path and self.data_path.exists() else 0,
            "log": str(self.log_file),
        }

    def _ready_quietly(self) -> bool:
        try:
            return bool(self.ready())
        except Exception:
            return False

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout_s: float) -> tuple[int, bool]:
        """Start unless already running. Returns (pid, started_now)."""
        pid = self.pid()
        if pid is not None:
            self._wait_ready(pid, timeout_s)
            return pid, False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {shlex.join(self.command)}\n".encode())
        log.flush()
        kwargs = {}
        if self.user:
            from infra.postgres import as_user

            kwargs = as_user(self.user)
        try:
            proc = subprocess.Popen(
                list(self.command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                start_new_session=True,  # survives the CLI; Ctrl-C in a shell doesn't reach it
                **kwargs,
            )
        except OSError as exc:
            raise ServiceError(f"{self.name}: could not run {shlex.join(self.command)}: {exc}") from exc
        finally:
            log.close()
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "command": list(self.command)}))
        self._wait_ready(proc.pid, timeout_s, popen=proc)
        return proc.pid, True

    def _wait_ready(self, pid: int, timeout_s: float, popen: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ready_quietly():
                return
            exited = popen.poll() is not None if popen else not self._is_ours(pid)
            if exited:
                self.pid_file.unlink(missing_ok=True)
                raise self._failure("exited during start-up")
            time.sleep(0.2)
        failure = self._failure(f"not ready after {timeout_s:.0f}s")
        if popen is not None:  # ours and useless: leave nothing running behind the error
            self.stop()
            if popen.poll() is None:  # stop() goes by the pid file; end what we started whatever it says
                popen.kill()
                popen.wait(5)
        raise failure

    def _failure(self, what: str) -> ServiceError:
        return ServiceError(
            f"{self.name} {what}.\n  command: {shlex.join(self.command)}\n"
            f"  log: {self.log_file}\n  last lines:\n{tail(self.log_file)}"
        )

    def stop(self) -> bool:
        """SIGTERM, then SIGKILL after the timeout. Only ever the pid we started."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            proc = psutil.Process(pid)
            proc.send_signal(getattr(signal, self.stop_signal_name))
            try:
                proc.wait(self.stop_timeout_s)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            # The service's own children (postgres backends, worker threads' helpers)
            # were started in its session; take down any straggler with it.
            _kill_session(pid)
        except psutil.NoSuchProcess:
            pass
        self.pid_file.unlink(missing_ok=True)
        return True


def _kill_session(sid: int) -> None:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass

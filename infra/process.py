"""Background services that the project starts itself, tracked by pid files.

Each service is one detached process with a pid file in `<data>/run/NAME.pid`
and a log in `<data>/logs/NAME.log`. A pid file is trusted only if that pid is
alive *and* is the process that was started: same start time (recorded in the
file), or, for files without one, a command line that still carries the
service's marker (normally the data folder). So a stale file left by a killed
run, or a recycled pid, is detected and removed instead of being mistaken for
a running service.

`stop` first leaves a `NAME.stopped` marker: a service stopped on purpose is
not a crash, and the supervisor (infra/supervisor.py) leaves it down until
something starts it again, which removes the marker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Python's cyclic collector in the long-running services (the sink, the stream worker, the API)
# is switched off after start-up, with the start-up heap frozen out of every scan, and run on
# this schedule instead. Their records are acyclic and freed by reference counts; left to
# itself, the collector rescanned each batch's records while they lived (a quarter of the
# worker's CPU, a quarter of the sink's, measured with bench/bench_platform.py).
COLLECT_EVERY_S = 10.0


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


def as_user(user: str | None) -> dict:
    """subprocess kwargs to drop to `user` entirely: root's gid and groups would
    otherwise decide access to root's 0700 folders (the group bits win over "other")."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


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

    @property
    def stopped_file(self) -> Path:
        return self.run_dir / f"{self.name}.stopped"

    def stopped_on_purpose(self) -> bool:
        """Stopped by `stop` and not started since: a supervisor must not bring it back."""
        return self.stopped_file.exists()

    # -- state ---------------------------------------------------------------
    def pid(self) -> int | None:
        """The live pid of this service, or None; removes a stale pid file."""
        try:
            record = json.loads(self.pid_file.read_text())
            pid = int(record["pid"])
        except (FileNotFoundError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None
        if recorded_process(record, lambda args: self.marker in " ".join(args)) is not None:
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # `nhdp up` and the supervisor may both find the service down: the lock makes
        # the second one find the first one's process instead of starting another.
        with self._start_lock():
            self.stopped_file.unlink(missing_ok=True)  # wanted up again: supervised again
            pid = self.pid()
            if pid is None:
                proc = self._spawn()
        if pid is not None:
            self._wait_ready(pid, timeout_s)
            return pid, False
        self._wait_ready(proc.pid, timeout_s, popen=proc)
        return proc.pid, True

    @contextlib.contextmanager
    def _start_lock(self):
        with open(self.run_dir / f"{self.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_file, "ab")
        log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {shlex.join(self.command)}\n".encode())
        log.flush()
        kwargs = {}
        if self.user:
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
        self.pid_file.write_text(json.dumps(pid_record(proc.pid, self.command)))
        return proc

    def _wait_ready(self, pid: int, timeout_s: float, popen: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ready_quietly():
                return
            exited = popen.poll() is not None if popen else self.pid() != pid
            if exited:
                self.pid_file.unlink(missing_ok=True)
                raise self._failure("exited during start-up")
            time.sleep(0.2)
        failure = self._failure(f"not ready after {timeout_s:.0f}s")
        if popen is not None:  # ours and useless: leave nothing running behind the error
            self._stop()  # not "on purpose": a supervisor tries again
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
        """SIGTERM, then SIGKILL after the timeout. Only ever the pid we started.

        The marker comes first, so a supervisor never sees the process gone without it."""
        if self.run_dir.exists():
            self.stopped_file.write_text(f"{time.time()}\n")
        return self._stop()

    def _stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            proc = psutil.Process(pid)
            proc.send_signal(getattr(signal, self.stop_signal_name))
            if not _exited(proc, self.stop_timeout_s):
                proc.kill()
                _exited(proc, 30)  # SIGKILL cannot be ignored, but a process in disk wait dies late
            # The service's own children (postgres backends, worker threads' helpers)
            # were started in its session; take down any straggler with it.
            _kill_session(pid)
        except psutil.NoSuchProcess:
            pass
        self.pid_file.unlink(missing_ok=True)
        return True


def _exited(proc: psutil.Process, timeout_s: float) -> bool:
    """Until proc has exited; a zombie has. Its parent reaps it, and that parent may be a process that
    started the stack and lives on without reaping (`nhdp demo`, a test run): waiting for the pid to
    vanish then timed out, and `nhdp down` failed on the supervisor that process had started."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, os.WNOHANG)  # our own child: reaped here
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def write_atomically(path: Path, text: str) -> None:
    """Write a marker file that a reader never sees empty or half-written: another process polls for it
    (a ready file) and reads it as soon as it exists, which `write_text` creates before it writes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def started_at(pid: int) -> int | None:
    """The process's start in clock ticks since boot (/proc/PID/stat, field 22), or None if it is gone.

    Not psutil's create_time(): that adds the boot time the kernel derives from the wall clock, which
    moves when the clock is stepped (this VM's stalls and catch-ups moved it by seconds), and a live
    service then looked like a recycled pid: `down` left a supervisor running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])  # after "pid (comm) ": field 3 onward


def pid_record(pid: int, command) -> dict:
    """What a pid file holds: enough to tell this process from a later one given the same pid."""
    return {"pid": pid, "command": list(command), "since_boot": started_at(pid)}


def recorded_process(record: dict, carries: Callable[[list[str]], bool]) -> psutil.Process | None:
    """The live process a pid file's record names, or None if it is gone or the pid was reused.

    By start time where the record has one. A command line read just after
    Popen returns can still be empty: the kernel closes the close-on-exec pipe
    Popen waits on before it sets the new program's arguments (seen in ~2% of
    reads). Judged by that alone, a service just started looked dead and lost
    its pid file, and `start` then waited for readiness until its timeout.
    Records without a start time (older ones) fall back to `carries`, re-read
    while the command line is empty."""
    try:
        proc = psutil.Process(int(record["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        since_boot = record.get("since_boot")
        if since_boot is not None:
            return proc if started_at(proc.pid) == since_boot else None
        started = record.get("started")  # files written before since_boot, by epoch time
        if started is not None:
            return proc if abs(proc.create_time() - float(started)) < 0.05 else None
        for _ in range(50):
            args = proc.cmdline()
            if args:
                return proc if carries(args) else None
            time.sleep(0.01)
        return None
    except (psutil.Error, ValueError, KeyError, TypeError):
        return None


def _kill_session(sid: int) -> None:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass

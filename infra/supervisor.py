"""The local stack's supervisor: a service that exits is started again, with back-off.

`nhdp up` starts every service detached, waits until it is ready and records it
in a pid file (infra/process.py); then it leaves one more small process running,
this supervisor (`python -m nhdp.supervise`). It polls the services every half
second and starts any whose recorded process is gone through the same
`Managed.start`, so a restart is readiness-checked and recorded exactly as a
start by `nhdp up` is, and `nhdp status` and `nhdp down` need nothing new.

Why our own rather than supervisord: the services are already started,
readiness-checked and recorded by `Managed`. supervisord must own every child
from its start, run it in the foreground as its own child and be the one that
stops it, so `up`, `down`, the pid files and their start-time checks would be
handed over to it, and the readiness checks (a worker holds partitions, the API
answers a summary) would be written a second time as its event listeners. What
the stack lacks is small: notice a dead process, start it again, back off,
count. In production systemd does this job (infra/systemd/).

- A service stopped on purpose (`Managed.stop`: `nhdp down`, a test, a
  benchmark) is left down until something starts it again.
- Back-off per service: the n-th restart since the service last stayed up
  60 s waits 0.5 s·2^(n-1), at most 30 s. A restart that never becomes ready
  counts as one, and the next one waits longer.
- Each restart runs in its own thread: a worker waiting for its partitions (a
  killed member's Kafka session has to expire first) does not hold up the API.
- Restart counts, the last restart and how the process ended are in a JSON
  state file, written atomically, readable by its owner only. A process the
  supervisor restarted is its child, so its exit status is known; one that
  `nhdp up` started is not (it was reparented to init), so the reason is its
  log's last line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from infra.process import Managed, tail

log = logging.getLogger("nhdp.supervisor")


@dataclass(frozen=True)
class Backoff:
    first_s: float = 0.5
    max_s: float = 30.0
    # Up this long: the next crash is a new one, and its restart waits first_s again.
    reset_after_s: float = 60.0

    def delay(self, attempt: int) -> float:
        """The wait before the attempt-th restart (from 1) since the service last stayed up reset_after_s."""
        return min(self.first_s * 2.0 ** min(max(attempt - 1, 0), 64), self.max_s)


@dataclass
class Record:
    """What the state file keeps for one service."""

    restarts: int = 0
    last_restart: float | None = None  # epoch seconds
    last_exit: str | None = None
    attempt: int = 0  # restarts since the service last stayed up Backoff.reset_after_s


def write_state(path: Path, state: dict) -> None:
    """Replace the state file whole (a reader sees the old one or the new one), mode 0600.

    Not fsynced: after a host crash the counts are moot, the services are gone too."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # a leftover tmp file keeps its mode through O_TRUNC
        f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    """The state file, or {} if there is none (no supervisor ran since `down`) or it is unreadable."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def exit_reason(status: int) -> str:
    """A wait status in words."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def last_words(svc: Managed) -> str:
    """The last line the service logged since its start (`Managed.start` writes a `--- … starting:` header)."""
    lines = tail(svc.log_file, 50).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("--- ") and " starting: " in line]
    since = [line.strip() for line in lines[starts[-1] + 1 if starts else 0 :] if line.strip()]
    return f"last log line: {since[-1][:200]}" if since else "nothing in its log since it started"


class Supervisor:
    def __init__(
        self,
        services: Sequence[Managed],
        state_path: Path,
        *,
        start_timeout_s: float,
        backoff: Backoff = Backoff(),
        poll_s: float = 0.5,
    ):
        self.services = {svc.name: svc for svc in services}
        self.state_path = state_path
        self.start_timeout_s = start_timeout_s
        self.backoff = backoff
        self.poll_s = poll_s
        self.started = time.time()
        # A supervisor started again by `nhdp up` (the last one died) goes on counting.
        prior = read_state(state_path).get("services", {})
        keys = {f.name for f in fields(Record)}
        self.records = {
            name: Record(**{k: v for k, v in (prior.get(name) or {}).items() if k in keys}) for name in self.services
        }
        self._lock = threading.Lock()  # the records, between the poll loop and the restart threads
        self._dirty = True
        self._seen: dict[str, int] = {}  # the pid last seen alive
        self._up_since: dict[str, float] = {}
        self._due: dict[str, float] = {}  # while down: when the next restart may start (monotonic)
        self._restarting: dict[str, threading.Thread] = {}
        self._exits: dict[int, str] = {}  # how our own children ended, by pid

    def run(self, stop: threading.Event) -> None:
        self.save()  # first: `nhdp up` takes the state file naming this pid for "ready"
        while not stop.is_set():
            try:
                self.poll()
            except Exception:  # a bad poll must not end the supervision
                log.exception("poll failed")
            stop.wait(self.poll_s)
        self.save()

    def poll(self) -> None:
        self._reap()
        now = time.monotonic()
        for name, svc in self.services.items():
            thread = self._restarting.get(name)
            if thread is not None:
                if thread.is_alive():
                    continue
                del self._restarting[name]
            record = self.records[name]
            pid = svc.pid()
            if pid is not None:
                if self._seen.get(name) != pid:
                    self._seen[name], self._up_since[name] = pid, now
                elif record.attempt and now - self._up_since[name] >= self.backoff.reset_after_s:
                    with self._lock:
                        record.attempt, self._dirty = 0, True
                self._due.pop(name, None)
                continue
            if svc.stopped_on_purpose():
                self._seen.pop(name, None)
                self._due.pop(name, None)
                continue
            if name not in self._due:  # just found down
                reason = self._reason(svc, self._seen.pop(name, None))
                delay = self.backoff.delay(record.attempt + 1)
                log.warning("%s is down (%s); restarting in %.1fs", name, reason, delay)
                with self._lock:
                    record.last_exit, self._dirty = reason, True
                self._due[name] = now + delay
            if now >= self._due[name]:
                self._restart(name)
        if self._dirty:
            self.save()

    def save(self) -> None:
        with self._lock:
            state = {
                "pid": os.getpid(),
                "started": self.started,
                "updated": time.time(),
                "services": {name: asdict(r) for name, r in self.records.items()},
            }
            self._dirty = False
        write_state(self.state_path, state)

    def _restart(self, name: str) -> None:
        del self._due[name]
        record = self.records[name]
        with self._lock:
            record.restarts += 1
            record.attempt += 1
            record.last_restart = time.time()
            self._dirty = True
        thread = threading.Thread(target=self._start, args=(name,), name=f"restart-{name}", daemon=True)
        self._restarting[name] = thread
        thread.start()

    def _start(self, name: str) -> None:
        """In the service's restart thread: `Managed.start`, i.e. started, recorded and ready, or an error."""
        svc, record = self.services[name], self.records[name]
        try:
            pid, started = svc.start(self.start_timeout_s)
        except Exception as exc:  # ServiceError, or an OSError of its folders: try again later
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            delay = self.backoff.delay(record.attempt + 1)
            log.warning("%s: restart %d failed (%s); next in %.1fs", name, record.restarts, first, delay)
            with self._lock:
                record.last_exit, self._dirty = f"restart failed: {first}", True
            self._due[name] = time.monotonic() + delay
            return
        log.info("%s restarted: pid %d, ready%s", name, pid, "" if started else " (started by someone else)")
        self._seen[name], self._up_since[name] = pid, time.monotonic()

    def _reap(self) -> None:
        """Collect the exit status of the services this process restarted (its children), so none stays a zombie."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exits[pid] = exit_reason(status)

    def _reason(self, svc: Managed, pid: int | None) -> str:
        if pid is None:
            return "down when first polled"
        self._reap()  # it may have died since this poll's first reap
        for ready_file in svc.run_dir.glob(f"*-{pid}.assigned"):  # its "I hold partitions" file goes with it
            ready_file.unlink(missing_ok=True)
        if pid in self._exits:
            return f"pid {pid} {self._exits.pop(pid)}"
        return f"pid {pid} gone (exit status unknown: not the supervisor's child); {last_words(svc)}"

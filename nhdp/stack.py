"""The local stack: what `nhdp up` starts, in order, and how it is torn down.

Order matters and is the dependency order: PostgreSQL (registry storage,
projections) → Kafka → ClickHouse (then its analytics schema is migrated) →
schema registry (needs PostgreSQL) → stream worker, ClickHouse sink and API
(need all of the above). Then the supervisor (infra/supervisor.py), which
starts again any of them that exits. `down` stops the supervisor first, so it
does not restart what `down` is stopping, then walks the list backwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import psycopg

from infra import clickhouse, kafka, kafka_access, postgres, zookeeper
from infra.process import Managed, ServiceError, dir_size, recorded_process
from infra.settings import CHECKOUT, STACK_FILE, Settings, get_settings
from infra.supervisor import read_state
from infra.tools import server_binary
from projections.clickhouse.remote import sink_url_path
from projections.clickhouse.schema import ensure_schema
from schemas import principals
from schemas.codec import Codec
from schemas.kafka_acls import SERVICE_GRANTS
from schemas.reference import province_codes as codes
from schemas.registry_client import RegistryClient
from schemas.topics import contract_topics

# What a row of a service that no supervisor watches says about restarts.
UNSUPERVISED = {"restarts": None, "last_restart": None, "last_exit": None}


@dataclass
class Step:
    service: Managed
    prepare: Callable[[], None] = lambda: None
    after_ready: Callable[[], None] = lambda: None
    retry: bool = False  # one more start if the first never became ready


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports, for a private stack (tests, benchmarks)."""

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def private_settings(data_dir: Path, **overrides) -> Settings:
    """Settings of a private stack in data_dir on free loopback ports (tests, benchmarks),
    sharing the checkout's Kafka jar cache."""

    n = int(overrides.get("kafka_nodes", 1))
    # cluster mode: ZooKeeper's port and (tcp, http, interserver) for each of 2 × shards servers
    shards = int(overrides.get("clickhouse_cluster_shards", 0))
    ports = free_ports(5 + 2 * n + (1 + 6 * shards if shards else 0))
    pg, ch, ch_http, registry, api = ports[:5]
    brokers, controllers, cluster = ports[5 : 5 + n], ports[5 + n : 5 + 2 * n], ports[5 + 2 * n :]
    if cluster:
        ch, ch_http = cluster[1], cluster[2]  # the first server's, which the analytics URL names
    values = dict(
        data_dir=data_dir,
        jar_cache=CHECKOUT / ".nhdp" / "cache" / "kafka-jars",
        kafka_bootstrap_servers=",".join(f"127.0.0.1:{p}" for p in brokers),
        kafka_controller_port=controllers[0],
        kafka_controller_ports=",".join(map(str, controllers)),
        postgres_port=pg,
        clickhouse_port=ch,
        clickhouse_http_port=ch_http,
        registry_port=registry,
        api_port=api,
    )
    if cluster:
        values |= dict(zookeeper_port=cluster[0], clickhouse_cluster_ports=",".join(map(str, cluster[1:])))
    return Settings(**(values | overrides))


@contextlib.contextmanager
def private(label: str = "private", *, keep_data: bool = False, **overrides) -> Iterator[Settings]:
    """A whole private stack in a fresh temporary folder, up for the block, then stopped and wiped.

    Also ends whatever a benchmark added (workers 2–4) and any process of the
    stack still alive after `down` (its unique folder is in its command line),
    e.g. a service whose start-up timed out."""

    data = Path(tempfile.mkdtemp(prefix=f"nhdp-{label}-"))
    settings = private_settings(data, **({"start_timeout_s": 180.0} | overrides))  # a busy machine starts slowly
    try:
        up(settings)
        yield settings
    finally:
        down(settings)  # also the extra workers a benchmark started (their pid files)
        # and anything else naming the folder (Kafka's and ClickHouse's configs live in it)
        end_matching(lambda args: str(data) in " ".join(args))
        if not keep_data:
            shutil.rmtree(data, ignore_errors=True)


def python_service(
    settings: Settings, name: str, module: str, *args: str, ready, port=None, url=None, principal: str | None = None
) -> Managed:
    """A service of ours, run with this interpreter; the data folder in argv is its marker.

    `principal`: who it is to Kafka (schemas.principals.SERVICES); it reads its own
    password from the local secret store, never from this process's environment."""
    if principal is not None:
        settings = settings.as_principal(principal)
    return Managed(
        name=name,
        run_dir=settings.run_dir,
        log_dir=settings.log_dir,
        command=[sys.executable, "-m", module, *args, "--nhdp-data", str(settings.data_dir.resolve())],
        marker=f"--nhdp-data {settings.data_dir.resolve()}",
        ready=ready,
        port=port,
        url=url,
        env=settings.as_env(),
    )


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


def registry_service(settings: Settings) -> Managed:
    return python_service(
        settings,
        "registry",
        "schemas.registry",
        "--host",
        settings.registry_host,
        "--port",
        str(settings.registry_port),
        ready=lambda: _http_ok(f"{settings.registry_url}/healthz"),  # the one path open without credentials
        port=settings.registry_port,
        url=settings.registry_url,
    )


def worker_service(settings: Settings, name: str = "worker") -> Managed:
    svc = python_service(settings, name, "streams.worker", ready=lambda: False, principal="worker")
    svc.ready = lambda: (pid := svc.pid()) is not None and settings.ready_path("worker", pid).exists()
    return svc


def sink_service(settings: Settings) -> Managed:
    """The ClickHouse sink (streams/sink/); in chDB mode it also owns the folder and answers queries."""

    svc = python_service(
        settings, "sink", "streams.sink", ready=lambda: False, url=settings.analytics_url(), principal="sink"
    )

    def ready() -> bool:
        pid = svc.pid()
        if pid is None or not settings.ready_path("sink", pid).exists():
            return False
        return not settings.analytics_url().startswith("chdb:") or sink_url_path(settings).exists()

    svc.ready = ready
    return svc


def migrate_analytics(settings: Settings) -> None:
    """The analytics schema (versioned migrations) on the local server; chDB's owner, the sink, migrates itself."""

    clickhouse.ensure_database(settings)
    ensure_schema(settings.analytics_url(), settings.analytics_password())


def api_service(settings: Settings) -> Managed:
    return python_service(
        settings,
        "api",
        "nhdp.cli",
        "api",
        # open, and answers only once the app's start-up (PostgreSQL, Kafka, the token key) is done
        ready=lambda: _http_ok(f"{settings.api_url}/healthz"),
        port=settings.api_port,
        url=settings.api_url,
        principal="gateway",
    )


def supervisor_state_path(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.json"


def supervisor_service(settings: Settings) -> Managed:
    """`python -m nhdp.supervise`: restarts what `steps` lists; ready once its state file names its pid."""

    svc = python_service(settings, "supervisor", "nhdp.supervise", ready=lambda: False)
    svc.ready = lambda: (pid := svc.pid()) is not None and read_state(supervisor_state_path(settings)).get("pid") == pid
    svc.stop_timeout_s = 10.0  # it stops within one poll; its restarts in flight need no wait
    return svc


def province_codes() -> list[str]:
    return codes()


def ensure_principals(settings: Settings) -> None:
    """Every service principal in access.principals with its password (the registry checks basic auth
    against it); idempotent, and a second `up` only verifies (schemas/principals.py)."""
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        principals.ensure_services(conn, settings.password_of)


def steps(settings: Settings) -> list[Step]:
    out: list[Step] = []
    if settings.local_postgres:

        def after_postgres() -> None:
            postgres.ensure_database(settings)
            ensure_principals(settings)

        out.append(Step(postgres.service(settings), lambda: postgres.prepare(settings), after_postgres))
    nodes = kafka.nodes(settings)
    for node in nodes:  # a cluster's nodes all start before the last one's after_ready waits for them
        last = node is nodes[-1]
        out.append(
            Step(
                kafka.service(settings, node),
                lambda node=node: kafka.prepare(settings, node),
                (lambda: kafka_ready(settings)) if last else (lambda: None),
            )
        )
    if settings.local_clickhouse_server:
        out += clickhouse_steps(settings)
    # With an external PostgreSQL there is no PostgreSQL step: the principals are written here.
    prepare_registry = (lambda: None) if settings.local_postgres else (lambda: ensure_principals(settings))
    out.append(Step(registry_service(settings), prepare_registry, lambda: register_catalog(settings)))
    out.append(Step(worker_service(settings), retry=True))
    out.append(Step(sink_service(settings), retry=True))  # kafka-python's group join can stall too
    out.append(Step(api_service(settings)))
    return out


def choose_cluster(settings: Settings) -> Settings:
    """Make this data folder a cluster's: 3 Kafka nodes and, with a clickhouse-server installed,
    2 ClickHouse shards × 2 replicas. Written to its stack.env, which every later command reads
    (infra.settings), because the nodes' storage is formatted for that shape."""
    single = [settings.data_dir / "kafka" / "data" / "meta.properties", clickhouse.server_dir(settings) / "data"]
    if any(path.exists() for path in single):
        raise ServiceError(
            f"{settings.data_dir} holds a one-node stack; `nhdp down && nhdp reset` first, then `nhdp up --cluster`"
        )
    shape = "NHDP_KAFKA_NODES=3\n" + ("NHDP_CLICKHOUSE_CLUSTER_SHARDS=2\n" if server_binary() is not None else "")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / STACK_FILE).write_text("# written by `nhdp up --cluster`; `nhdp reset` removes it\n" + shape)
    get_settings.cache_clear()
    return get_settings()


def clickhouse_steps(settings: Settings) -> list[Step]:
    """The local server; in cluster mode ZooKeeper, then every server, migrated once the last is up."""
    if not settings.clickhouse_cluster_shards:
        return [Step(clickhouse.server_service(settings), lambda: None, lambda: migrate_analytics(settings))]
    *first, last = clickhouse.cluster_services(settings)
    return [
        Step(zookeeper.service(settings), lambda: zookeeper.prepare(settings)),
        *(Step(server) for server in first),
        Step(last, after_ready=lambda: migrate_analytics(settings)),  # ON CLUSTER DDL needs them all
    ]


def kafka_ready(settings: Settings) -> None:
    """The contract's topics, then every service's credential and least-privilege ACLs (schemas/kafka_acls.py)."""
    if settings.kafka_nodes > 1:
        kafka.cluster_ready(settings, settings.start_timeout_s)
    kafka.ensure_topics(settings, contract_topics(settings.kafka_partitions, province_codes()))
    kafka_access.ensure_access(settings, SERVICE_GRANTS)


def register_catalog(settings: Settings) -> None:
    Codec(RegistryClient.for_settings(settings)).register_catalog()  # `nhdp` runs as admin


def up(
    settings: Settings, on_ready: Callable[[Managed, int, bool], None] = lambda *a: None, *, supervise: bool = True
) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for step in steps(settings):
        if step.service.pid() is None:
            step.prepare()
        try:
            pid, started = step.service.start(settings.start_timeout_s)
        except ServiceError:
            if not step.retry:
                raise
            # A consumer (the Faust worker, the sink's kafka-python group) can stall
            # joining its group on a saturated machine; a fresh process joins.
            step.service.stop()
            pid, started = step.service.start(settings.start_timeout_s)
        step.after_ready()
        on_ready(step.service, pid, started)
    if supervise:  # last: it restarts only what has been up and ready
        supervisor = supervisor_service(settings)
        pid, started = supervisor.start(settings.start_timeout_s)
        on_ready(supervisor, pid, started)


def down(settings: Settings) -> list[str]:
    stopped = []
    # First, or it would restart what the steps below stop (each stop also leaves a
    # "stopped on purpose" marker that a supervisor obeys; this makes sure of it).
    if supervisor_service(settings).stop():
        stopped.append("supervisor")
    supervisor_state_path(settings).unlink(missing_ok=True)  # the next `up` counts restarts from zero
    for step in reversed(steps(settings)):
        if step.service.stop():
            stopped.append(step.service.name)
    # Extra services started beside the standard ones (a second worker, a sink…).
    for pid_file in sorted(settings.run_dir.glob("*.pid")) if settings.run_dir.exists() else []:
        if stop_recorded(pid_file):
            stopped.append(pid_file.stem)
    for ready_file in settings.run_dir.glob("worker-*.assigned"):
        ready_file.unlink(missing_ok=True)
    # Whatever still carries the folder's marker now (a service no pid file records
    # any more, or one that outlived its stop) would keep its consumer group
    # membership and partitions: end it too.
    want = ["--nhdp-data", str(settings.data_dir.resolve())]
    stopped += [
        f"orphan {pid}" for pid in end_matching(lambda args: any(args[i : i + 2] == want for i in range(len(args))))
    ]
    return stopped


def end_matching(match: Callable[[list[str]], bool]) -> list[int]:
    """Terminate (then kill) every other process whose argv `match` accepts; returns their pids."""
    ended = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid() or not match(proc.info["cmdline"] or []):
            continue
        try:
            proc.terminate()
            try:
                proc.wait(20)
            except psutil.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(psutil.TimeoutExpired):
                    proc.wait(5)  # reaps it if it is our child: no zombie left under our name
            ended.append(proc.pid)
        except psutil.Error:
            pass
    return ended


def _recorded(pid_file: Path) -> psutil.Process | None:
    try:
        record = json.loads(pid_file.read_text())
        return recorded_process(record, lambda args: args == list(record["command"]))
    except (OSError, ValueError, TypeError):
        return None


def _recorded_status(pid_file: Path) -> dict:
    proc = _recorded(pid_file)
    return {
        "service": pid_file.stem,
        "state": "up" if proc else "down",
        "pid": proc.pid if proc else None,
        "port": None,
        "url": None,
        "data_bytes": 0,
        "log": str(pid_file.parent.parent / "logs" / f"{pid_file.stem}.log"),
    }


def stop_recorded(pid_file: Path) -> bool:
    """Stop the process a pid file names, only if its command line is the one recorded."""
    proc = _recorded(pid_file)
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(20)
        except psutil.TimeoutExpired:
            proc.kill()
    pid_file.unlink(missing_ok=True)
    return proc is not None


def status(settings: Settings) -> list[dict]:
    """Each service's row; those the supervisor watches also say how often it restarted them and why."""
    supervised = read_state(supervisor_state_path(settings)).get("services", {})
    rows = []
    for step in steps(settings):
        record = supervised.get(step.service.name) or {}
        rows.append(
            step.service.status()
            | {
                "restarts": record.get("restarts", 0),
                "last_restart": record.get("last_restart"),
                "last_exit": record.get("last_exit"),
            }
        )
    rows.append(supervisor_service(settings).status() | UNSUPERVISED)
    known = {r["service"] for r in rows}
    for pid_file in sorted(settings.run_dir.glob("*.pid")) if settings.run_dir.exists() else []:
        if pid_file.stem not in known:  # started beside the standard services (a second worker…): not supervised
            rows.append(_recorded_status(pid_file) | UNSUPERVISED)
    url = settings.analytics_url()
    if url.startswith("chdb://"):
        path = Path(url.removeprefix("chdb://"))
        rows.append(
            {
                "service": "chdb",
                "state": "embedded",
                "pid": None,
                "port": None,
                "url": url,
                "data_bytes": dir_size(path) if path.exists() else 0,
                "log": None,
            }
            | UNSUPERVISED
        )
    return rows


def endpoints(settings: Settings) -> dict[str, str]:
    return {
        "kafka": settings.kafka_bootstrap_servers,
        "postgres": settings.postgres_url,
        "clickhouse": settings.analytics_url(),
        "registry": settings.registry_url,
        "api": settings.api_url,
    }


def reset(settings: Settings) -> None:
    """Stop everything and wipe local data; the jar cache survives (it is not data)."""
    down(settings)
    if not settings.data_dir.exists():
        return
    for child in settings.data_dir.iterdir():
        if child.name == "cache":
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()

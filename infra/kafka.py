"""Kafka 4.x, KRaft, run from Maven Central jars with the JVM: one node, or a cluster on loopback.

One node (the default) lives in <data>/kafka as service `kafka`. A cluster
(settings.kafka_nodes = 3) is nodes kafka-1…kafka-3 in <data>/kafka-N, each a
broker and a voter of a static controller quorum, formatted with one cluster
id: topics get replication factor 3 and min ISR 2, so an acknowledged write
survives the loss of any one node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from infra.process import Managed, ServiceError
from infra.settings import Settings

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
TEMPLATES = HERE / "templates"

# The G1 flags of Kafka's own start script; heap from settings (512m locally). The local broker
# shares its cores with the whole platform, where the full JIT was the larger part of its CPU
# for minutes after each start (C2 compiling the broker's code, measured per thread by
# bench_platform); the quick C1 compiler alone costs less over the runs this stack is for.
# A production broker (its own cores, up for months) keeps the JVM's default.
JVM_FLAGS = [
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
]


class PrerequisiteError(ServiceError):
    """A tool the local stack needs is not installed; the message says how to install it."""


def require_tool(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise PrerequisiteError(
            f"`{name}` is not installed; the local Kafka needs it. "
            f"On Debian/Ubuntu: sudo apt-get install -y {debian_package}"
        )
    return path


@dataclass(frozen=True)
class Node:
    node_id: int
    name: str  # the service: `kafka` alone, `kafka-N` in a cluster
    host: str
    port: int
    controller_port: int
    folder: Path


def nodes(settings: Settings) -> list[Node]:
    local = settings.kafka_local_nodes()
    if len(local) == 1:
        host, port, _ = local[0]
        return [Node(1, "kafka", host, port, settings.kafka_controller_port, settings.data_dir / "kafka")]
    return [
        Node(i, f"kafka-{i}", host, port, ctl, settings.data_dir / f"kafka-{i}")
        for i, (host, port, ctl) in enumerate(local, start=1)
    ]


def kafka_dir(settings: Settings) -> Path:
    return nodes(settings)[0].folder


def resolve_jars(service: str, pom: Path, jars: Path, wanted: Sequence[str]) -> Path:
    """Copy a pom's dependencies once into the folder `jars`; later runs find the `wanted` globs there."""
    if all(any(jars.glob(pattern)) for pattern in wanted):
        return jars
    require_tool("java", "openjdk-17-jre-headless")
    mvn = require_tool("mvn", "maven")
    jars.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-Dnhdp.jars={jars}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not all(any(jars.glob(pattern)) for pattern in wanted):
        raise ServiceError(
            f"{service}: resolving jars failed.\n  command: {' '.join(cmd)}\n"
            f"  last lines:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return jars


def ensure_jars(settings: Settings) -> Path:
    """The broker jars, resolved once into the cache folder."""
    return resolve_jars("kafka", POM, settings.jar_dir, ("kafka_2.13-*.jar", "log4j-core-*.jar"))


def _java_cmd(settings: Settings, main: str, *args: str, heap: str | None = None) -> list[str]:
    java = require_tool("java", "openjdk-17-jre-headless")
    logs = settings.log_dir
    cmd = [java]
    if heap:
        cmd += [f"-Xms{heap}", f"-Xmx{heap}", *JVM_FLAGS]
    cmd += [
        f"-Dlog4j2.configurationFile={TEMPLATES / 'kafka-log4j2.properties'}",
        f"-Dkafka.logs.dir={logs}",
        "-cp",
        f"{settings.jar_dir}/*",
        main,
        *args,
    ]
    return cmd


# The broker's super user (it also talks between its own listeners) and the controller
# listener's user; both passwords come from the local secret store.
ADMIN = "admin"
CONTROLLER_SECRET = "kafka-controller"
# Written after a format with --add-scram: storage formatted before SASL has no admin credential.
SECURED_MARKER = "nhdp-scram-formatted"


def write_config(settings: Settings, node: Node) -> Path:
    base = node.folder
    base.mkdir(parents=True, exist_ok=True)
    every = nodes(settings)
    if len(every) == 1:
        quorum = f"controller.quorum.bootstrap.servers={node.host}:{node.controller_port}"
    else:  # a static quorum: formatted without --standalone, every node a voter
        quorum = "controller.quorum.voters=" + ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in every)
    replication = settings.kafka_replication_factor
    text = Template((TEMPLATES / "kafka-server.properties.tmpl").read_text()).substitute(
        node_id=node.node_id,
        quorum=quorum,
        replication=replication,
        min_isr=max(1, replication - 1),
        host=node.host,
        port=node.port,
        controller_port=node.controller_port,
        admin_user=ADMIN,
        admin_password=settings.password_of(ADMIN),
        controller_password=settings.secrets.get(CONTROLLER_SECRET),
        log_dirs=base / "data",
        partitions=settings.kafka_partitions,
    )
    path = base / "server.properties"
    # It holds passwords: 0600 from its first byte, replaced atomically.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


CLUSTER_ID_FILE = "kafka-cluster-id"  # in the data folder: every node of a cluster is formatted with it


def cluster_id(settings: Settings) -> str:
    path = settings.data_dir / CLUSTER_ID_FILE
    if path.exists():
        return path.read_text().strip()
    uuid = subprocess.run(_java_cmd(settings, "kafka.tools.StorageTool", "random-uuid"), capture_output=True, text=True)
    new = uuid.stdout.strip().splitlines()[-1] if uuid.returncode == 0 and uuid.stdout.strip() else ""
    if not new:
        raise ServiceError(f"kafka: StorageTool random-uuid failed:\n{uuid.stderr[-2000:]}")
    path.write_text(new + "\n")
    return new


def format_storage(settings: Settings, node: Node, config: Path) -> None:
    """Format once; the broker refuses unformatted storage."""
    secured = node.folder / SECURED_MARKER  # beside the log dir: the broker keeps that one to itself
    if (node.folder / "data" / "meta.properties").exists():
        if not secured.exists():
            raise ServiceError(
                f"kafka: {node.folder / 'data'} was formatted before Kafka required SASL sign-in, so it "
                "has no admin credential and the broker could never start. `nhdp reset` wipes the local data "
                "(the next `nhdp up` formats it anew)"
            )
        return
    standalone = ["--standalone"] if len(nodes(settings)) == 1 else []
    cmd = _java_cmd(
        settings, "kafka.tools.StorageTool", "format", *standalone, "-t", cluster_id(settings), "-c", str(config)
    )
    # The admin's SCRAM credential must exist before the first start: the broker signs in
    # between its own listeners with it. Its password is kept out of the error message.
    scram = f"SCRAM-SHA-512=[name={ADMIN},password={settings.password_of(ADMIN)}]"
    proc = subprocess.run([*cmd, "--add-scram", scram], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServiceError(
            f"kafka: formatting storage failed.\n  command: {' '.join(cmd)} --add-scram <admin credential>\n"
            f"  output:\n{(proc.stdout + proc.stderr).replace(settings.password_of(ADMIN), '***')[-3000:]}"
        )
    secured.write_text("formatted with the admin's SCRAM credential\n")


def as_admin(settings: Settings) -> Settings:
    """These settings signed in as the broker's admin (its own password kept if it already is)."""
    return settings if settings.principal == ADMIN else settings.as_principal(ADMIN)


def metadata_ok(settings: Settings, timeout_ms: int = 2000) -> bool:
    """Ready means a metadata request succeeds, signed in as settings' principal, not just an open port."""

    admin = KafkaAdminClient(**settings.kafka_python_config(), request_timeout_ms=timeout_ms, client_id="nhdp-ready")
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()


def _listening(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1.0):
        return True


def service(settings: Settings, node: Node | None = None) -> Managed:
    """One node. Alone, it is ready when it answers metadata. In a cluster, a node cannot answer
    before a quorum of its voters runs, and `nhdp up` starts them one after the other: a node is
    ready once its controller listens, and `cluster_ready` then waits for every broker."""
    node = node or nodes(settings)[0]
    config = node.folder / "server.properties"
    alone = len(nodes(settings)) == 1
    return Managed(
        name=node.name,
        run_dir=settings.run_dir,
        log_dir=settings.log_dir,
        command=_java_cmd(settings, "kafka.Kafka", str(config), heap=settings.kafka_heap)
        if shutil.which("java")
        else ["java", "kafka.Kafka", str(config)],
        marker=str(config),
        ready=(lambda: metadata_ok(as_admin(settings)))
        if alone
        else (lambda: _listening(node.host, node.controller_port)),
        port=node.port,
        url=f"kafka://{node.host}:{node.port}",
        data_path=node.folder,
        # A node whose quorum is gone can hang in controlled shutdown; Managed then kills it.
        stop_timeout_s=20.0 if alone else 15.0,
    )


def services(settings: Settings) -> list[Managed]:
    return [service(settings, node) for node in nodes(settings)]


def prepare(settings: Settings, node: Node | None = None) -> None:
    node = node or nodes(settings)[0]
    ensure_jars(settings)
    format_storage(settings, node, write_config(settings, node))


def cluster_ready(settings: Settings, timeout_s: float) -> None:
    """Until every node is a registered broker (a cluster's nodes are started before any can answer)."""
    want = len(nodes(settings))
    deadline = time.monotonic() + timeout_s
    seen: object = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(**as_admin(settings).kafka_python_config(), request_timeout_ms=3000)
            try:
                seen = len(admin.describe_cluster()["brokers"])
            finally:
                admin.close()
            if seen >= want:
                return
        except Exception as exc:  # not up yet: the next round asks again
            seen = exc
        time.sleep(0.5)
    raise ServiceError(f"kafka: the cluster did not have its {want} brokers within {timeout_s:.0f}s (last: {seen})")


def ensure_topics(settings: Settings, topics: Sequence[tuple[str, int, dict[str, str]]]) -> None:
    """Create these topics (name, partitions, configs) if missing (idempotent)."""

    admin = KafkaAdminClient(**as_admin(settings).kafka_python_config(), client_id="nhdp-setup")
    try:
        existing = set(admin.list_topics())
        rf = settings.kafka_replication_factor
        # Each topic carries its own durability, whatever the brokers' defaults become.
        durable = {"min.insync.replicas": str(max(1, rf - 1)), "unclean.leader.election.enable": "false"}
        wanted = [NewTopic(name, parts, rf, topic_configs=dict(configs) | durable) for name, parts, configs in topics]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # a concurrent `up` won the race; the topics exist either way
    finally:
        admin.close()

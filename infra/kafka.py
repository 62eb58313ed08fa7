"""Kafka 4.x, KRaft, one node, run from Maven Central jars with the JVM."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
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

# The G1 flags of Kafka's own start script; heap from settings (512m locally).
JVM_FLAGS = [
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


def kafka_dir(settings: Settings) -> Path:
    return settings.data_dir / "kafka"


def ensure_jars(settings: Settings) -> Path:
    """Resolve the broker jars once into the cache folder; later runs reuse them."""
    jars = settings.jar_dir
    if any(jars.glob("kafka_2.13-*.jar")) and any(jars.glob("log4j-core-*.jar")):
        return jars
    require_tool("java", "openjdk-17-jre-headless")
    mvn = require_tool("mvn", "maven")
    jars.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-Dnhdp.jars={jars}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not any(jars.glob("kafka_2.13-*.jar")):
        raise ServiceError(
            f"kafka: resolving jars failed.\n  command: {' '.join(cmd)}\n"
            f"  last lines:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return jars


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


def write_config(settings: Settings) -> Path:
    base = kafka_dir(settings)
    base.mkdir(parents=True, exist_ok=True)
    text = Template((TEMPLATES / "kafka-server.properties.tmpl").read_text()).substitute(
        host=settings.kafka_host,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
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


def format_storage(settings: Settings, config: Path) -> None:
    """Format once; the broker refuses unformatted storage."""
    secured = kafka_dir(settings) / SECURED_MARKER  # beside the log dir: the broker keeps that one to itself
    if (kafka_dir(settings) / "data" / "meta.properties").exists():
        if not secured.exists():
            raise ServiceError(
                f"kafka: {kafka_dir(settings) / 'data'} was formatted before Kafka required SASL sign-in, so it "
                "has no admin credential and the broker could never start. `nhdp reset` wipes the local data "
                "(the next `nhdp up` formats it anew)"
            )
        return
    uuid = subprocess.run(_java_cmd(settings, "kafka.tools.StorageTool", "random-uuid"), capture_output=True, text=True)
    cluster_id = uuid.stdout.strip().splitlines()[-1] if uuid.returncode == 0 and uuid.stdout.strip() else ""
    if not cluster_id:
        raise ServiceError(f"kafka: StorageTool random-uuid failed:\n{uuid.stderr[-2000:]}")
    cmd = _java_cmd(settings, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(config))
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


def service(settings: Settings) -> Managed:
    config = kafka_dir(settings) / "server.properties"
    return Managed(
        name="kafka",
        run_dir=settings.run_dir,
        log_dir=settings.log_dir,
        command=_java_cmd(settings, "kafka.Kafka", str(config), heap=settings.kafka_heap)
        if shutil.which("java")
        else ["java", "kafka.Kafka", str(config)],
        marker=str(config),
        ready=lambda: metadata_ok(as_admin(settings)),
        port=settings.kafka_port,
        url=f"kafka://{settings.kafka_bootstrap_servers}",
        data_path=kafka_dir(settings),
    )


def prepare(settings: Settings) -> None:
    ensure_jars(settings)
    format_storage(settings, write_config(settings))


def ensure_topics(settings: Settings, topics: Sequence[tuple[str, int, dict[str, str]]]) -> None:
    """Create these topics (name, partitions, configs) if missing (idempotent)."""

    admin = KafkaAdminClient(**as_admin(settings).kafka_python_config(), client_id="nhdp-setup")
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(name, parts, 1, topic_configs=dict(configs)) for name, parts, configs in topics]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # a concurrent `up` won the race; the topics exist either way
    finally:
        admin.close()

"""The one configuration object. Every endpoint is read from NHDP_* variables.

Every default points at the local stack that `nhdp up` starts, so a fresh
checkout needs no configuration at all; production sets the variables.
"""

from __future__ import annotations

import os
from datetime import date
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlparse

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, SettingsConfigDict

from infra.secrets import Secrets
from infra.tools import server_binary

CHECKOUT = Path(__file__).resolve().parent.parent

# Known to everyone who reads this file, so refused outside the local stack.
LOCAL_DEV_SECRET = "nhdp-local-development-secret-not-for-production"
MIN_SECRET_CHARS = 32

# In the data folder: the settings `nhdp up --cluster` fixed for it (Settings.settings_customise_sources).
STACK_FILE = "stack.env"
KAFKA_SASL_MECHANISM = "SCRAM-SHA-512"


class ConfigError(RuntimeError):
    """A setting is missing or unsafe; the message says which and why."""


def credentials_dir() -> str | None:
    """Where a secret may also come from: one file per setting, named as its variable (NHDP_PSEUDONYM_SECRET).

    systemd's LoadCredential= puts them in $CREDENTIALS_DIRECTORY (infra/systemd/), so a secret is never in
    an environment block that `systemctl show` or /proc/PID/environ would reveal. A variable wins over a file."""
    return os.environ.get("CREDENTIALS_DIRECTORY") or None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NHDP_", extra="ignore", secrets_dir=credentials_dir())

    # "local": the stack started by `nhdp up`. Anything else is a real deployment.
    env: str = "local"
    data_dir: Path = CHECKOUT / ".nhdp"

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
    # KRaft nodes `nhdp up` starts: 1, or a cluster (3: replication factor 3, min ISR 2). With more
    # than one, each node's broker port is its entry in kafka_bootstrap_servers and its controller
    # port its entry in kafka_controller_ports; unlisted ones follow the first, two apart.
    kafka_nodes: int = Field(default=1, ge=1, le=9)
    kafka_controller_ports: str | None = None
    kafka_heap: str = "512m"
    kafka_partitions: int = 6
    # Clients authenticate with SASL/SCRAM (the local broker's listener); production may use SASL_SSL.
    kafka_security_protocol: str = Field(default="SASL_PLAINTEXT", pattern=r"^SASL_(PLAINTEXT|SSL)$")
    # How our producers compress record batches (the gateway and SDK into health.events, the worker
    # into the province topics). None by default: on loopback or a LAN the cores are what is scarce,
    # and a compressed batch costs its producer, the broker (which decompresses it to validate it)
    # and every consumer; lz4 or zstd where the network is the bottleneck (bench/RESULTS.md).
    kafka_compression: str = Field(default="none", pattern=r"^(none|lz4|zstd|gzip|snappy)$")

    # No event may have happened before this day (UTC): older timestamps are typing errors or
    # attacks, and ClickHouse's DateTime cannot hold every one of them (schemas/bounds.py).
    platform_epoch: date = date(2020, 1, 1)

    # Unset: the embedded PostgreSQL 18 in the data folder, on this port.
    postgres_dsn: str | None = None
    postgres_port: int = 5433
    postgres_db: str = "nhdp"

    # Unset: a local clickhouse-server if one is installed, else embedded chDB.
    clickhouse_url: str | None = None
    clickhouse_port: int = 9500
    clickhouse_http_port: int = 8523
    clickhouse_db: str = "nhdp"
    # The server's password for the URL's user (default `default`). Unset on the local stack: generated
    # into <data>/secrets/clickhouse-default. Never put it in NHDP_CLICKHOUSE_URL: URLs get printed.
    clickhouse_password: SecretStr | None = None
    # Cluster mode of the local ClickHouse: 0 = the one server above; n = n shards × 2 replicas of
    # clickhouse-server and a ZooKeeper, the tables Replicated…MergeTree behind Distributed ones
    # (projections/clickhouse/schema.py). The URL then names the first server and `?cluster=NAME`.
    clickhouse_cluster_shards: int = Field(default=0, ge=0, le=8)
    clickhouse_cluster: str = Field(default="nhdp", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    # "tcp,http,interserver" ports of every server, comma-separated, in shard then replica order;
    # empty: clickhouse_port + i, clickhouse_http_port + i, clickhouse_port + 100 + i.
    clickhouse_cluster_ports: str = ""
    zookeeper_port: int = 2181
    # Processes the ClickHouse sink decodes Avro in, beside its own (streams/sink/).
    sink_decoders: int = Field(default=2, ge=1)

    registry_host: str = "127.0.0.1"
    registry_port: int = 8081
    registry_url_override: str | None = Field(default=None, alias="NHDP_REGISTRY_URL")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Processes serving the API on that one port (each with its own gateway producer and pools).
    api_processes: int = Field(default=1, ge=1, le=64)

    # Bounded resources of the API (DESIGN §5). A body is refused while it arrives, past this size.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    registry_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # The gateway producer's max request size: a bigger encoded event is rejected, not retried.
    kafka_max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Requests in progress per lane; one more is answered 503 at once, so no lane waits on another.
    api_ingest_concurrency: int = Field(default=64, ge=1)
    # Back-pressure: past this many events of health.events not yet applied by the live
    # projections or by the analytics sink, the gateway answers 503 + Retry-After. 0: never.
    gateway_max_backlog: int = Field(default=200_000, ge=0)
    # Before that, pacing: past this many events behind, each ingest request waits before
    # it is read, longer the further behind (projections/backpressure.py). 0: never.
    gateway_pace_backlog: int = Field(default=20_000, ge=0)
    api_analytics_concurrency: int = Field(default=16, ge=1)
    api_general_concurrency: int = Field(default=128, ge=1)
    # The API's ClickHouse connections, how long a call waits for one, and each query's limits.
    analytics_connections: int = Field(default=4, ge=1)
    analytics_wait_s: float = Field(default=2.0, gt=0)
    analytics_max_execution_s: int = Field(default=10, ge=1)
    analytics_max_rows_to_read: int = Field(default=2_000_000_000, ge=1)

    pseudonym_secret: str = LOCAL_DEV_SECRET

    # Who this process is to Kafka and the schema registry (DESIGN §8): `admin` for the `nhdp`
    # command, one least-privileged principal per service (the local stack sets it per process).
    principal: str = Field(default="admin", pattern=r"^[a-z][a-z0-9_]{0,63}$")
    # Its password. Unset on the local stack: generated into <data>/secrets/ (infra/secrets.py).
    principal_password: SecretStr | None = None

    # What the API's bearer tokens are signed with (schemas/tokens.py). Unset on the local stack: generated.
    api_token_secret: SecretStr | None = None

    # Resolved Kafka jars; defaults to <data_dir>/cache. Tests share the checkout's cache.
    jar_cache: Path | None = None

    # Start-up budget for each service before `nhdp up` gives up and shows its log.
    start_timeout_s: float = 60.0

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # After the environment: <data>/stack.env, the shape `nhdp up --cluster` chose for this
        # data folder (its storage is formatted for it), so every later command finds that shape.
        data_dir = Path(os.environ.get("NHDP_DATA_DIR") or CHECKOUT / ".nhdp")
        stack_file = DotEnvSettingsSource(settings_cls, env_file=data_dir / STACK_FILE)
        return init_settings, env_settings, stack_file, file_secret_settings

    @model_validator(mode="after")
    def _local_kafka_nodes(self) -> Settings:
        hosts = self.kafka_bootstrap_servers.split(",")
        if self.kafka_nodes > 1 and len(hosts) < self.kafka_nodes:
            self.kafka_bootstrap_servers = ",".join(
                f"{self.kafka_host}:{self.kafka_port + 2 * i}" for i in range(self.kafka_nodes)
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_secret(self) -> Settings:
        if self.env != "local" and self.pseudonym_secret in ("", LOCAL_DEV_SECRET):
            raise ConfigError(
                "NHDP_PSEUDONYM_SECRET must be set to a private value when NHDP_ENV is "
                f"{self.env!r}: the local default would make subject ids reversible by anyone"
            )
        # There are only ~10^12 citizen ids: the secret is all that stops anyone from
        # hashing every one of them, so it must be too long to guess.
        if self.env != "local" and len(self.pseudonym_secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"NHDP_PSEUDONYM_SECRET is {len(self.pseudonym_secret)} characters; at least {MIN_SECRET_CHARS} "
                f"are required when NHDP_ENV is {self.env!r} (e.g. the output of `openssl rand -hex 32`)"
            )
        return self

    # -- derived endpoints -------------------------------------------------
    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])

    @property
    def kafka_host(self) -> str:
        return self.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[0]

    def kafka_local_nodes(self) -> list[tuple[str, int, int]]:
        """(host, broker port, controller port) of each KRaft node `nhdp up` runs."""
        hosts = [h.rsplit(":", 1) for h in self.kafka_bootstrap_servers.split(",")][: self.kafka_nodes]
        listed = [int(p) for p in (self.kafka_controller_ports or "").split(",") if p.strip()]
        controllers = [listed[i] if i < len(listed) else self.kafka_controller_port + 2 * i for i in range(len(hosts))]
        return [(h, int(p), c) for (h, p), c in zip(hosts, controllers, strict=True)]

    @property
    def kafka_replication_factor(self) -> int:
        """Of the topics `nhdp up` creates: 3 on a cluster of three or more, else each node's count."""
        return min(3, self.kafka_nodes)

    @property
    def local_postgres(self) -> bool:
        return self.postgres_dsn is None

    @property
    def postgres_url(self) -> str:
        if self.postgres_dsn:
            return self.postgres_dsn
        return self._local_pg_url("nhdp", self.postgres_db)

    @property
    def postgres_admin_url(self) -> str:
        return self.postgres_admin_url_of("postgres")

    def postgres_admin_url_of(self, database: str) -> str:
        """The local PostgreSQL's superuser, on `database`."""
        return self._local_pg_url("postgres", database)

    @property
    def postgres_passfile(self) -> Path:
        """libpq's password file for the local PostgreSQL (0600, written by `nhdp up`, infra/postgres.py)."""
        return self.secrets.folder / "pgpass"

    def _local_pg_url(self, user: str, database: str) -> str:
        # The password stays in the passfile: the URL, which `nhdp status` prints, only names it.
        return (
            f"postgresql://{user}@127.0.0.1:{self.postgres_port}/{database}"
            f"?passfile={quote(str(self.postgres_passfile.resolve()), safe='/')}"
        )

    @property
    def registry_url(self) -> str:
        return self.registry_url_override or f"http://{self.registry_host}:{self.registry_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def analytics_url(self) -> str:
        """`clickhouse://host:port/db` or `chdb:///path`, resolving the local default."""
        if self.clickhouse_url:
            return self.clickhouse_url
        if server_binary() is not None and self.clickhouse_cluster_shards:
            first = self.clickhouse_cluster_servers()[0]
            return f"clickhouse://127.0.0.1:{first[2]}/{self.clickhouse_db}?cluster={self.clickhouse_cluster}"
        if server_binary() is not None:
            return f"clickhouse://127.0.0.1:{self.clickhouse_port}/{self.clickhouse_db}"
        return f"chdb://{(self.data_dir / 'chdb').resolve()}"

    def analytics_password(self) -> str | None:
        """The ClickHouse server's password for this stack (None for chDB, which has no network endpoint)."""
        if self.clickhouse_password is not None:
            return self.clickhouse_password.get_secret_value()
        if self.local_clickhouse_server:
            return self.secrets.get("clickhouse-default")
        return None

    def clickhouse_cluster_servers(self) -> list[tuple[int, int, int, int, int]]:
        """(shard, replica, tcp, http, interserver) of each local cluster server, shards and replicas from 1."""
        n = 2 * self.clickhouse_cluster_shards
        ports = [int(p) for p in self.clickhouse_cluster_ports.split(",") if p.strip()]
        if not ports:
            for i in range(n):
                ports += [self.clickhouse_port + i, self.clickhouse_http_port + i, self.clickhouse_port + 100 + i]
        if len(ports) != 3 * n:
            raise ConfigError(f"NHDP_CLICKHOUSE_CLUSTER_PORTS needs 3 ports for each of {n} servers, not {len(ports)}")
        return [(i // 2 + 1, i % 2 + 1, *ports[3 * i : 3 * i + 3]) for i in range(n)]

    @property
    def local_clickhouse_server(self) -> bool:
        return self.clickhouse_url is None and urlparse(self.analytics_url()).scheme == "clickhouse"

    def as_env(self) -> dict[str, str]:
        """These settings as NHDP_* variables, for the child processes we start."""
        env = {}
        for name, value in self.model_dump(by_alias=False).items():
            if value is None or isinstance(getattr(self, name), SecretStr):
                continue  # a child reads its secrets itself, never from its parent's environment
            key = "NHDP_REGISTRY_URL" if name == "registry_url_override" else f"NHDP_{name.upper()}"
            env[key] = str(value)
        return env

    # -- secrets ------------------------------------------------------------------
    @property
    def secrets(self) -> Secrets:
        """The local stack's generated secrets (0600 files in <data>/secrets)."""
        return self.secrets_for(self.data_dir)

    @staticmethod
    def secrets_for(data_dir: Path) -> Secrets:
        return Secrets(data_dir / "secrets")

    def password_of(self, principal: str) -> str:
        """A principal's password: NHDP_PRINCIPAL_PASSWORD for this process's own, else the local store's."""
        if principal == self.principal and self.principal_password is not None:
            return self.principal_password.get_secret_value()
        if self.env != "local":
            raise ConfigError(
                f"NHDP_PRINCIPAL_PASSWORD must be set for principal {principal!r} when NHDP_ENV is {self.env!r}: "
                "generated secrets exist only on the local stack"
            )
        return self.secrets.get(f"principal-{principal}")

    @property
    def password(self) -> str:
        """This process's own password (Kafka SASL/SCRAM, the registry's basic auth)."""
        return self.password_of(self.principal)

    def token_secret(self) -> str:
        """The secret the API's token signing key is derived from."""
        if self.api_token_secret is not None:
            return self.api_token_secret.get_secret_value()
        if self.env != "local":
            raise ConfigError(
                f"NHDP_API_TOKEN_SECRET must be set when NHDP_ENV is {self.env!r}: "
                "generated secrets exist only on the local stack"
            )
        return self.secrets.get("api-token-secret")

    def as_principal(self, principal: str) -> Settings:
        """The same settings for another principal (a service the local stack starts, a test client)."""
        return self.model_copy(update={"principal": principal, "principal_password": None})

    def as_service(self, principal: str) -> Settings:
        """A job of `nhdp` (replay, simulate) signs in as its service principal on the local stack,
        where every password is in the store; elsewhere NHDP_PRINCIPAL says who this process is."""
        if self.env == "local" and self.principal == "admin" and self.principal_password is None:
            return self.as_principal(principal)
        return self

    # -- Kafka clients: every client in the repository is configured from these --------
    def kafka_python_auth(self) -> dict[str, str]:
        """kwargs that sign a kafka-python client in as this process's principal."""
        return {
            "security_protocol": self.kafka_security_protocol,
            "sasl_mechanism": KAFKA_SASL_MECHANISM,
            "sasl_plain_username": self.principal,
            "sasl_plain_password": self.password,
        }

    def kafka_python_config(self) -> dict[str, str]:
        """bootstrap_servers plus kafka_python_auth: a kafka-python client's connection."""
        return {"bootstrap_servers": self.kafka_bootstrap_servers, **self.kafka_python_auth()}

    @property
    def kafka_compression_type(self) -> str | None:
        """kafka_compression as the Python clients (kafka-python, aiokafka through Faust) take it."""
        return None if self.kafka_compression == "none" else self.kafka_compression

    def librdkafka_config(self) -> dict[str, str]:
        """A librdkafka (confluent-kafka) client's connection, signed in as this process's principal."""
        return {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
            "sasl.mechanism": KAFKA_SASL_MECHANISM,
            "sasl.username": self.principal,
            "sasl.password": self.password,
        }

    # -- local folders ----------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    def ready_path(self, service: str, pid: int) -> Path:
        """Written by a worker or sink once it holds partitions: how `nhdp up` knows it is ready."""
        return self.run_dir / f"{service}-{pid}.assigned"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def jar_dir(self) -> Path:
        return self.jar_cache or self.data_dir / "cache" / "kafka-jars"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

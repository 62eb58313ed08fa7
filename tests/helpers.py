"""The test helpers, in one module: imported as `from tests.helpers import …`.

Test modules import helpers from here (and hypothesis strategies from
tests/strategies.py), never from one another or from a conftest.

- private stacks: stack_env, settings_for, private_data_dir, wait_caught_up;
- the gateway's events and requests: citizen_id, subject_of, ts, millis,
  valid_event, post, CONFLICT;
- the API's tokens: token, bearer, api (an httpx client with a role's token);
- a topic read back with a plain consumer: TopicLog;
- the registry's credentials: registry_auth (httpx), registry_conf (a stock SchemaRegistryClient).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
from kafka import KafkaConsumer, TopicPartition

from infra.settings import CHECKOUT, Settings
from nhdp.stack import private_settings
from schemas.api_auth import issue_token
from schemas.topics import TOPIC_EVENTS

SOURCE = "site-79-760"  # valid_event's
_PLAIN_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,50}")

# -- private stacks ---------------------------------------------------------------------------------


def stack_env(data_dir: Path) -> dict[str, str]:
    """NHDP_* variables for a private stack in data_dir on free ports."""
    return private_settings(data_dir).as_env()


def settings_for(env: dict[str, str]) -> Settings:
    """Settings from NHDP_* variables without touching os.environ."""
    return Settings(**{k.removeprefix("NHDP_").lower(): v for k, v in env.items()})


def nhdp_cli(settings: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real CLI in a child process, configured for this stack only (NHDP_* from its settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")} | settings.as_env()
    env["COLUMNS"] = "250"  # rich wraps at 80 columns without a terminal
    return subprocess.run(
        [sys.executable, "-m", "nhdp.cli", *args],
        env=env,
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def local_services(tmp_path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """What `nhdp up` runs for each service: its argv after the interpreter, and its environment."""
    from nhdp import stack

    settings = stack.private_settings(tmp_path)
    out = {}
    for svc in (
        stack.api_service(settings),
        stack.worker_service(settings),
        stack.sink_service(settings),
        stack.registry_service(settings),
    ):
        argv = list(svc.command)
        out[svc.name] = (argv[1 : argv.index("--nhdp-data")], svc.env)
    return out


@contextmanager
def private_data_dir(name: str) -> Iterator[Path]:
    """A fresh data folder for a stack, removed afterwards: /tmp/nhdp-test-<name>-XXXXXXXX.

    Directly under the system temp dir, never under pytest's basetemp: a second
    pytest run on the machine resets /tmp/pytest-of-<user> to mode 0700, which the
    embedded PostgreSQL's own OS user (nhdp_postgres, infra/postgres.py) cannot
    traverse; the system temp dir's sticky 1777 mode lets it through.
    """
    path = Path(tempfile.mkdtemp(prefix=f"nhdp-test-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def registry_auth(settings: Settings, principal: str = "admin") -> httpx.BasicAuth:
    """HTTP basic auth for the stack's registry as `principal` (admin by default)."""
    return httpx.BasicAuth(principal, settings.password_of(principal))


def registry_conf(settings: Settings, principal: str = "admin") -> dict[str, str]:
    """A stock confluent-kafka SchemaRegistryClient's configuration for the stack's registry."""
    return {"url": settings.registry_url, "basic.auth.user.info": f"{principal}:{settings.password_of(principal)}"}


def wait_caught_up(settings: Settings, timeout_s: float = 120.0) -> None:
    """Until the live projections have applied every message now in health.events."""
    import psycopg

    from projections.postgres.tracking import consumer_lag

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        while True:
            lag = consumer_lag(settings, conn)[0]
            if sum(lag.values()) == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"projections still behind after {timeout_s}s: {lag}")
            time.sleep(0.2)


# -- the gateway's events and requests ----------------------------------------------------------------

CONFLICT = (
    "event_id: already accepted with different content; a correction is a RecordVoided of the "
    "original plus a new event with a new event_id"
)
HCM = timezone(timedelta(hours=7))

_SYSTEM_RANDOM = random.SystemRandom()


def citizen_id(rng: random.Random = _SYSTEM_RANDOM) -> str:
    """A fresh 12-digit national id (12 digits: it will not turn up by chance in a byte scan)."""
    return f"{rng.randrange(10**11, 10**12)}"


def subject_of(settings, cid: str) -> str:
    """subject_id computed independently of producers/pseudonym.py: HMAC-SHA256 under the secret."""
    return hmac.new(settings.pseudonym_secret.encode(), cid.encode(), hashlib.sha256).hexdigest()


def ts(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def millis(text: str) -> int:
    """Epoch milliseconds, exactly (integer arithmetic, as Avro timestamp-millis stores them)."""
    return (datetime.fromisoformat(text) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def valid_event(event_type: str = "DoseAdministered", cid: str | None = None, **payload: Any) -> dict[str, Any]:
    """A valid JSON-form event of any type, with a fresh event_id."""
    cid = cid or citizen_id()
    at = datetime(2021, 8, 10, 9, 30, tzinfo=HCM) + timedelta(seconds=random.randrange(86_400))
    base: dict[str, dict[str, Any]] = {
        "HealthDeclarationSubmitted": {
            "citizen_id": cid,
            "symptoms": ["fever", "cough"],
            "contact_with_confirmed_case": False,
            "channel": "app",
        },
        "VaccinationRegistered": {
            "citizen_id": cid,
            "birth_year": 1980,
            "sex": "female",
            "priority_group": "elderly_65_plus",
            "channel": "web",
        },
        "AppointmentScheduled": {
            "citizen_id": cid,
            "appointment_id": "AP-" + uuid.uuid4().hex[:10],
            "site_id": "79-760-0001",
            "slot_start": ts(at + timedelta(days=1)),
            "slot_end": ts(at + timedelta(days=1, minutes=30)),
            "dose_number": 1,
        },
        "CheckedIn": {"citizen_id": cid, "site_id": "79-760-0001", "appointment_id": None},
        "DoseAdministered": {
            "citizen_id": cid,
            "site_id": "79-760-0001",
            "vaccine": "astrazeneca",
            "lot_number": "ABV5811",
            "dose_number": 1,
        },
        "AdverseEventReported": {
            "citizen_id": cid,
            "severity": "mild",
            "dose_event_id": str(uuid.uuid4()),
            "symptoms": ["headache"],
        },
        "VaccineAllocated": {
            "allocation_id": "AL-" + uuid.uuid4().hex[:10],
            "vaccine": "pfizer",
            "doses": 30_000,
            "recipient": "armed_forces",
        },
        "RecordVoided": {"voided_event_id": str(uuid.uuid4()), "reason": "entered in error: wrong person"},
    }
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": ts(at),
        "province_code": "79",
        "source": SOURCE,
        "payload": {**base[event_type], **payload},
    }


def post(
    settings, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None, source: str | None = None
) -> httpx.Response:
    """POST /v1/events to the stack's API, as the producer of `source` (default: the body's first
    event's source, else valid_event's), allowed every province."""
    content = raw if raw is not None else orjson.dumps(body)
    if source is None:
        first = body[0] if isinstance(body, list) and body and isinstance(body[0], dict) else {}
        given = first.get("source")
        # a generated body's odd source (too long, reserved, not text) gets valid_event's token
        plain = isinstance(given, str) and _PLAIN_SOURCE.fullmatch(given) and not given.startswith("audit:")
        source = given if plain else SOURCE
    return httpx.post(
        f"{settings.api_url}/v1/events",
        content=content,
        timeout=120,
        headers={"content-type": "application/json", **bearer(settings, "producer", source=source), **(headers or {})},
    )


# -- the API's tokens -------------------------------------------------------------------------------

_TOKENS: dict[tuple, str] = {}


def token(settings, role: str = "national", **scope: Any) -> str:
    """A token of this role and scope for the stack (one per stack, role and scope; 12 h).
    A producer's provinces default to all."""
    if role == "producer":
        scope.setdefault("provinces", ["*"])
    key = (str(settings.data_dir), role, orjson.dumps(scope, option=orjson.OPT_SORT_KEYS))
    found = _TOKENS.get(key)
    if found is None:
        name = f"test-{role}-{scope.get('province') or scope.get('source') or 'all'}"[:64]  # a _PLAIN_SOURCE
        found = _TOKENS[key] = issue_token(settings, name, role, ttl="12h", **scope).token
    return found


def bearer(settings, role: str = "national", **scope: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(settings, role, **scope)}"}


def api(settings, role: str = "national", *, timeout: float = 60, **scope: Any) -> httpx.Client:
    """An httpx client of the stack's API with a token of this role (national: every read)."""
    return httpx.Client(base_url=settings.api_url, timeout=timeout, headers=bearer(settings, role, **scope))


# -- a topic read back ----------------------------------------------------------------------------------


class TopicLog:
    """health.events read back with a plain consumer: end offsets, and every message between two positions."""

    def __init__(self, settings, topic: str = TOPIC_EVENTS):
        self.settings, self.topic = settings, topic
        self.consumer = KafkaConsumer(
            **settings.kafka_python_config(), enable_auto_commit=False, request_timeout_ms=20_000
        )
        self.parts = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic))]

    def ends(self) -> dict[int, int]:
        return {tp.partition: o for tp, o in self.consumer.end_offsets(self.parts).items()}

    def read(self, start: dict[int, int], end: dict[int, int] | None = None, timeout_s: float = 60):
        end = end or self.ends()
        wanted = [tp for tp in self.parts if end[tp.partition] > start[tp.partition]]
        self.consumer.assign(wanted)
        for tp in wanted:
            self.consumer.seek(tp, start[tp.partition])
        out, deadline = [], time.monotonic() + timeout_s
        while any(self.consumer.position(tp) < end[tp.partition] for tp in wanted):
            assert time.monotonic() < deadline, f"could not read {self.topic} up to {end} in {timeout_s}s"
            for tp, msgs in self.consumer.poll(timeout_ms=500).items():
                out += [m for m in msgs if m.offset < end[tp.partition]]
        return out

    def close(self) -> None:
        self.consumer.close()

"""Session fixtures: the real local stack, once per test run, on ports of its own.

The stack lives in a temporary data folder and is stopped at the end of the
run even after a failure, so a test run never touches (or collides with) the
developer's own `nhdp up` stack on the default ports.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra import settings as settings_mod
from infra.settings import Settings
from nhdp.stack import private_settings


def stack_env(data_dir: Path) -> dict[str, str]:
    """NHDP_* variables for a private stack in data_dir on free ports."""
    return private_settings(data_dir).as_env()


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory) -> Settings:
    """A running local stack: PostgreSQL, Kafka, ClickHouse (if installed), registry."""
    from nhdp import stack

    if os.environ.get("CI") == "true":
        from infra.tools import server_binary

        if server_binary() is None:
            pytest.fail(
                "CI needs clickhouse-server for the native-protocol tests: apt-get install -y clickhouse-server"
            )

    env = stack_env(tmp_path_factory.mktemp("stack"))
    for name in [k for k in os.environ if k.startswith("NHDP_")]:
        os.environ.pop(name)
    os.environ.update(env)
    settings_mod.get_settings.cache_clear()
    settings = Settings()
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)


def settings_for(env: dict[str, str]) -> Settings:
    """Settings from NHDP_* variables without touching os.environ."""
    return Settings(**{k.removeprefix("NHDP_").lower(): v for k, v in env.items()})


@pytest.fixture(scope="module")
def clean_stack(tmp_path_factory) -> Settings:
    """A second, private stack whose log holds only what this module publishes.

    For tests that compare whole-log figures (national sums, replays), which
    the shared session stack cannot give since every test writes into it.
    """
    from nhdp import stack

    settings = settings_for(stack_env(tmp_path_factory.mktemp("clean")))
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)


def wait_caught_up(settings: Settings, timeout_s: float = 120.0) -> None:
    """Until the live projections have applied every message now in health.events."""
    import time

    import psycopg

    from projections.postgres.tracking import consumer_lag

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        while True:
            lag = consumer_lag(settings.kafka_bootstrap_servers, conn)[0]
            if sum(lag.values()) == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"projections still behind after {timeout_s}s: {lag}")
            time.sleep(0.2)

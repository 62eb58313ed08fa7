"""Session fixtures of the stack room: the real local stack, once per test run, on ports of its own.

The stack lives in a temporary data folder (directly under the system temp dir, not
pytest's basetemp: see tests.helpers.private_data_dir) and is stopped at the end of
the run even after a failure, so a test run never touches (or collides with) the
developer's own `nhdp up` stack on the default ports.
"""

from __future__ import annotations

import os

import pytest

from infra import settings as settings_mod
from infra.settings import Settings
from schemas.codec import Codec
from schemas.registry_client import RegistryClient
from tests.helpers import TopicLog, private_data_dir, settings_for, stack_env


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """A running local stack: PostgreSQL, Kafka, ClickHouse (if installed), registry."""
    from nhdp import stack

    if os.environ.get("CI") == "true":
        from infra.tools import server_binary

        if server_binary() is None:
            pytest.fail(
                "CI needs clickhouse-server for the native-protocol tests: apt-get install -y clickhouse-server"
            )

    with private_data_dir("stack") as data:
        env = stack_env(data)
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


@pytest.fixture(scope="module")
def clean_stack() -> Settings:
    """A second, private stack whose log holds only what this module publishes.

    For tests that compare whole-log figures (national sums, replays), which
    the shared session stack cannot give since every test writes into it.
    """
    from nhdp import stack

    with private_data_dir("clean") as data:
        settings = settings_for(stack_env(data))
        try:
            stack.up(settings)
            yield settings
        finally:
            stack.down(settings)


@pytest.fixture
def log(stack_settings):
    """health.events as a test reads it back: what a test published, from the offsets before it."""
    topic_log = TopicLog(stack_settings)
    yield topic_log
    topic_log.close()


@pytest.fixture(scope="module")
def codec(stack_settings):
    return Codec(RegistryClient.for_settings(stack_settings))

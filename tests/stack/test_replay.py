"""Replay for auditors (issue 5): the projections rebuilt from the log equal the live ones.

On a private stack (its log holds only this module's data set, plus a few bad
messages so that the DLQ decisions are replayed too), through the real CLI:

- `nhdp replay --verify` exits 0 and reports zero differences;
- `nhdp replay --into x` builds replay_x with the same figures as the live
  projections (and the simulator's own count);
- after one live counter row is corrupted, `--verify` exits non-zero and
  names that row.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer

from infra.settings import Settings
from nhdp import stack
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from projections.postgres import read_models
from projections.postgres.read_models import diff_namespaces
from schemas.topics import TOPIC_EVENTS
from tests.helpers import nhdp_cli as nhdp
from tests.helpers import settings_for, stack_env, wait_caught_up

pytestmark = pytest.mark.stack

DATA_SET = dict(scenario="national", seed=3, days=2, daily_doses=2000)  # ~25k events


@pytest.fixture(scope="module")
def replay_stack() -> Settings:
    """A private full stack holding one published data set, caught up.

    (Outside pytest's basetemp: a concurrent pytest run resets it to 0700,
    which locks the embedded PostgreSQL's own OS user out.)"""
    data = Path(tempfile.mkdtemp(prefix="nhdp-test-replay-"))
    # generous start-up deadlines: other suites may be loading the same 2 cores
    settings = settings_for({**stack_env(data), "NHDP_START_TIMEOUT_S": "180"})
    try:
        stack.up(settings)
        events = list(simulate(**DATA_SET).events())
        pseudonymiser = Pseudonymiser.from_settings(settings)
        with EventProducer(settings, source="test-replay") as producer:
            for i in range(0, len(events), 5000):
                producer.publish_json(events[i : i + 5000], pseudonymiser)
            good = producer.codec.encode_many(
                [
                    (
                        "VaccinationRegistered",
                        {
                            "event_id": "3b0f5a5e-8a43-4f0e-9d8a-0d4c1f7e2b11",
                            "event_type": "VaccinationRegistered",
                            "occurred_at": 1_628_000_000_000,
                            "province_code": "99",
                            "source": "test-replay",
                            "subject_id": "f" * 64,
                            "trace_id": None,
                            "payload": {
                                "birth_year": 1980,
                                "sex": "female",
                                "priority_group": "general",
                                "channel": "app",
                            },
                        },
                    )
                ]
            )[0]
        raw = KafkaProducer(**settings.kafka_python_config(), acks="all")
        for value in (b"\x01" + good[1:], b"\x00" + struct.pack(">I", 424_242) + good[5:], good):
            raw.send(TOPIC_EVENTS, key=b"test-replay-bad", value=value)  # all three go to the DLQ
        raw.flush()
        raw.close()
        wait_caught_up(settings)
        yield settings
    finally:
        stack.down(settings)
        shutil.rmtree(data, ignore_errors=True)


def test_verify_reports_zero_differences(replay_stack):
    result = nhdp(replay_stack, "replay", "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 differences" in result.stdout


def test_replay_into_a_namespace_has_the_live_figures(replay_stack):
    result = nhdp(replay_stack, "replay", "--into", "x")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rebuilt replay_x" in result.stdout and "3 to the DLQ" in result.stdout, result.stdout
    with psycopg.connect(replay_stack.postgres_url) as conn:
        live = read_models.national_summary(conn, "proj")
        rebuilt = read_models.national_summary(conn, "replay_x")
        assert rebuilt == live
        assert read_models.all_provinces(conn, "replay_x") == read_models.all_provinces(conn, "proj")
        assert diff_namespaces(conn, "proj", "replay_x") == []
    expected = simulate(**DATA_SET).expected()["national"]
    for figure, want in expected.items():
        got = rebuilt[figure]
        assert abs(got - want) <= 1e-6 if isinstance(want, float) else got == want, figure


def test_verify_fails_and_names_a_corrupted_row(replay_stack):
    corrupt = "UPDATE proj.counters SET value = value + %s WHERE province = '79' AND figure = 'doses_administered'"
    with psycopg.connect(replay_stack.postgres_url, autocommit=True) as conn:
        assert conn.execute(corrupt, (1,)).rowcount == 1
    try:
        result = nhdp(replay_stack, "replay", "--verify")
    finally:
        with psycopg.connect(replay_stack.postgres_url, autocommit=True) as conn:
            conn.execute(corrupt, (-1,))
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if "differs" in line]
    assert any("province 79 doses_administered:" in line for line in lines), result.stdout
    assert any("national doses_administered:" in line for line in lines), result.stdout
    # nothing but that row and what it feeds (the national sum; doses_remaining where it is derived)
    unrelated = [
        line
        for line in lines
        if not ("79" in line or "national" in line) or not ("doses_administered" in line or "doses_remaining" in line)
    ]
    assert not unrelated, result.stdout

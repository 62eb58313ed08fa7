"""`nhdp simulate` and `nhdp import` as a user runs them, against the session stack.

Each command is a subprocess (`python -m nhdp.cli`) whose environment is the
session's NHDP_* variables; what it published is read back from `health.events`
between the end offsets before and after, and must be exactly its events, once each.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from producers.simulator import simulate
from schemas.codec import Codec
from tests.helpers import CONFLICT, TopicLog, valid_event

pytestmark = pytest.mark.stack


def nhdp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # Wide enough that rich never wraps the summary line.
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-m", "nhdp.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def published_ids(log: TopicLog, before, codec: Codec) -> tuple[Counter, list]:
    messages = log.read(before)
    return Counter(d["event_id"] for d in codec.decode_many([m.value for m in messages])), messages


@pytest.mark.parametrize("via", ["gateway", "sdk"])
def test_simulate_publishes_the_whole_scenario_once(stack_settings, log, codec, tmp_path, via):
    seed = random.SystemRandom().randrange(10**9)  # event ids follow the seed: a fresh one is fresh events
    sim = simulate("national", seed=seed, days=1, daily_doses=2000)
    expected = Counter(e["event_id"] for e in sim.events())
    assert sum(expected.values()) == sim.total_events and max(expected.values()) == 1

    before = log.ends()
    proc = nhdp(
        "simulate",
        "--scenario",
        "national",
        "--days",
        "1",
        "--daily-doses",
        "2000",
        "--seed",
        str(seed),
        "--via",
        via,
        "--out",
        str(tmp_path / "sim"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = sim.total_events
    assert f"published {total:,} events" in proc.stdout
    if via == "gateway":
        assert f"gateway: {total:,} accepted, 0 duplicates" in proc.stdout
    assert orjson.loads((tmp_path / "sim" / "expected.json").read_bytes()) == orjson.loads(orjson.dumps(sim.expected()))

    after = log.ends()
    assert sum(after.values()) - sum(before.values()) == total
    got, messages = published_ids(log, before, codec)
    assert got == expected
    source = b"gateway" if via == "gateway" else b"simulator"
    assert {dict(m.headers)["source"] for m in messages} == {source}


def import_file(tmp_path):
    """A JSON-lines file mixing good and bad lines; returns (path, accepted events, expected rejects)."""
    good = [
        valid_event(t)
        for t in (
            "VaccinationRegistered",
            "DoseAdministered",
            "CheckedIn",
            "VaccineAllocated",
            "RecordVoided",
            "HealthDeclarationSubmitted",
            "DoseAdministered",
        )
    ]
    bad_vaccine = valid_event(vaccine="sputnik")
    future = valid_event("CheckedIn")
    future["occurred_at"] = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    changed = {**good[1], "payload": {**good[1]["payload"], "lot_number": "OTHER-LOT"}}
    lines: list[bytes] = [
        orjson.dumps(good[0]),  # 1
        orjson.dumps(good[1]),  # 2
        orjson.dumps(bad_vaccine),  # 3  invalid
        b'{"event_id": "3f8e", "event_type": ',  # 4  not JSON
        orjson.dumps(good[2]),  # 5
        orjson.dumps(good[0]),  # 6  re-sent: a duplicate (next request)
        b"[1, 2]",  # 7  JSON, not an event
        orjson.dumps(good[3]),  # 8
        orjson.dumps(changed),  # 9  good[1]'s id, other content: a conflict
        b"",  # 10 blank
        orjson.dumps(good[4]),  # 11
        orjson.dumps(future),  # 12 invalid
        orjson.dumps(good[5]),  # 13
        orjson.dumps(good[6]),  # 14
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    vaccines = "astrazeneca, pfizer, moderna, sinopharm, sputnik_v, janssen, abdala, hayat_vax, covaxin, novavax"
    rejects = [
        {"line": 3, "event_id": bad_vaccine["event_id"], "errors": [f"payload.vaccine: must be one of {vaccines}"]},
        {"line": 4, "errors": None},  # the parser's own words, matched below
        {"line": 7, "event_id": None, "errors": ["event: must be a JSON object, got an array"]},
        {"line": 9, "event_id": good[1]["event_id"], "errors": [CONFLICT]},
        {
            "line": 12,
            "event_id": future["event_id"],
            "errors": ["occurred_at: is in the future (more than 5 minutes ahead of the server clock)"],
        },
    ]
    return path, good, rejects, len(lines)


def test_import_accepts_the_good_lines_and_lists_every_bad_one(stack_settings, log, codec, tmp_path):
    path, good, expected_rejects, nlines = import_file(tmp_path)
    rejects_path = tmp_path / "rejects.jsonl"
    before = log.ends()
    # Requests of 4 events: line 6 re-sends line 1 and line 9 contradicts line 2 across requests.
    proc = nhdp("import", str(path), "--batch", "4", "--rejects", str(rejects_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # something was rejected: non-zero
    summary = (
        f"{nlines} lines: {len(good)} accepted, 1 duplicates, {len(expected_rejects)} rejected, 1 blank "
        f"(reasons in {rejects_path})"
    )
    assert summary in proc.stdout, proc.stdout
    assert len(good) + 1 + len(expected_rejects) + 1 == nlines  # every line accounted for

    rejects = [orjson.loads(line) for line in rejects_path.read_bytes().splitlines()]
    assert [r["line"] for r in rejects] == [r["line"] for r in expected_rejects]
    for got, want in zip(rejects, expected_rejects):
        if want["errors"] is None:
            assert set(got) == {"line", "errors"} and len(got["errors"]) == 1
            assert re.fullmatch(r"line: not valid JSON: .+", got["errors"][0]), got
        else:
            assert got == want

    got_ids, _ = published_ids(log, before, codec)
    assert got_ids == Counter(e["event_id"] for e in good)

    # Importing the same file again is safe: nothing new, the same lines refused.
    before = log.ends()
    again = nhdp("import", str(path), "--batch", "4", "--rejects", str(rejects_path))
    assert again.returncode == 1
    assert (
        f"{nlines} lines: 0 accepted, {len(good) + 1} duplicates, {len(expected_rejects)} rejected, 1 blank"
        in again.stdout
    ), again.stdout
    assert [orjson.loads(line)["line"] for line in rejects_path.read_bytes().splitlines()] == [3, 4, 7, 9, 12]
    assert log.ends() == before


def test_import_of_a_clean_file_exits_zero(stack_settings, log, tmp_path):
    events = [valid_event() for _ in range(25)]
    path = tmp_path / "clean.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    before = log.ends()
    proc = nhdp("import", str(path), "--batch", "10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "25 lines: 25 accepted, 0 duplicates, 0 rejected" in proc.stdout
    assert (tmp_path / "clean.jsonl.rejects.jsonl").read_bytes() == b""
    assert sum(log.ends().values()) - sum(before.values()) == 25

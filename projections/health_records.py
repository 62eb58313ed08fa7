"""What the health-book endpoints (producers/healthbook.py) read and record, over the PostgreSQL projections.

* `staff_view`: what staff see when they scan a health-book code: the valid
  doses, the appointment that matches this site today, the dose that is due,
  and any serious adverse event on record.
* `caught_up`: certificates are never behind the log. Before one is signed,
  the projections must have applied every event that was in the log when the
  request arrived, so a dose voided a moment ago is not certified.
* `certs.issued`: one row per certificate (its identifier's hash, the doses it
  rests on, the key), never a name or a birth date. The revocation list is
  every unexpired certificate resting on a dose that has since been voided,
  computed when asked, from the voided doses (few) through an index.

nhdp.app builds one and puts it in `app.state.health_records`; the edge uses
it without importing this layer.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from projections.postgres import read_models
from projections.postgres.tracking import next_offsets
from schemas.hcert import VIETNAM_TIME as LOCAL_TIME  # "today" at a Vietnamese site
from schemas.topics import TOPIC_EVENTS

NAMESPACE = "proj"

DDL = """
CREATE SCHEMA IF NOT EXISTS certs;
CREATE TABLE IF NOT EXISTS certs.issued (
    ci             text PRIMARY KEY,           -- the UVCI
    uci_hash       text NOT NULL,              -- as revocation lists publish it
    subject_id     text NOT NULL,
    dose_event_ids uuid[] NOT NULL,            -- the certified dose and the valid doses before it
    kid            bytea NOT NULL,
    issued_at      timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS issued_by_dose ON certs.issued USING gin (dose_event_ids);
CREATE INDEX IF NOT EXISTS issued_by_subject ON certs.issued (subject_id);
"""

_REVOKED_SQL = """
SELECT DISTINCT i.uci_hash
FROM certs.issued i
WHERE i.expires_at > now()
  AND i.dose_event_ids && ARRAY(SELECT event_id FROM proj.events WHERE etype = 3 AND voided_by IS NOT NULL)
ORDER BY 1
"""


class BehindTheLog(RuntimeError):
    """The projections have not applied what the log held when the request came; retry shortly."""


class HealthRecords:
    def __init__(self, queries: Any):
        """queries: projections.api.Queries (its pool and its long-lived Kafka client)."""
        self.queries = queries
        with queries.pool.connection() as conn:
            conn.execute(DDL)

    def record(self, subject_id: str) -> dict[str, Any] | None:
        return self.queries.run(read_models.citizen_record, subject_id)

    def staff_view(self, subject_id: str, site_id: str, now: datetime) -> dict[str, Any]:
        return staff_view(self.record(subject_id), subject_id, site_id, now)

    def caught_up(self, timeout_s: float = 10.0) -> None:
        """Return once the projections have applied every event the log held on entry; BehindTheLog otherwise."""
        ends = {p: off for (_, p), off in self.queries.log_ends((TOPIC_EVENTS,)).items()}
        deadline = time.monotonic() + timeout_s
        while True:
            with self.queries.pool.connection() as conn:
                done = next_offsets(conn, NAMESPACE)
            behind = sum(max(0, end - done.get(p, 0)) for p, end in ends.items())
            if not behind:
                return
            if time.monotonic() >= deadline:
                raise BehindTheLog(f"the projections are {behind} event(s) behind the log")
            time.sleep(0.05)

    def record_certificate(
        self, ci: str, uci_hash: str, subject_id: str, dose_ids: list[str], kid: bytes, iat: int, exp: int
    ) -> None:
        with self.queries.pool.connection() as conn:
            conn.execute(
                "INSERT INTO certs.issued (ci, uci_hash, subject_id, dose_event_ids, kid, issued_at, expires_at) "
                "VALUES (%s, %s, %s, %s::uuid[], %s, to_timestamp(%s), to_timestamp(%s))",
                (ci, uci_hash, subject_id, dose_ids, kid, iat, exp),
            )

    def revoked(self) -> list[str]:
        with self.queries.pool.connection() as conn:
            return [r[0] for r in conn.execute(_REVOKED_SQL)]


def matching_appointment(appointments: list[dict], site_id: str, now: datetime) -> dict | None:
    """The appointment at this site whose slot is on today's (local) date, the one starting nearest now."""
    today = now.astimezone(LOCAL_TIME).date()
    here = [
        a
        for a in appointments
        if a["site_id"] == site_id and datetime.fromisoformat(a["slot_start"]).astimezone(LOCAL_TIME).date() == today
    ]
    return min(here, key=lambda a: abs(datetime.fromisoformat(a["slot_start"]) - now), default=None)


def staff_view(record: dict | None, subject_id: str, site_id: str, now: datetime) -> dict[str, Any]:
    """What staff need at the scan, from the subject's record (None: nothing recorded yet)."""
    doses = record["doses"] if record else []
    serious = record["serious_adverse_events"] if record else []
    appointment = matching_appointment(record["appointments"] if record else [], site_id, now)
    view = {
        "subject_id": subject_id,
        "valid_doses": len(doses),
        "doses": doses,
        "fully_vaccinated": bool(record and record["fully_vaccinated"]),
        "dose_due": len(doses) + 1,
        "appointment": appointment,
        "serious_adverse_events": serious,
        "warnings": [],
    }
    if serious:
        view["warnings"].append(
            f"{len(serious)} serious adverse event(s) on record: screen before vaccinating (latest "
            f"{serious[-1]['occurred_at']})"
        )
    if appointment and appointment["dose_number"] != view["dose_due"]:
        view["warnings"].append(
            f"the appointment is for dose {appointment['dose_number']}, but {len(doses)} valid dose(s) are recorded"
        )
    return view

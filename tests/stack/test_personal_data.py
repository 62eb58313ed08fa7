"""Personal data stays at the edge (DESIGN §2, §7): a national id posted to the platform
is nowhere downstream, in any byte Kafka, PostgreSQL or ClickHouse keeps.

Events with known citizen_ids go in through the gateway and the SDK; once the
projections have caught up, every place the session stack stores data is searched
for those ids as ASCII: the Kafka log segment files of every topic, and every record
read back through a consumer (the segments may hold compressed batches
(NHDP_KAFKA_COMPRESSION), in which a raw byte scan cannot see); a pg_dump of each database; every row of every ClickHouse
table outside the system databases, and the files under its data folder; and, for
good measure, every other file of the stack's data folder (service logs included).
Positive controls show each search can see what is there: the subject_ids of the same
citizens are found in the decoded records and in the dump. The health book is used too:
one citizen gets a QR code, is scanned in, and gets a certificate under a family name that
carries a needle, so a name or a national id that the certificate path kept anywhere is found.

The settings' refusal of the public development secret outside the local stack
needs no service: tests/unit/test_personal_data.py.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.helpers import SOURCE, api, post, subject_of, valid_event, wait_caught_up

pytestmark = pytest.mark.stack

CHUNK = 64 * 1024 * 1024


class Needles:
    """12-digit national ids sharing a random 6-digit prefix: one fast bytes.find per chunk
    for the prefix, then a set look-up of the 12 digits at each hit."""

    def __init__(self, n: int):
        rng = random.SystemRandom()
        self.prefix = f"{rng.randrange(100_000, 1_000_000)}"
        self.ids = [f"{self.prefix}{rng.randrange(10**6):06d}" for _ in range(n)]
        self._set = {i.encode() for i in self.ids}
        self._p = self.prefix.encode()

    def find(self, data: bytes) -> list[tuple[int, str]]:
        hits, i = [], data.find(self._p)
        while i != -1:
            if data[i : i + 12] in self._set:
                hits.append((i, data[i : i + 12].decode()))
            i = data.find(self._p, i + 1)
        return hits

    def scan_files(self, root: Path) -> tuple[list[str], int, int]:
        """(findings, files scanned, bytes scanned) for every regular file under root."""
        findings, files, size = [], 0, 0
        for folder, _dirs, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                if path.is_symlink() or not path.is_file():
                    continue
                try:
                    with open(path, "rb") as f:
                        files += 1
                        offset, tail = 0, b""
                        while chunk := f.read(CHUNK):
                            data = tail + chunk
                            findings += [f"{path} @ {offset - len(tail) + at}: {cid}" for at, cid in self.find(data)]
                            offset += len(chunk)
                            size += len(chunk)
                            tail = data[-11:]
                except (FileNotFoundError, PermissionError):  # a segment rolled or a part merged meanwhile
                    continue
        return findings, files, size


def publish_known_citizens(settings, needles: Needles) -> list[str]:
    """Every citizen event type through the gateway and the SDK, plus rejected events
    carrying national ids. Returns the subject_ids that must be downstream instead."""
    from producers.pseudonym import Pseudonymiser
    from producers.sdk import EventProducer

    via_gateway, via_sdk = needles.ids[:-4], needles.ids[-4:]
    events = []
    for cid in via_gateway:
        events += [
            valid_event(t, cid=cid)
            for t in (
                "VaccinationRegistered",
                "AppointmentScheduled",
                "HealthDeclarationSubmitted",
                "CheckedIn",
                "DoseAdministered",
                "AdverseEventReported",
            )
        ]
    rejected = [valid_event(cid=via_gateway[0], vaccine="sputnik"), valid_event(cid=via_gateway[1], dose_number=0)]
    resp = post(settings, events + rejected)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert (answer["accepted"], len(answer["rejected"])) == (len(events), len(rejected))
    assert not needles.find(resp.content), "a gateway answer echoed a national id"

    with EventProducer(settings, source="personal-data-test") as producer:
        producer.publish_json(
            [valid_event("DoseAdministered", cid=cid) for cid in via_sdk], Pseudonymiser.from_settings(settings)
        )
    return [subject_of(settings, cid) for cid in needles.ids]


def kafka_records(settings):
    """Every record of every topic, decompressed, read with librdkafka from the low watermark."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    topics = AdminClient(settings.librdkafka_config()).list_topics(timeout=30).topics
    consumer = Consumer(
        {
            **settings.librdkafka_config(),
            "group.id": "nhdp-personal-data-scan",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        todo = {}
        for topic, meta in topics.items():
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                if high > low:
                    todo[(topic, p)] = (low, high)
        consumer.assign([TopicPartition(t, p, low) for (t, p), (low, _) in todo.items()])
        left = dict(todo)
        idle = 0
        while left:
            batch = consumer.consume(num_messages=10_000, timeout=1.0)
            if not batch:  # the end can be a gap (compaction, a control record): ask where we are
                for tp in consumer.position([TopicPartition(t, p) for t, p in left]):
                    if tp.offset >= left[(tp.topic, tp.partition)][1]:
                        del left[(tp.topic, tp.partition)]
                idle += 1
                assert idle < 60, f"Kafka scan stalled; still to read: {list(left)[:5]}"
                continue
            idle = 0
            for m in batch:
                assert m.error() is None, m.error()
                key = (m.topic(), m.partition())
                if key in left and m.offset() >= left[key][1] - 1:
                    del left[key]
                yield m
    finally:
        consumer.close()


def use_the_health_book(settings, needles: Needles, name_needle: str) -> None:
    """A health-book code, a scan and a certificate for a known citizen, the certificate under a family
    name that carries a needle: a name is used only to sign, so it too must be found nowhere."""
    cid = needles.ids[0]
    with api(settings, "citizen_app") as app:
        code = app.post("/v1/health-book/qr", json={"citizen_id": cid})
        assert code.status_code == 200 and not needles.find(code.content), code.text
        cert = app.post(
            "/v1/certificates",
            json={
                "citizen_id": cid,
                "family_name": f"Trần {name_needle}",
                "given_name": "Thị",
                "date_of_birth": "1970",
            },
        )
        assert cert.status_code == 200, cert.text
    with api(settings, "site", source=SOURCE, provinces=["79"]) as site:
        scan = site.post(
            "/v1/checkins", json={"code": code.json()["token"], "site_id": "79-760-0001", "province_code": "79"}
        )
        assert scan.status_code == 200 and not needles.find(scan.content), scan.text


def test_no_national_id_reaches_kafka_postgres_or_clickhouse(stack_settings, tmp_path):
    needles = Needles(17)
    name_needle = needles.ids.pop()  # in the needles' set, published as no citizen's id: a name's
    subjects = publish_known_citizens(stack_settings, needles)
    wait_caught_up(stack_settings)
    use_the_health_book(stack_settings, needles, name_needle)
    wait_caught_up(stack_settings)
    data_dir = stack_settings.data_dir

    # 1. Kafka: the segment files as stored, then every record decompressed.
    kafka_data = data_dir / "kafka" / "data"
    topic_dirs = {p.name.rsplit("-", 1)[0] for p in kafka_data.iterdir() if p.is_dir()}
    assert {"health.events", "health.events.dlq", "province.79.events", "province.01.events"} <= topic_dirs
    findings, files, _ = needles.scan_files(kafka_data)
    assert files > 0 and findings == [], findings[:10]

    records = seen_subjects = 0
    topics_read = set()
    control = {subjects[0].encode(), subjects[-1].encode()}  # one via the gateway, one via the SDK
    for m in kafka_records(stack_settings):
        records += 1
        topics_read.add(m.topic())
        parts = [m.key() or b"", m.value() or b""] + [v or b"" for _, v in (m.headers() or [])]
        for part in parts:
            assert not needles.find(part), f"national id in {m.topic()}[{m.partition()}]@{m.offset()}"
        seen_subjects += sum(s in (m.value() or b"") for s in control)
    assert {"health.events", "province.79.events"} <= topics_read
    # Positive control: the citizens' events are there, under their subject_ids (log + province copy).
    assert seen_subjects >= 2 * (6 + 1), f"only {seen_subjects} records carry the control subject_ids"

    # 2. PostgreSQL: a dump of every database (projections, registry, the gateway's re-send record).
    from infra.postgres import bin_dir

    if stack_settings.local_postgres:
        import psycopg

        with psycopg.connect(stack_settings.postgres_admin_url, autocommit=True) as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")]
        urls = {name: stack_settings.postgres_admin_url_of(name) for name in names}
    else:
        urls = {stack_settings.postgres_db: stack_settings.postgres_url}
    assert stack_settings.postgres_db in urls
    for name, url in urls.items():
        dump = subprocess.run(
            [str(bin_dir() / "pg_dump"), "--dbname", url, "--no-owner"], capture_output=True, timeout=300
        )
        assert dump.returncode == 0, dump.stderr.decode()
        assert not needles.find(dump.stdout), f"national id in a pg_dump of {name}"
        if name == stack_settings.postgres_db:
            assert b"gateway.seen_events" in dump.stdout
            # Positive control: the projections hold the dosed citizens by subject_id.
            assert all(s.encode() in dump.stdout for s in subjects), "subject_ids missing from the projections"

    # 3. ClickHouse: every row of every table outside the system databases, then its files.
    from projections.clickhouse.connect import open_store

    store = open_store(
        stack_settings.analytics_url(), password=stack_settings.analytics_password(), purpose="personal-data test"
    )
    try:
        tables = store.execute(
            "SELECT database, name FROM system.tables "
            "WHERE database NOT IN ('system', 'INFORMATION_SCHEMA', 'information_schema')"
        )
        rows_scanned = 0
        for database, table in tables:
            rows = store.execute(f"SELECT * FROM `{database}`.`{table}`")
            rows_scanned += len(rows)
            text = repr(rows).encode()
            assert not needles.find(text), f"national id in ClickHouse {database}.{table}"
    finally:
        store.close()
    for folder in (data_dir / "clickhouse", data_dir / "chdb"):
        if folder.exists():
            findings, _, _ = needles.scan_files(folder)
            assert findings == [], findings[:10]

    # 4. Everything else the stack keeps: PostgreSQL's files, Faust's folder, every service log.
    findings, files, size = needles.scan_files(data_dir)
    assert files > 0 and findings == [], findings[:10]

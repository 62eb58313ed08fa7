"""Throughput of Projector.apply_batch against a real PostgreSQL.

    python bench/bench_projector.py [--dsn DSN] [--events 200000] [--batch-sizes 1000,5000,10000] [--workers 1]

Synthetic decoded events (what the Avro codec hands the stream workers), in a
realistic mix: ~20% each of declarations, registrations, appointments,
check-ins and doses, plus adverse events, voids and allocations. Subjects get
1–3 doses, some out of order. Only apply_batch is timed (event generation is
not). With --workers N, N processes apply batches of their own partitions to
the same namespace at once, as the stream workers do. Each batch size runs in
a fresh namespace, dropped afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from projections.postgres.projector import Projector

PROVINCES = [f"{c:02d}" for c in (1, 79, 48, 92, 31, 75, 74, 26, 27, 38, 40, 44, 46, 56, 60, 80, 83, 87, 89, 91)]
VACCINES = ["astrazeneca", "pfizer", "moderna", "sinopharm", "janssen"]
T0 = datetime(2021, 6, 1, tzinfo=UTC)


def subject(i: int) -> str:
    return hashlib.sha256(f"citizen-{i}".encode()).hexdigest()


def generate(n: int, seed: int, n_subjects: int) -> list[dict]:
    """n events; partition-local, as one worker would consume them."""
    rng = random.Random(seed)
    rand = rng.random
    out: list[dict] = []
    recent: list[str] = []
    for _i in range(n):
        r = rand()
        sid = subject(seed * 10_000_000 + rng.randrange(n_subjects))
        prov = PROVINCES[int(rand() * len(PROVINCES))]
        ms = int(T0.timestamp() * 1000) + rng.randrange(90 * 86_400_000)
        eid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if r < 0.2:
            et, p = (
                "HealthDeclarationSubmitted",
                {"symptoms": ["fever"] if rand() < 0.1 else [], "contact_with_confirmed_case": False, "channel": "app"},
            )
        elif r < 0.4:
            et, p = (
                "VaccinationRegistered",
                {
                    "birth_year": 1950 + rng.randrange(50),
                    "sex": "female",
                    "priority_group": "general",
                    "channel": "app",
                },
            )
        elif r < 0.6:
            et, p = (
                "AppointmentScheduled",
                {
                    "appointment_id": eid[:8],
                    "site_id": f"site-{prov}-{rng.randrange(50)}",
                    "slot_start": ms,
                    "slot_end": ms + 1_800_000,
                    "dose_number": 1,
                },
            )
        elif r < 0.79:
            et, p = "CheckedIn", {"site_id": f"site-{prov}-{rng.randrange(50)}", "appointment_id": None}
        elif r < 0.97:
            et, p = (
                "DoseAdministered",
                {
                    "site_id": f"site-{prov}-{rng.randrange(50)}",
                    "vaccine": VACCINES[int(rand() * 5)],
                    "lot_number": "L42",
                    "dose_number": 1 + int(rand() * 2),
                    "vaccinator_id": None,
                },
            )
            recent.append(eid)
            if len(recent) > 5000:
                recent = recent[-2500:]
        elif r < 0.985:
            et, p = (
                "AdverseEventReported",
                {"severity": "serious" if rand() < 0.05 else "mild", "dose_event_id": None, "symptoms": ["fever"]},
            )
        elif r < 0.995 and recent:
            et, p, sid = "RecordVoided", {"voided_event_id": rng.choice(recent), "reason": "entered in error"}, None
        else:
            et, p, sid = (
                "VaccineAllocated",
                {
                    "allocation_id": eid[:12],
                    "vaccine": VACCINES[int(rand() * 5)],
                    "doses": 1000 * (1 + rng.randrange(900)),
                    "recipient": "province_health",
                },
                None,
            )
        out.append(
            {
                "event_id": eid,
                "event_type": et,
                "occurred_at": ms,
                "province_code": prov,
                "source": "bench",
                "subject_id": sid,
                "trace_id": None,
                "payload": p,
            }
        )
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process on this machine (0 if not visible)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(dsn: str, namespace: str, partition: int, n: int, batch: int, n_subjects: int, start, results) -> None:
    events = generate(n, seed=partition + 1, n_subjects=n_subjects)
    msgs = [("health.events", partition, i, e) for i, e in enumerate(events)]
    conn = psycopg.connect(dsn)
    projector = Projector(lambda: conn, namespace)
    backend = conn.info.backend_pid
    start.wait()
    t0, py0, pg0 = time.perf_counter(), time.process_time(), cpu_seconds(backend)
    for i in range(0, len(msgs), batch):
        projector.apply_batch(msgs[i : i + batch], "bench")
    wall = time.perf_counter() - t0
    results.put((partition, n, wall, projector.retries, time.process_time() - py0, cpu_seconds(backend) - pg0))
    conn.close()


def readers(dsn: str, namespace: str, clients: int, stop, results) -> None:
    """`clients` threads, each on its own connection, calling national_summary in a loop."""
    import threading

    from projections.postgres.read_models import national_summary

    latencies: list[float] = []

    def client() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                t = time.perf_counter()
                national_summary(conn, namespace, None)
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    results.put(latencies)


def run(dsn: str, batch: int, events: int, workers: int, n_subjects: int, keep: bool, read_clients: int = 0) -> float:
    namespace = f"bench_{batch}_{os.getpid()}"
    setup = Projector(dsn, namespace)
    setup.drop_schema()
    setup.ensure_schema()
    ctx = mp.get_context("fork")
    start, results = ctx.Barrier(workers + 1), ctx.Queue()
    per = events // workers
    procs = [
        ctx.Process(target=worker, args=(dsn, namespace, p, per, batch, n_subjects // workers, start, results))
        for p in range(workers)
    ]
    for p in procs:
        p.start()
    if read_clients:
        stop, lat_q = ctx.Event(), ctx.Queue()
        reader = ctx.Process(target=readers, args=(dsn, namespace, read_clients, stop, lat_q))
        reader.start()
    start.wait()
    t0 = time.perf_counter()
    out = [results.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    if read_clients:
        stop.set()
        lat = lat_q.get()
        reader.join()
        if lat:
            pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
            print(
                f"  national_summary with {read_clients} clients during the run: {len(lat)} reads, "
                f"p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms",
                flush=True,
            )
    retries = sum(r[3] for r in out)
    py_cpu, pg_cpu = sum(r[4] for r in out), sum(r[5] for r in out)
    rate = per * workers / wall
    total = per * workers
    print(
        f"batch {batch:>6}: {total:>8} events by {workers} worker(s) in {wall:6.2f}s = {rate:>8,.0f} events/s; "
        f"CPU per 100k events: python {py_cpu / total * 1e5:.2f}s, postgres {pg_cpu / total * 1e5:.2f}s "
        f"(= {total / (py_cpu + pg_cpu):,.0f} events per CPU-second); retried batches: {retries}",
        flush=True,
    )
    if not keep:
        setup.drop_schema()
    setup.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: NHDP settings)")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch-sizes", default="1000,5000,10000")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--subjects", type=int, default=100_000, help="distinct subjects (doses per subject ≈ doses/subjects)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the namespaces for inspection")
    ap.add_argument(
        "--read-clients",
        type=int,
        default=0,
        help="also run this many clients reading national_summary meanwhile, and report latency",
    )
    args = ap.parse_args()
    dsn = args.dsn
    if dsn is None:
        from infra.settings import get_settings

        dsn = get_settings().postgres_url
    for size in (int(s) for s in args.batch_sizes.split(",")):
        run(dsn, size, args.events, args.workers, args.subjects, args.keep, args.read_clients)


if __name__ == "__main__":
    main()

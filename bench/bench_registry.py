"""Lookups per second of an already-registered schema against a running registry.

    python bench/bench_registry.py --url http://127.0.0.1:8081 --seconds 10 [--threads 4]

Registers one schema under a fresh subject, then several threads of one client
process POST /subjects/{s} (the call every serializer makes) over keep-alive
connections for the given time. Prints live progress and a summary with
latency percentiles. The bench subject is deleted at the end (--keep to leave it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import uuid
from urllib.parse import quote, urlsplit

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

CT = {"Content-Type": "application/vnd.schemaregistry.v1+json"}

SCHEMA = {
    "type": "record",
    "name": "BenchDoseAdministered",
    "namespace": "vn.nhdp.bench",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "subject_id", "type": "string"},
        {"name": "site_id", "type": "string"},
        {
            "name": "vaccine",
            "type": {"type": "enum", "name": "Vaccine", "symbols": ["pfizer", "moderna", "astrazeneca"]},
        },
        {"name": "dose_number", "type": "int"},
        {"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "lot_number", "type": ["null", "string"], "default": None},
    ],
}


def httpx_worker(url, path, body, deadline, counts, lat, errors, i):
    with httpx.Client(base_url=url, timeout=10.0, headers=CT) as client:
        n, sample = 0, []
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = client.post(path, content=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            n += 1
            counts[i] = n
            if n % 10 == 0:  # sample latencies cheaply
                sample.append(time.perf_counter() - t0)
        lat.extend(sample)


def stdlib_worker(url, path, body, deadline, counts, lat, errors, i):
    # http.client costs the client a third of httpx's CPU per call, so the
    # figure measures the registry rather than the benchmark's own GIL.
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10.0)
    headers = {**CT, "Content-Length": str(len(body))}
    n, sample = 0, []
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                errors.append(f"{r.status} {data[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
        n += 1
        counts[i] = n
        if n % 10 == 0:
            sample.append(time.perf_counter() - t0)
    conn.close()
    lat.extend(sample)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8081")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument(
        "--client",
        choices=["stdlib", "httpx"],
        default="stdlib",
        help="HTTP client of the load threads (both keep connections alive)",
    )
    ap.add_argument("--keep", action="store_true", help="leave the bench subject registered")
    args = ap.parse_args(argv)
    console = Console()

    subject = f"bench-registry-{uuid.uuid4().hex[:12]}-value"
    body = json.dumps({"schema": json.dumps(SCHEMA)}).encode()
    with httpx.Client(base_url=args.url, timeout=30.0, headers=CT) as c:
        r = c.post(f"/subjects/{subject}/versions", content=body)
        if r.status_code != 200:
            console.print(f"[red]register failed: {r.status_code} {r.text}")
            return 1
        schema_id = r.json()["id"]
        for _ in range(20):  # warm the server's caches and the connection
            c.post(f"/subjects/{subject}", content=body).raise_for_status()
    console.print(
        f"registry {args.url}: subject {subject}, schema id {schema_id}; "
        f"{args.threads} {args.client} client threads for {args.seconds:.0f}s"
    )

    worker = stdlib_worker if args.client == "stdlib" else httpx_worker
    path = f"/subjects/{quote(subject, safe='')}"
    counts = [0] * args.threads
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + args.seconds
    threads = [
        threading.Thread(target=worker, args=(args.url, path, body, deadline, counts, lat, errors, i), daemon=True)
        for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    with Progress(
        TextColumn("lookups"),
        BarColumn(),
        TextColumn("{task.fields[done]:>8} done  {task.fields[rate]:>7.0f}/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("bench", total=args.seconds, done=0, rate=0.0)
        while any(t.is_alive() for t in threads):
            time.sleep(0.25)
            elapsed = time.perf_counter() - start
            done = sum(counts)
            progress.update(task, completed=min(elapsed, args.seconds), done=done, rate=done / max(elapsed, 1e-9))
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    total = sum(counts)

    if not args.keep:
        with httpx.Client(base_url=args.url, timeout=30.0) as c:
            c.delete(f"/subjects/{subject}")
            c.delete(f"/subjects/{subject}", params={"permanent": "true"})

    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    console.print(
        f"[bold]{total / elapsed:,.0f} lookups/s[/bold]  ({total:,} lookups in {elapsed:.1f}s, "
        f"{args.threads} {args.client} threads, {len(errors)} errors)  latency ms: p50 {pct(0.5):.2f}  "
        f"p99 {pct(0.99):.2f}  mean {statistics.fmean(lat) * 1000 if lat else float('nan'):.2f}"
    )
    if errors:
        console.print(f"[red]first error: {errors[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

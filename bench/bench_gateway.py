"""Gateway throughput and latency: `POST /v1/events` driven by a separate load process.

    .venv/bin/python bench/bench_gateway.py                   # the API named by the NHDP_* settings
    .venv/bin/python bench/bench_gateway.py --api-url http://127.0.0.1:8000
    .venv/bin/python bench/bench_gateway.py --own-stack       # a private stack: temp folder, free ports

Two phases, each a run of bench/load_gateway.py in its own process (so the load
generator's CPU is not the gateway's), on loopback:

1. max throughput: --connections keep-alive connections post requests of
   --batch (1,000) events back to back for --seconds; events/s accepted is the
   figure (target: 10,000/s);
2. latency: requests of --latency-batch (100) events paced at half the measured
   maximum, for --latency-seconds; p50/p99 from send to answer, and from the
   scheduled send (what a client sees if the gateway falls behind).

Every event is unique (fresh event_id), so it is accepted, not a duplicate; the
run reports any answered otherwise. With --own-stack the consumers of the log
(stream worker, ClickHouse sink) are stopped first (--keep-worker to keep them):
on a small machine they compete for the same cores, and this measures the
gateway. Against an existing stack the events land in its health.events like
any producer's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from bench_sdk import console, machine, own_stack
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.settings import Settings
from schemas.api_auth import issue_token

LOAD = Path(__file__).resolve().parent / "load_gateway.py"
TARGET = 10_000


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def server_process(url: str):
    """The local process listening on the API's port (psutil), or None."""
    from urllib.parse import urlsplit

    import psutil

    port = urlsplit(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except (psutil.Error, OSError):
        pass
    return None


def cpu_seconds(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_load(url: str, label: str, *args: str, seconds: float, warmup: float, token: str) -> dict:
    """Run one load process, showing its progress; returns its result object, with
    `server_cpu_us_per_event`: the API process's CPU time per accepted event over the
    measured window (None if the API is not a local process)."""
    server = server_process(url)
    first = last = None  # (cpu seconds, accepted) at the window's first and latest progress
    cmd = [sys.executable, str(LOAD), "--url", url, "--seconds", str(seconds), "--warmup", str(warmup), *args]
    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    result = None
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=warmup + seconds, info="starting the load process")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"NHDP_API_TOKEN": token}
        )
        try:
            for line in proc.stdout:
                msg = orjson.loads(line)
                if msg["kind"] == "progress":
                    if server is not None and not msg["warmup"]:
                        last = (cpu_seconds(server), msg["accepted"])
                        first = first or last
                    rate = msg["accepted"] / max(msg["elapsed"] - warmup, 1e-9) if not msg["warmup"] else 0
                    info = (
                        "warming up"
                        if msg["warmup"]
                        else f"{msg['accepted']:,} accepted, ~{rate:,.0f}/s, {msg['errors']} errors"
                    )
                    progress.update(task, completed=min(msg["elapsed"], warmup + seconds), info=info)
                else:
                    result = msg
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"load process failed ({proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}")
    result["server_cpu_us_per_event"] = (
        (last[0] - first[0]) / (last[1] - first[1]) * 1e6 if first and last and last[1] > first[1] else None
    )
    return result


def check(result: dict, label: str) -> None:
    problems = []
    if result["errors"]:
        problems.append(f"errors {result['errors']}")
    if result["duplicates"] or result["rejected"]:
        problems.append(f"{result['duplicates']} duplicates, {result['rejected']} rejected (all should be accepted)")
    if problems:
        console.print(f"[red]{label}: {'; '.join(problems)}[/]")


def bench(settings: Settings, args) -> int:
    url = args.api_url or settings.api_url
    # A producer for every province (NHDP_API_TOKEN if set, else one issued with this machine's key).
    token = os.environ.get("NHDP_API_TOKEN") or (
        issue_token(settings, "bench-gateway", "producer", ttl="2h", source="bench-load", provinces=["*"]).token
    )
    console.print(f"[bold]NHDP gateway benchmark[/]: {url}, load from a separate process")
    console.print(f"machine: {machine()}")

    mx = run_load(
        url,
        f"max: {args.batch:,}-event requests",
        "--mode",
        "max",
        "--batch",
        str(args.batch),
        "--connections",
        str(args.connections),
        seconds=args.seconds,
        warmup=args.warmup,
        token=token,
    )
    check(mx, "max")
    max_rate = mx["accepted"] / mx["seconds"]
    lat_ms = mx["latency_ms"]
    console.print(
        f"max throughput: [bold]{max_rate:,.0f} events/s[/] accepted "
        f"({mx['requests'] / mx['seconds']:.1f} requests/s of {args.batch:,}; "
        f"request p50 {percentile(lat_ms, 0.5):.0f} ms, p99 {percentile(lat_ms, 0.99):.0f} ms)"
    )
    cpu_us = mx["server_cpu_us_per_event"]
    if cpu_us:
        console.print(
            f"gateway process CPU: [bold]{cpu_us:.0f} µs per accepted event[/] "
            f"(all its threads), i.e. at most ~{1e6 / cpu_us:,.0f} events/s from one fully available core; "
            f"it got {max_rate * cpu_us / 1e6:.0%} of a core here"
        )

    paced_rate = args.paced_rate or max_rate / 2
    pc = run_load(
        url,
        f"paced: {args.latency_batch}-event requests",
        "--mode",
        "paced",
        "--rate",
        f"{paced_rate:.1f}",
        "--batch",
        str(args.latency_batch),
        "--connections",
        str(args.latency_connections),
        seconds=args.latency_seconds,
        warmup=args.warmup,
        token=token,
    )
    check(pc, "paced")
    achieved = pc["accepted"] / pc["seconds"]

    table = Table(title=f"POST /v1/events — {machine()}")
    table.add_column("phase")
    table.add_column("requests")
    table.add_column("events/s accepted", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("p99 ms from schedule", justify="right")
    table.add_row(
        f"max, {args.connections} connections",
        f"{args.batch:,} events",
        f"{max_rate:,.0f}",
        f"{percentile(mx['latency_ms'], 0.5):.1f}",
        f"{percentile(mx['latency_ms'], 0.99):.1f}",
        "",
    )
    table.add_row(
        f"paced at {paced_rate:,.0f}/s (half of max)",
        f"{args.latency_batch} events",
        f"{achieved:,.0f}",
        f"{percentile(pc['latency_ms'], 0.5):.1f}",
        f"{percentile(pc['latency_ms'], 0.99):.1f}",
        f"{percentile(pc['schedule_latency_ms'], 0.99):.1f}",
    )
    console.print(table)
    if pc["latency_ms"]:
        console.print(
            f"paced: {pc['requests']:,} requests, mean {statistics.fmean(pc['latency_ms']):.1f} ms, "
            f"max {max(pc['latency_ms']):.1f} ms; sends started up to {pc['behind_max_ms']:.0f} ms late"
        )
    ok = max_rate >= TARGET
    console.print(
        ("[green]" if ok else "[red]") + f"target {TARGET:,} events/s: {'met' if ok else 'NOT met'} "
        f"({max_rate:,.0f}/s)[/]"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api-url", help="the gateway (default: NHDP settings)")
    ap.add_argument("--own-stack", action="store_true", help="start a private stack in a temp folder on free ports")
    ap.add_argument("--keep-worker", action="store_true", help="with --own-stack: leave the worker (and sink) running")
    ap.add_argument("--seconds", type=float, default=30.0, help="max-throughput phase, measured part")
    ap.add_argument("--latency-seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--latency-connections", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--latency-batch", type=int, default=100)
    ap.add_argument("--paced-rate", type=float, help="latency phase: events/s (default: half the measured max)")
    args = ap.parse_args(argv)
    if args.own_stack:
        from nhdp import stack

        with own_stack() as settings:
            if not args.keep_worker:
                # The consumers of health.events (stream worker, ClickHouse sink where there is one)
                # would share the cores with the gateway; this measures the gateway.
                for factory in (getattr(stack, "worker_service", None), getattr(stack, "sink_service", None)):
                    if factory is not None and (svc := factory(settings)).stop():
                        console.print(f"{svc.name} stopped for the run (--keep-worker to keep it)")
            return bench(settings, args)
    return bench(Settings(), args)


if __name__ == "__main__":
    raise SystemExit(main())

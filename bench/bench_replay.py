"""Replay speed and memory: `nhdp replay --into NAME` over N events.

    .venv/bin/python bench/bench_replay.py                        # 1,000,000 events on a private stack
    .venv/bin/python bench/bench_replay.py --events 300000
    .venv/bin/python bench/bench_replay.py --settings-from-env    # replay the log of the stack named by NHDP_*

A private stack is loaded with --events events (the simulator's national mix,
encoded as the SDK does). The live worker and the ClickHouse sink are stopped
first, so the replay has the machine to itself. The replay is the real CLI in
a child process; it reports its own peak RSS (getrusage, the whole process:
Python, fastavro, kafka-python's buffers, the psycopg connection). Throughput
is the rebuild's own figure (from offset 0 to the end of the log, applied to
PostgreSQL) and the child's wall time including start-up. The figure for 10M
events is that throughput scaled linearly: memory does not grow with the log
(the replay holds one poll of ≤ 10,000 messages at a time).

Targets (issue 5): ≥ 20,000 events/s; peak RSS ≤ 1 GiB. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import bench_stack, encode, log_end, machine, preload, simulated, sink_service
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.settings import CHECKOUT

console = Console()
TARGET_RATE = 20_000
TARGET_RSS = 1 << 30

# The child: the real CLI, then its own peak RSS (ru_maxrss is in KiB on Linux).
CHILD = """
import json, resource, sys
from nhdp.cli import main
code = main(["replay", "--into", sys.argv[1]])
print("RUSAGE " + json.dumps({"code": code, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
REBUILT = re.compile(r"rebuilt (\S+) from ([\d,]+) events \(([\d,]+) to the DLQ\) in ([\d.]+)s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="events loaded into a private stack first")
    ap.add_argument("--name", default="bench", help="the replay namespace is replay_NAME (dropped afterwards)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--settings-from-env", action="store_true", help="replay the log of the stack named by NHDP_*")
    args = ap.parse_args(argv)

    console.print(f"[bold]bench_replay[/]: {machine()}")
    with bench_stack(args.settings_from_env, "replay") as settings:
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        with progress:
            if not args.settings_from_env:
                from nhdp.stack import worker_service

                worker_service(settings).stop()
                sink = sink_service(settings)
                if sink is not None:
                    sink.stop()
                for start in range(0, args.events, 250_000):  # in slices, to bound this process's memory
                    n = min(250_000, args.events - start)
                    events = simulated(n, seed=int(time.time()) % 1_000_000 + start)
                    preload(settings, encode(settings, events, progress), progress)
                    del events
            total = log_end(settings)
            task = progress.add_task(f"nhdp replay --into {args.name} (child process)", total=None)
            env = {k: v for k, v in os.environ.items() if not k.startswith("NHDP_")}
            env.update(settings.as_env())
            env["COLUMNS"] = "200"
            t0 = time.perf_counter()
            child = subprocess.run(
                [sys.executable, "-c", CHILD, args.name],
                cwd=CHECKOUT,
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            wall = time.perf_counter() - t0
            progress.update(task, total=1, completed=1)
        usage = next((json.loads(line[7:]) for line in child.stdout.splitlines() if line.startswith("RUSAGE ")), None)
        rebuilt = REBUILT.search(child.stdout)
        if child.returncode != 0 or usage is None or usage["code"] != 0 or rebuilt is None:
            console.print(child.stdout[-3000:], child.stderr[-3000:], markup=False)
            console.print("[red]the replay failed[/]")
            return 1
        import psycopg

        with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS replay_{args.name} CASCADE")

    events = int(rebuilt.group(2).replace(",", ""))
    seconds = float(rebuilt.group(4))
    rate = events / seconds
    rss = usage["maxrss"]
    table = Table(title=f"nhdp replay over {events:,} events ({machine()})")
    for col in ("events", "rebuild s", "events/s", "child wall s", "peak RSS", "10M events, scaled", "targets"):
        table.add_column(col, justify="right")
    ok_rate = "[green]met[/]" if rate >= TARGET_RATE else "[red]missed[/]"
    ok_rss = "[green]met[/]" if rss <= TARGET_RSS else "[red]missed[/]"
    table.add_row(
        f"{events:,}",
        f"{seconds:.1f}",
        f"{rate:,.0f}",
        f"{wall:.1f}",
        f"{rss / 2**20:,.0f} MiB",
        f"{10_000_000 / rate / 60:.1f} min, same RSS",
        f"≥ {TARGET_RATE:,}/s {ok_rate}; ≤ 1 GiB {ok_rss}",
    )
    console.print(table)
    console.print(
        f"log: {total:,} messages; DLQ during the replay: {rebuilt.group(3)}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

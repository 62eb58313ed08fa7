"""The dashboard in a real browser (issue 18): first render and live-update latency, under load.

    ./run bench dashboard                                  # 2,000 events/s of background load
    ./run bench dashboard --background-events 0            # the platform otherwise idle
    ./run bench dashboard --save bench/dashboard/with-load.json

Targets (issue 18): first render under 1.5 s, a live update under 2 s after the event's
acceptance, at 2,000 events/s of load.

1. a private stack exactly as `nhdp up` makes it (authentication on), seeded with a
   national campaign of --seed-events through the SDK, projected and in the analytics;
2. --background-events R: one bench/load_gateway.py process posts national-campaign
   events at R events/s in 1,000-event requests for the whole measurement;
3. first render, --loads times: a new browser context (empty cache: the page, its
   script, ECharts and the tiles are fetched again), the national token in the tab's
   sessionStorage as a signed-in user has it, then /dashboard. Measured in the browser:
   from navigation start to the moment every figure, the map, the ranking and both daily
   charts are drawn (`window.nhdp.firstRender`);
4. live update, --updates times on one open page: one dose is posted (a producer token)
   and its acceptance time taken when the 200 answer arrives; the log's end is read right
   after. The page records each live summary it draws with the log positions that summary
   reflects (NHDP-Positions). The update latency is from acceptance to the first drawing
   whose positions cover that end (so it includes the event; at most the few background
   events accepted in the same millisecond with it).

Chromium is Debian's (/usr/bin/chromium), driven by Playwright, as in the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
from bench_checkin import percentile
from bench_platform import Load, progress_bars
from rich.console import Console
from rich.table import Table

from infra.settings import get_settings
from nhdp import stack
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from schemas.api_auth import issue_token
from schemas.log import LogEnds
from schemas.topics import TOPIC_EVENTS

CHROMIUM = "/usr/bin/chromium"


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def seed(settings, events_n: int, bars) -> int:
    sim = simulate("national", days=max(1, events_n // 20_000), daily_doses=12_000)
    events = list(sim.events())[:events_n]
    task = bars.add_task("seeding (SDK)", total=len(events), info="")
    pseudonymiser = Pseudonymiser.from_settings(settings)
    with EventProducer(settings, source="bench-dashboard-seed") as producer:
        for i in range(0, len(events), 5000):
            producer.publish_json(events[i : i + 5000], pseudonymiser)
            bars.advance(task, len(events[i : i + 5000]))
    return len(events)


def wait_caught_up(client: httpx.Client, timeout_s: float = 600) -> None:
    """Until the live summaries and the analytics both reflect the whole log (the API's own headers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = client.get("/v1/national/summary").headers.get("NHDP-Lag")
        analytics = client.get("/v1/analytics/doses", params={"wait": 10})
        if live == "0" and analytics.status_code == 200:
            return
        time.sleep(0.5)
    raise SystemExit("the projections did not catch up")


def covers(positions_text: str, ends: dict[int, int]) -> bool:
    seen = {int(p): int(o) for p, o in (item.split(":") for item in positions_text.split(",") if item)}
    return all(seen.get(p, 0) >= end for p, end in ends.items())


def first_renders(browser, settings, token: str, n: int, bars) -> list[float]:
    task = bars.add_task("first render (new context each)", total=n, info="")
    out = []
    for _ in range(n):
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, timezone_id="Asia/Ho_Chi_Minh")
        context.add_init_script(f"sessionStorage.setItem('nhdp-token', {orjson.dumps(token).decode()})")
        page = context.new_page()
        page.goto(f"{settings.api_url}/dashboard")
        deadline = time.monotonic() + 60
        while (first := page.evaluate("window.nhdp && window.nhdp.firstRender")) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"no first render within 60 s: {page.text_content('[data-testid=error]')}")
            time.sleep(0.02)
        out.append(first / 1000)
        context.close()
        bars.advance(task)
    return out


def live_updates(browser, settings, token: str, producer: str, n: int, bars) -> list[float]:
    task = bars.add_task("live update after acceptance", total=n, info="")
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, timezone_id="Asia/Ho_Chi_Minh")
    context.add_init_script(f"sessionStorage.setItem('nhdp-token', {orjson.dumps(token).decode()})")
    page = context.new_page()
    page.goto(f"{settings.api_url}/dashboard")
    ends_of = LogEnds(settings)
    out = []
    headers = {"authorization": f"Bearer {producer}"}
    try:
        with httpx.Client(base_url=settings.api_url, timeout=60, headers=headers) as client:
            time.sleep(3)
            for i in range(n):
                event = {
                    "event_id": str(uuid.uuid4()),
                    "event_type": "DoseAdministered",
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "province_code": "79",
                    "source": "bench-dashboard",
                    "payload": {
                        "citizen_id": f"{79_099_000_000 + i:012d}",
                        "site_id": "79-760-0001",
                        "vaccine": "pfizer",
                        "lot_number": "FK0001",
                        "dose_number": 1,
                    },
                }
                answer = client.post("/v1/events", json=[event])
                accepted_ms = time.time() * 1000
                assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
                ends = {p: o for (_, p), o in ends_of((TOPIC_EVENTS,)).items()}
                deadline = time.monotonic() + 30
                while True:
                    seen = page.evaluate("window.nhdp.seen")
                    hit = next((s for s in seen if s["at"] >= accepted_ms and covers(s["positions"], ends)), None)
                    if hit is not None:
                        out.append((hit["at"] - accepted_ms) / 1000)
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit("the page did not show an accepted event within 30 s")
                    time.sleep(0.02)
                bars.advance(task)
                time.sleep(0.5 + (i % 7) / 10)  # arrive at every phase of the page's 1 s poll
    finally:
        ends_of.close()
        context.close()
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.50), 3),
        "p99": round(percentile(values, 0.99), 3),
        "all": [round(v, 3) for v in values],
        "max": round(max(values), 3),
    }


def bench(settings, args) -> dict:
    from playwright.sync_api import sync_playwright

    run: dict = {
        "started_utc": datetime.now(UTC).isoformat(),
        "machine_before": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    national = issue_token(settings, "bench-dashboard", "national", ttl="2h").token
    producer = issue_token(
        settings, "bench-dashboard-events", "producer", ttl="2h", source="bench-dashboard", provinces=["79"]
    ).token
    load_token = issue_token(
        settings, "bench-dashboard-load", "producer", ttl="2h", source="bench-load", provinces=["*"]
    ).token
    with progress_bars() as bars, httpx.Client(base_url=settings.api_url, timeout=60) as client:
        client.headers["authorization"] = f"Bearer {national}"
        if args.seed_events:
            run["seeded"] = seed(settings, args.seed_events, bars)
        wait_caught_up(client)
        background = None
        if args.background_events:
            seconds = str(args.loads * 4 + args.updates * 3 + 60)
            paced = ("--mode", "paced", "--rate", str(args.background_events), "--batch", "1000")
            background = Load.start(settings, load_token, *paced, "--connections", "4", "--seconds", seconds)
            background.go()
            time.sleep(5)  # the load reaches its rate
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            try:
                run["machine_during"] = machine()
                run["first_render_s"] = summary(first_renders(browser, settings, national, args.loads, bars))
                run["update_s"] = summary(live_updates(browser, settings, national, producer, args.updates, bars))
            finally:
                browser.close()
        if background is not None:
            run["background"] = {"offered": args.background_events, "accepted": background.accepted()}
            background.proc.terminate()
            background.proc.wait(30)
    run["machine_after"] = machine()
    return run


def report(run: dict, console: Console) -> None:
    table = Table(title="Dashboard in chromium (seconds)")
    for col in ("measure", "n", "p50", "p99", "max", "target"):
        table.add_column(col)
    for key, label, target in (("first_render_s", "first render", "< 1.5"), ("update_s", "live update", "< 2")):
        s = run[key]
        table.add_row(label, str(s["n"]), f"{s['p50']:.3f}", f"{s['p99']:.3f}", f"{s['max']:.3f}", target)
    console.print(table)
    bg = run.get("background")
    load = f"{bg['offered']:,} events/s offered, {bg['accepted']:,} accepted" if bg else "none"
    console.print(
        f"background load: {load}; "
        f"load average before {run['machine_before']['load_average']}, during "
        f"{run['machine_during']['load_average']}, after {run['machine_after']['load_average']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--existing", action="store_true", help="the stack of the NHDP_* settings, not a private one")
    ap.add_argument("--seed-events", type=int, default=100_000, help="a national campaign published first")
    ap.add_argument("--background-events", type=int, default=2000, help="events/s posted meanwhile (0: none)")
    ap.add_argument("--loads", type=int, default=20, help="first renders measured")
    ap.add_argument("--updates", type=int, default=30, help="live updates measured")
    ap.add_argument("--save", type=Path, help="write the run as JSON")
    args = ap.parse_args(argv)
    console = Console()
    if not Path(CHROMIUM).exists():
        raise SystemExit("chromium is not installed (Debian/Ubuntu: apt-get install -y chromium)")
    if args.existing:
        run = bench(get_settings(), args)
    else:
        console.print("starting a private stack (temporary folder, free ports; stopped and wiped afterwards)")
        with stack.private("bench-dashboard") as settings:
            run = bench(settings, args)
    report(run, console)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

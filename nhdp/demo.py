"""The main job: the HCMC June 2021 campaign through the whole platform.

Stack up → simulation published → wait until the projections hold every
event (consumer lag 0) → the API's figures beside the simulator's own
independent figures → one citizen's health-book QR, check-in by scan and
verified certificate (nhdp/demo_healthbook.py) → the API keeps serving until
Ctrl-C, which stops the stack.
"""

from __future__ import annotations

import signal
import threading
import time
from argparse import Namespace

import httpx
import orjson
import psycopg
from rich.console import Console
from rich.table import Table

from infra.settings import Settings
from nhdp import demo_healthbook, stack
from nhdp.publish import cmd_simulate
from projections.postgres.tracking import consumer_lag
from schemas.api_auth import issue_token
from schemas.figures import FIGURES

# the figures that fit a row: the keyed ones and full coverage are left out
SHOWN = tuple(f for f in FIGURES if f not in ("doses_by_number", "doses_by_vaccine", "full_coverage_pct"))


def wait_caught_up(settings: Settings, console: Console, timeout_s: float = 1800) -> float:
    started = time.monotonic()
    with psycopg.connect(settings.postgres_url) as conn, console.status("projections catching up…") as status:
        while True:
            lag, applied, dlq = consumer_lag(settings, conn)
            total = sum(lag.values())
            status.update(f"projections catching up: {applied:,} applied, lag {total:,}, DLQ {dlq:,}")
            if total == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"projections still {total:,} events behind after {timeout_s:.0f}s")
            time.sleep(0.5)


def _fmt(v) -> str:
    return f"{v:,.4f}" if isinstance(v, float) else f"{v:,}"


def compare_table(title: str, rows: list[tuple[str, dict, dict]]) -> tuple[Table, int]:
    table = Table(title=title)
    table.add_column("figure")
    for name, _, _ in rows:
        table.add_column(f"{name}: API", justify="right")
        table.add_column("expected", justify="right")
    mismatches = 0
    for figure in SHOWN:
        cells = []
        for _, got, want in rows:
            same = (
                abs(got[figure] - want[figure]) < 1e-4
                if isinstance(want[figure], float)
                else got[figure] == want[figure]
            )
            mismatches += not same
            cells += [f"[{'green' if same else 'red'}]{_fmt(got[figure])}[/]", _fmt(want[figure])]
        table.add_row(figure, *cells)
    return table, mismatches


def run(settings: Settings, console: Console, args: Namespace) -> int:
    sim_args = Namespace(
        scenario="hcmc-2021-06",
        seed=args.seed,
        scale=args.scale,
        days=1,
        daily_doses=0,
        via="sdk",
        batch=5000,
        out=None,
    )
    out = settings.data_dir / "simulations" / f"hcmc-2021-06-seed{args.seed}-x{args.scale:g}"
    # The figures are exact only if the log holds this simulation alone (re-runs
    # of the same one are duplicates, which count once); say so if it doesn't.
    marker = settings.data_dir / "demo-log.json"
    this_run = {"seed": args.seed, "scale": args.scale}
    previous = orjson.loads(marker.read_bytes()) if marker.exists() else None
    mixed = previous is not None and previous != this_run
    if not mixed and previous is None:
        with psycopg.connect(settings.postgres_url) as conn:
            try:
                mixed = consumer_lag(settings, conn)[1] > 0
            except psycopg.errors.UndefinedTable:
                mixed = False
    marker.write_bytes(orjson.dumps(previous if mixed else this_run))
    if cmd_simulate(sim_args) != 0:
        return 1
    took = wait_caught_up(settings, console)
    console.print(f"projections caught up {took:.1f}s after the last event was acknowledged")

    expected = orjson.loads((out / "expected.json").read_bytes())
    token = issue_token(settings, "demo", "national", ttl="1h").token
    api = httpx.Client(base_url=settings.api_url, timeout=30, headers={"authorization": f"Bearer {token}"})
    national = api.get("/v1/national/summary").json()
    provinces = sorted(api.get("/v1/provinces").json(), key=lambda p: -p["doses_administered"])[:3]
    rows = [("national", national, expected["national"])]
    rows += [(f"{p['province_code']} {p['name']}", p, expected["provinces"][p["province_code"]]) for p in provinces]
    table, mismatches = compare_table(
        "HCMC campaign, 19–25 June 2021: live projections vs the simulator's own count", rows
    )
    console.print(table)
    if mismatches and mixed:
        console.print(
            "[yellow]the log also holds events from other runs, so the live figures include them; "
            "`nhdp reset --yes` then `nhdp demo` compares this campaign alone[/]"
        )
    elif mismatches:
        console.print(f"[red]{mismatches} figure(s) differ from the simulator's independent computation[/]")
    else:
        console.print("[green]every figure equals the simulator's independent computation[/]")
    # The analytics store, asked to wait until it holds the whole log (read-your-writes), not slept for.
    answer = api.get("/v1/analytics/doses", params={"wait": 30})
    if answer.status_code == 200:
        analysed = sum(r["doses"] for r in answer.json()["rows"])
        agree = "[green]equals[/]" if analysed == national["doses_administered"] else "[red]differs from[/]"
        console.print(
            f"analytics (ClickHouse, positions {answer.headers.get('NHDP-Positions')}): {analysed:,} doses, "
            f"{agree} the live projections"
        )
    else:
        console.print(f"[yellow]analytics not ready: {answer.json().get('error')}[/]")

    certified = demo_healthbook.run(settings, console, sim_args.scenario, args.seed, args.scale)

    console.print(
        f"\nAPI serving at [bold]{settings.api_url}[/] (docs: {settings.api_url}/docs). Ctrl-C stops the stack."
        f"\nDashboard: [bold]{settings.api_url}/dashboard[/]; sign in with a token from "
        "`.venv/bin/nhdp token issue --role national` (a province: --role province --province 79)."
    )
    failed = (bool(mismatches) and not mixed) or not certified
    if args.no_wait:
        return 1 if failed else 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    stop.wait()
    console.print("\nstopping the stack…")

    stack.down(settings)
    return 1 if failed else 0

"""`nhdp simulate`: generate a campaign, write its expected figures, publish it (SDK or gateway)."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from rich.markup import escape

from infra.settings import get_settings
from nhdp.console import console, err, progress_bar
from producers.client import GatewayClient, Tally
from producers.pseudonym import Pseudonymiser
from producers.sdk import EventProducer
from producers.simulator import simulate
from schemas.api_auth import SourceTokens


def cmd_simulate(args) -> int:
    settings = get_settings()
    sim = simulate(args.scenario, seed=args.seed, scale=args.scale, days=args.days, daily_doses=args.daily_doses)
    out = Path(args.out or settings.data_dir / "simulations" / f"{args.scenario}-seed{args.seed}-x{args.scale:g}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "expected.json").write_bytes(orjson.dumps(sim.expected(), option=orjson.OPT_INDENT_2))
    total = sim.total_events
    published, started = 0, time.perf_counter()
    if args.via == "gateway":
        client, tally = GatewayClient(settings.api_url, SourceTokens(settings)), Tally()
        send = lambda batch: tally.add(client.post(batch, tally))  # noqa: E731
    else:
        producer = EventProducer(settings.as_service("producer"), source="simulator")
        pseudonymiser = Pseudonymiser.from_settings(settings)
        send = lambda batch: producer.publish_json(batch, pseudonymiser)  # noqa: E731
    with progress_bar() as progress:
        task = progress.add_task(f"{args.scenario} via {args.via}", total=total, rate="")
        for batch in sim.batches(args.batch):
            send(batch)
            published += len(batch)
            rate = published / (time.perf_counter() - started)
            progress.update(task, advance=len(batch), rate=f"{rate:,.0f} ev/s")
    elapsed = time.perf_counter() - started
    if args.via == "gateway":
        client.close()
        if tally.rejected:
            err.print(f"[red]{len(tally.rejected)} events rejected[/]; first: {escape(str(tally.rejected[0]))}")
            return 1
        console.print(f"gateway: {tally.accepted:,} accepted, {tally.duplicates:,} duplicates, {tally.retries} retries")
    else:
        producer.close()
    console.print(
        f"published {published:,} events in {elapsed:.1f}s ({published / max(elapsed, 1e-9):,.0f} events/s); "
        f"expected figures: {out / 'expected.json'}"
    )
    return 0

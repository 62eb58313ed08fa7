"""`nhdp`: the one command for the local stack and the platform's jobs.

Each command imports what it runs inside its own function: `nhdp status` must
not pay for importing Faust, uvicorn, chDB and the codec (seconds on a busy
machine) that only `worker`, `api`, `sink` or `replay` use.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
from pydantic import SecretStr
from rich.markup import escape
from rich.table import Table

from infra.process import ServiceError
from infra.settings import ConfigError, get_settings
from nhdp.console import console, err, progress_bar
from nhdp.healthbook_cli import add_parsers as add_healthbook_parsers
from nhdp.publish import cmd_simulate
from nhdp.tokens_cli import add_parsers as add_token_parsers
from schemas.log import log_end


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_up(args) -> int:
    from nhdp import stack

    settings = get_settings()
    if getattr(args, "cluster", False) and settings.kafka_nodes == 1:  # `demo` runs this too, without the option
        settings = stack.choose_cluster(settings)

    def on_ready(svc, pid, started):
        verb = "started" if started else "already running"
        console.print(f"[green]✓[/] {svc.name:<10} {verb:<16} pid {pid:<7} {svc.url or ''}")

    stack.up(settings, on_ready)
    console.print("\nEndpoints:")
    for name, url in stack.endpoints(settings).items():
        console.print(f"  {name:<10} {url}")
    return 0


def cmd_down(args) -> int:
    from nhdp import stack

    stopped = stack.down(get_settings())
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def cmd_status(args) -> int:
    from nhdp import stack

    settings = get_settings()
    rows = stack.status(settings)
    if args.json:
        sys.stdout.write(
            orjson.dumps(
                {"services": rows, "endpoints": stack.endpoints(settings)}, option=orjson.OPT_INDENT_2
            ).decode()
            + "\n"
        )
        return 0
    table = Table(title=f"NHDP local stack ({settings.data_dir})")
    for col in ("service", "state", "pid", "port", "restarts", "data", "url"):
        table.add_column(col)
    for r in rows:
        color = {"up": "green", "embedded": "green", "starting": "yellow"}.get(r["state"], "red")
        table.add_row(
            r["service"],
            f"[{color}]{r['state']}[/]",
            str(r["pid"] or "-"),
            str(r["port"] or "-"),
            "-" if r["restarts"] is None else str(r["restarts"]),  # None: not supervised
            _human(r["data_bytes"]),
            r["url"] or "",
        )
    console.print(table)
    # Why the supervisor last restarted each service (the whole record is in --json).
    for r in rows:
        if r["last_exit"]:
            console.print(f"  {r['service']}: last restart {_when(r['last_restart'])}, {escape(r['last_exit'])}")
    return 0


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def cmd_reset(args) -> int:
    from nhdp import stack

    settings = get_settings()
    if not args.yes:
        if not sys.stdin.isatty():
            err.print("reset: refusing to wipe data without confirmation; pass --yes")
            return 2
        answer = input(f"Wipe every local event, projection and table under {settings.data_dir}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            console.print("nothing wiped")
            return 1
    stack.reset(settings)
    console.print(f"wiped {settings.data_dir} (jar cache kept)")
    return 0


def cmd_demo(args) -> int:
    from nhdp import demo

    cmd_up(args)
    return demo.run(get_settings(), console, args)


def cmd_import(args) -> int:
    """Post a JSON-lines file through the gateway; every line ends accepted, duplicate or in the reject file."""
    import os
    from pathlib import Path

    from producers.client import GatewayClient, Tally
    from schemas.api_auth import SourceTokens

    settings = get_settings()
    src = Path(args.file)
    rejects_path = Path(args.rejects or f"{src}.rejects.jsonl")
    client, tally = GatewayClient(settings.api_url, SourceTokens(settings)), Tally()
    local_rejects: list[dict] = []
    lines = blank = 0
    with open(src, "rb") as f, progress_bar() as progress:
        task = progress.add_task(f"import {src.name}", total=os.path.getsize(src), rate="")
        batch: list = []
        line_of: list[int] = []

        def flush():
            if batch:
                answer = client.post(batch, tally)
                tally.accepted += answer["accepted"]
                tally.duplicates += answer["duplicates"]
                for r in answer["rejected"]:
                    tally.rejected.append({**r, "line": line_of[r["index"]]})
                batch.clear()
                line_of.clear()

        for lineno, raw in enumerate(f, 1):
            lines += 1
            progress.update(task, advance=len(raw))
            if not raw.strip():
                blank += 1
                continue
            try:
                batch.append(orjson.loads(raw))
                line_of.append(lineno)
            except orjson.JSONDecodeError as exc:
                local_rejects.append({"line": lineno, "errors": [f"line: not valid JSON: {exc}"]})
            if len(batch) >= args.batch:
                flush()
        flush()
    client.close()
    rejected = local_rejects + [
        {"line": r["line"], "event_id": r.get("event_id"), "errors": r["errors"]} for r in tally.rejected
    ]
    rejected.sort(key=lambda r: r["line"])
    with open(rejects_path, "wb") as out:
        for r in rejected:
            out.write(orjson.dumps(r) + b"\n")
    console.print(
        f"{lines:,} lines: {tally.accepted:,} accepted, {tally.duplicates:,} duplicates, "
        f"{len(rejected):,} rejected{f', {blank:,} blank' if blank else ''} (reasons in {rejects_path})"
    )
    return 1 if rejected else 0


def cmd_worker(args) -> int:
    from streams.worker import main as worker_main

    worker_main(args.rest)
    return 0


def cmd_api(args) -> int:
    import uvicorn

    from nhdp.app import create_app

    settings = get_settings()
    # Several processes share the port (uvicorn's workers: one listening socket, each process
    # accepts from it); each builds its own app from the same NHDP_* settings. Nothing an
    # answer depends on lives in one process: the gateway's dedup and every read are in the stores.
    several = settings.api_processes > 1
    # uvloop and httptools (both pinned): the event loop and HTTP parser in C, about
    # half the per-request CPU of asyncio + h11 on a core the API shares with Kafka.
    uvicorn.run(
        "nhdp.app:create_app_from_env" if several else create_app(settings),
        factory=several,
        workers=settings.api_processes if several else None,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
    return 0


def cmd_replay(args) -> int:
    from streams import replay
    from streams.sink import audit as analytics_sink

    settings = get_settings().as_service("replay")  # reads the log; may write nothing to Kafka
    if args.verify:
        diffs = replay.verify(settings, args.into, console)
        # ClickHouse rebuilt up to the same positions, against the live PostgreSQL projections.
        from psycopg_pool import ConnectionPool

        with ConnectionPool(settings.postgres_url, min_size=1, max_size=1, open=True) as pool:
            upto = replay.live_positions(pool)
        analytics_sink.rebuild(settings, args.into, upto=upto)
        diffs += analytics_sink.diff_replay(settings, args.into)
        for line in diffs:
            console.print(f"[red]differs[/] {escape(line)}")
        if diffs:
            console.print(f"[red]{len(diffs)} difference(s)[/] between the live projections and the replay")
            return 1
        console.print("[green]replay equals the live projections: 0 differences[/] (PostgreSQL and ClickHouse)")
        return 0
    ends = log_end(settings)
    upto = {p: end - 1 for p, end in ends.items()}  # one prefix of the log for both stores
    result = replay.rebuild(settings, args.into, upto=upto, console=console)
    console.print(
        f"rebuilt {result.namespace} from {result.events:,} events ({result.dlq:,} to the DLQ) in "
        f"{result.seconds:.1f}s, {result.events / max(result.seconds, 1e-9):,.0f} events/s"
    )
    ch = analytics_sink.rebuild(settings, args.into, upto=upto)
    console.print(
        f"rebuilt ClickHouse {ch.url} from {ch.events:,} events in {ch.seconds:.1f}s, "
        f"{ch.events / max(ch.seconds, 1e-9):,.0f} events/s"
    )
    return 0


def cmd_sink(args) -> int:
    from streams.sink.main import main as sink_main

    return sink_main(args.rest)


def cmd_verify_analytics(args) -> int:
    from projections.clickhouse.remote import AnalyticsUnavailable
    from projections.clickhouse.store import AnalyticsStoreError
    from streams.sink.audit import verify

    try:
        diffs, positions = verify(get_settings(), timeout_s=args.timeout)
    except (AnalyticsUnavailable, AnalyticsStoreError) as exc:
        err.print("[red]error:[/] cannot read the analytics store:", escape(str(exc)), highlight=False)
        return 2
    for line in diffs:
        console.print(f"[red]differs[/] {escape(line)}")
    if diffs:
        console.print(f"[red]{len(diffs)} difference(s)[/] between ClickHouse and the PostgreSQL projections")
        return 1
    console.print(
        f"[green]ClickHouse equals the PostgreSQL projections: 0 differences[/] "
        f"(every figure, 63 provinces and national, at {sum(positions.values()):,} messages)"
    )
    return 0


def _province(code: str) -> str | None:
    """province_CODE, or None after saying why the code is not one."""
    from schemas.principals import province_principal

    try:
        return province_principal(code)
    except ValueError as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False)
        return None


def cmd_province_grant(args) -> int:
    """Create or rotate province_CODE: a fresh password, READ on its own prefix only; prints its client configuration."""
    import secrets

    import psycopg

    from infra.kafka_access import AccessAdmin
    from schemas import principals
    from schemas.kafka_acls import province_grants, province_prefix
    from schemas.topics import province_topic

    settings = get_settings()
    name = _province(args.code)
    if name is None:
        return 2
    password = secrets.token_urlsafe(32)
    with AccessAdmin(settings) as access:
        access.set_passwords({name: password})
        access.set_grants(name, province_grants(args.code))
    # The same credential signs in to the schema registry (basic auth, argon2 hash only).
    with psycopg.connect(settings.postgres_url) as conn:
        principals.ensure(conn)
        principals.put(conn, name, principals.READER, password)
    client = settings.as_principal(name).model_copy(update={"principal_password": SecretStr(password)})
    config = {
        "kafka": client.librdkafka_config(),
        "registry": {"url": settings.registry_url, "basic.auth.user.info": f"{name}:{password}"},
        "topic": province_topic(args.code),
        "group_prefix": province_prefix(args.code),
    }
    # Printing the credential is the point of this command: it is shown once, stored nowhere in clear.
    if args.json:
        sys.stdout.write(orjson.dumps(config, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    console.print(f"[green]✓[/] {name} may read {config['topic']} (and groups named {config['group_prefix']}*)")
    console.print("\nKafka (librdkafka / confluent-kafka properties):", highlight=False)
    for key, value in config["kafka"].items():
        console.print(f"  {key}={value}", highlight=False, markup=False)
    console.print("Schema registry:", highlight=False)
    for key, value in config["registry"].items():
        console.print(f"  {key}={value}", highlight=False, markup=False)
    console.print("\nThe password is shown only now; `nhdp province grant` again rotates it.", highlight=False)
    return 0


def cmd_province_revoke(args) -> int:
    import psycopg

    from infra.kafka_access import AccessAdmin
    from schemas import principals

    settings = get_settings()
    name = _province(args.code)
    if name is None:
        return 2
    with AccessAdmin(settings) as access:
        had_credential = access.remove_password(name)
        acls = access.remove_grants(name)
    with psycopg.connect(settings.postgres_url) as conn:
        principals.ensure(conn)
        had_row = principals.remove(conn, name)
    if not (had_credential or acls or had_row):
        console.print(f"{name} had no access: nothing to revoke")
        return 0
    console.print(f"[green]✓[/] revoked {name}: its Kafka credential, {acls} ACL(s) and its registry login")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nhdp", description="NHDP national health-data platform")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start the local stack and its supervisor (idempotent)")
    u.add_argument(
        "--cluster",
        action="store_true",
        help="3 Kafka nodes (replication 3, min ISR 2) and, with clickhouse-server installed, 2 ClickHouse shards "
        "× 2 replicas with ZooKeeper; kept for this data folder until `nhdp reset`",
    )
    u.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop everything the project started, the supervisor first").set_defaults(fn=cmd_down)
    s = sub.add_parser("status", help="show each service and how often the supervisor restarted it")
    s.add_argument("--json", action="store_true", help="machine-readable, with every endpoint URL")
    s.set_defaults(fn=cmd_status)
    r = sub.add_parser("reset", help="wipe local data")
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    r.set_defaults(fn=cmd_reset)
    d = sub.add_parser("demo", help="stack up, the HCMC campaign through the platform, figures vs expected")
    d.add_argument("--scale", type=float, default=1.0, help="fraction of the campaign (1.0 = 804,000 doses)")
    d.add_argument("--seed", type=int, default=2021)
    d.add_argument("--no-wait", action="store_true", help="exit after the table instead of serving until Ctrl-C")
    d.set_defaults(fn=cmd_demo)
    sim = sub.add_parser("simulate", help="generate a campaign and publish it")
    sim.add_argument("--scenario", choices=["hcmc-2021-06", "national"], default="hcmc-2021-06")
    sim.add_argument("--seed", type=int, default=2021)
    sim.add_argument("--scale", type=float, default=1.0, help="fraction of the scenario's people and doses")
    sim.add_argument("--days", type=int, default=1, help="national: number of days")
    sim.add_argument("--daily-doses", type=int, default=1_400_000, help="national: doses per day")
    sim.add_argument("--via", choices=["sdk", "gateway"], default="sdk")
    sim.add_argument("--batch", type=int, default=5000)
    sim.add_argument("--out", help="folder for expected.json (default under the data folder)")
    sim.set_defaults(fn=cmd_simulate)
    imp = sub.add_parser("import", help="post a JSON-lines file through the gateway")
    imp.add_argument("file")
    imp.add_argument("--rejects", help="where to write rejected lines with reasons (default FILE.rejects.jsonl)")
    imp.add_argument("--batch", type=int, default=5000)
    imp.set_defaults(fn=cmd_import)
    rp = sub.add_parser("replay", help="rebuild the projections (PostgreSQL and ClickHouse) from offset 0 on their own")
    rp.add_argument(
        "--into", default="audit", help="name of the rebuild: PostgreSQL schema and ClickHouse database replay_NAME"
    )
    rp.add_argument("--verify", action="store_true", help="rebuild up to the live positions and list every difference")
    rp.set_defaults(fn=cmd_replay)
    sk = sub.add_parser("sink", help="run the ClickHouse sink in the foreground")
    sk.add_argument("rest", nargs=argparse.REMAINDER)
    sk.set_defaults(fn=cmd_sink)
    va = sub.add_parser("verify-analytics", help="compare every ClickHouse figure with the PostgreSQL projections")
    va.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for both to reach the same log position"
    )
    va.set_defaults(fn=cmd_verify_analytics)
    prov = sub.add_parser("province", help="a province's credential to read its own stream").add_subparsers(
        dest="action", required=True
    )
    pg = prov.add_parser("grant", help="create or rotate province_CODE and print its client configuration")
    pg.add_argument("code", help="two-digit province code, as in the reference data (e.g. 79)")
    pg.add_argument("--json", action="store_true", help="print the configuration as JSON (confluent-kafka ready)")
    pg.set_defaults(fn=cmd_province_grant)
    pr = prov.add_parser("revoke", help="delete province_CODE's credential, ACLs and registry login")
    pr.add_argument("code", help="two-digit province code")
    pr.set_defaults(fn=cmd_province_revoke)
    w = sub.add_parser("worker", help="run a stream worker (Faust) in the foreground")
    w.add_argument("rest", nargs=argparse.REMAINDER)
    w.set_defaults(fn=cmd_worker)
    api = sub.add_parser("api", help="run the gateway and query API in the foreground")
    api.add_argument("--nhdp-data", help=argparse.SUPPRESS)  # the process manager's marker
    api.set_defaults(fn=cmd_api)
    add_token_parsers(sub)
    add_healthbook_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ServiceError, ConfigError) as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`nhdp`: the one command for the local stack and the platform's jobs."""

from __future__ import annotations

import argparse
import sys

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.process import ServiceError
from nhdp.settings import ConfigError, get_settings

console = Console(stderr=False)
err = Console(stderr=True)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_up(args) -> int:
    from infra import stack

    settings = get_settings()

    def on_ready(svc, pid, started):
        verb = "started" if started else "already running"
        console.print(f"[green]✓[/] {svc.name:<10} {verb:<16} pid {pid:<7} {svc.url or ''}")

    stack.up(settings, on_ready)
    console.print("\nEndpoints:")
    for name, url in stack.endpoints(settings).items():
        console.print(f"  {name:<10} {url}")
    return 0


def cmd_down(args) -> int:
    from infra import stack

    stopped = stack.down(get_settings())
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def cmd_status(args) -> int:
    from infra import stack

    settings = get_settings()
    rows = stack.status(settings)
    if args.json:
        sys.stdout.write(
            orjson.dumps({"services": rows, "endpoints": stack.endpoints(settings)}, option=orjson.OPT_INDENT_2).decode()
            + "\n"
        )
        return 0
    table = Table(title=f"NHDP local stack ({settings.data_dir})")
    for col in ("service", "state", "pid", "port", "data", "url"):
        table.add_column(col)
    for r in rows:
        color = {"up": "green", "embedded": "green", "starting": "yellow"}.get(r["state"], "red")
        table.add_row(
            r["service"], f"[{color}]{r['state']}[/]", str(r["pid"] or "-"), str(r["port"] or "-"),
            _human(r["data_bytes"]), r["url"] or "",
        )
    console.print(table)
    return 0


def cmd_reset(args) -> int:
    from infra import stack

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
    return demo.run(get_settings(), console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nhdp", description="NHDP national health-data platform")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the local stack (idempotent)").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop everything the project started").set_defaults(fn=cmd_down)
    s = sub.add_parser("status", help="show each service")
    s.add_argument("--json", action="store_true", help="machine-readable, with every endpoint URL")
    s.set_defaults(fn=cmd_status)
    r = sub.add_parser("reset", help="wipe local data")
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    r.set_defaults(fn=cmd_reset)
    sub.add_parser("demo", help="stack up, then the demo").set_defaults(fn=cmd_demo)
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

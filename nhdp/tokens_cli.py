"""`nhdp token issue|revoke`: the API's bearer tokens, signed with this machine's key."""

from __future__ import annotations

import sys

import orjson
import psycopg
from pydantic import ValidationError
from rich.markup import escape

from infra.settings import get_settings
from nhdp.console import console, err
from schemas import tokens
from schemas.access import ROLES, ScopeError
from schemas.api_auth import issue_token


def cmd_issue(args) -> int:
    provinces = ["*"] if args.all_provinces else args.province
    scope = {}
    if args.role == "province":
        scope["province"] = provinces[0] if len(provinces) == 1 else None
        if len(provinces) != 1:
            err.print("[red]error:[/] a province token names exactly one province: --province CODE")
            return 2
    elif provinces:
        scope["provinces"] = provinces
    if args.source is not None:
        scope["source"] = args.source
    try:
        issued = issue_token(get_settings(), args.name or args.role, args.role, ttl=args.ttl, **scope)
    except (ScopeError, ValueError, ValidationError) as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False)
        return 2
    if args.json:
        sys.stdout.write(
            orjson.dumps(
                {"token": issued.token, "jti": issued.jti, "expires_at": issued.expires_at.isoformat()}
            ).decode()
            + "\n"
        )
    else:  # the token alone on stdout, so TOKEN=$(nhdp token issue …) works; the rest for the person
        sys.stdout.write(issued.token + "\n")
        err.print(f"token id (for revoke): {issued.jti}; expires {issued.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    return 0


def cmd_revoke(args) -> int:
    with psycopg.connect(get_settings().postgres_url, autocommit=True) as conn:
        tokens.ensure(conn)
        try:
            done = tokens.revoke(conn, args.jti)
        except ValueError as exc:
            err.print("[red]error:[/]", escape(str(exc)), highlight=False)
            return 2
    if not done:
        err.print(f"[red]error:[/] no unrevoked token {escape(args.jti)} was ever issued here")
        return 1
    console.print(f"revoked {args.jti}; every API process refuses it within a few seconds")
    return 0


def add_parsers(sub) -> None:
    tok = sub.add_parser("token", help="issue or revoke the API's bearer tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    i = tsub.add_parser("issue", help="print a new signed token")
    i.add_argument("--role", required=True, choices=list(ROLES))
    i.add_argument("--province", action="append", default=[], help="province: its code; producer, site: repeatable")
    i.add_argument("--all-provinces", action="store_true", help="producer, site: may write for every province")
    i.add_argument("--source", help="producer, site: the source its events must carry")
    i.add_argument("--name", help="who the token is for (default: the role)")
    i.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 30d (default 1h)")
    i.add_argument("--json", action="store_true", help='print {"token", "jti", "expires_at"}')
    i.set_defaults(fn=cmd_issue)
    r = tsub.add_parser("revoke", help="refuse a token before it expires")
    r.add_argument("jti", help="the token id that `nhdp token issue` printed")
    r.set_defaults(fn=cmd_revoke)

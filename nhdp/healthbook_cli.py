"""`nhdp keys rotate|list`, `nhdp trust-list save`, `nhdp verify-cert`: the signing keys and the offline verifier.

The verifier needs nothing of the platform but the two public lists: the
trust list (keys by kid) and the revocation list (UCI hashes). It takes them
from the API once (`nhdp trust-list save lists.json`), or live, and then
checks a certificate as any HCERT verifier app does: QR image → `HC1:` text →
Base45 → zlib → COSE_Sign1 signature with the kid's key → expiry → revocation.
"""

from __future__ import annotations

import base64
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from rich.markup import escape
from rich.table import Table

from infra.settings import get_settings
from nhdp.console import console, err
from schemas import hcert, qr
from schemas.cose_tokens import Refused
from schemas.signing_keys import PURPOSES, KeyRing, PublicKey


def _ring() -> KeyRing:
    settings = get_settings()
    return KeyRing(settings.postgres_url, settings.secrets)


def cmd_keys_rotate(args) -> int:
    ring = _ring()
    for purpose in PURPOSES if args.purpose == "all" else (args.purpose,):
        key = ring.rotate(purpose)
        console.print(
            f"{purpose}: new key {key.kid.hex()} (base64 {base64.b64encode(key.kid).decode()}), "
            f"valid until {key.not_after:%Y-%m-%d}; it signs from now on. Older keys stay in the trust list "
            "until their certificates expire."
        )
    return 0


def cmd_keys_list(args) -> int:
    ring = _ring()
    now = datetime.now(UTC)
    table = Table("purpose", "kid (hex)", "kid (base64)", "not after", "state")
    for purpose in PURPOSES:
        keys = ring.keys(purpose, refresh=True)
        for i, key in enumerate(keys):
            state = "expired" if key.not_after <= now else ("signing" if i == len(keys) - 1 else "verifying")
            table.add_row(
                purpose, key.kid.hex(), base64.b64encode(key.kid).decode(), f"{key.not_after:%Y-%m-%d}", state
            )
    console.print(table)
    return 0


def _get(api_url: str, path: str) -> dict:
    resp = httpx.get(api_url.rstrip("/") + path, timeout=30)
    resp.raise_for_status()
    return resp.json()


def cmd_trust_list_save(args) -> int:
    api = args.api or get_settings().api_url
    lists = {"trust_list": _get(api, "/v1/trust-list"), "revoked": _get(api, "/v1/certificates/revoked")}
    Path(args.out).write_bytes(orjson.dumps(lists, option=orjson.OPT_INDENT_2))
    console.print(
        f"{len(lists['trust_list']['keys'])} key(s) and {len(lists['revoked']['hashes'])} revoked certificate(s) "
        f"saved to {escape(args.out)}: `nhdp verify-cert … --lists {escape(args.out)}` checks offline"
    )
    return 0


def trusted_keys(trust_list: dict) -> dict[bytes, PublicKey]:
    """The keys of a served trust list, each kid recomputed from its certificate (a list cannot mislabel one)."""
    keys = [PublicKey.from_der(base64.b64decode(e["certificate"]), "hcert") for e in trust_list.get("keys", [])]
    return {key.kid: key for key in keys}


def certificate_text(source: str) -> str:
    """HC1 text from the argument itself, a text file, or an image of the QR code."""
    if source.startswith(hcert.PREFIX):
        return source
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source!r} is neither HC1: text nor a file")
    data = path.read_bytes()
    if data.lstrip().startswith(hcert.PREFIX.encode()):
        return data.decode().strip()
    texts = qr.read(data)
    if not texts:
        raise ValueError(f"no QR code found in {source}")
    return texts[0]


def cmd_verify_cert(args) -> int:
    try:
        text = certificate_text(args.certificate)
    except (ValueError, OSError) as exc:
        err.print("[red]error:[/]", escape(str(exc)), highlight=False)
        return 2
    if args.lists:
        lists = orjson.loads(Path(args.lists).read_bytes())
        trust, revoked = lists["trust_list"], lists["revoked"]
        source = f"lists saved in {args.lists}"
    else:
        api = args.api or get_settings().api_url
        try:
            trust, revoked = _get(api, "/v1/trust-list"), _get(api, "/v1/certificates/revoked")
        except httpx.HTTPError as exc:
            err.print(f"[red]error:[/] the trust list could not be fetched from {escape(api)}: {escape(str(exc))}")
            return 2
        source = f"lists fetched from {api}"
    keys = trusted_keys(trust)
    now = int(datetime.fromisoformat(args.now).timestamp()) if args.now else int(time.time())
    try:
        cert = hcert.verify(text, keys.get, now, frozenset(revoked.get("hashes", [])))
    except Refused as exc:
        if args.json:
            sys.stdout.write(orjson.dumps({"valid": False, "reason": exc.reason, "error": exc.message}).decode() + "\n")
        else:
            console.print(f"[bold red]NOT VALID[/] ({exc.reason}): {escape(exc.message)}")
        return 1
    v = cert.vaccination
    if args.json:
        answer = {"valid": True, "kid": base64.b64encode(cert.kid).decode(), "issuer": cert.issuer}
        answer |= {"issued_at": cert.issued_at, "expires_at": cert.expires_at, "dcc": cert.dcc, "lot": cert.lot}
        sys.stdout.write(orjson.dumps(answer).decode() + "\n")
        return 0
    name = cert.dcc["nam"]
    console.print(f"[bold green]VALID[/] certificate {escape(v['ci'])}, checked with {escape(source)}")
    console.print(f"  holder: {escape(name.get('fn', ''))} {escape(name.get('gn', ''))}, born {cert.dcc['dob']}")
    console.print(
        f"  dose {v['dn']}/{v['sd']} of {v['mp']} ({v['ma']}) on {v['dt']} in {v['co']}, lot {cert.lot or '-'}"
    )
    console.print(
        f"  issued by {escape(v['is'])} ({cert.issuer}); key {cert.kid.hex()}; expires "
        f"{datetime.fromtimestamp(cert.expires_at, UTC):%Y-%m-%d}"
    )
    return 0


def add_parsers(sub) -> None:
    keys = sub.add_parser("keys", help="the certificate and health-book signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    rot = keys.add_parser("rotate", help="a new signing key; older ones keep verifying until they expire")
    rot.add_argument("--purpose", choices=[*PURPOSES, "all"], default="all")
    rot.set_defaults(fn=cmd_keys_rotate)
    keys.add_parser("list", help="every key, which one signs").set_defaults(fn=cmd_keys_list)
    tl = sub.add_parser("trust-list", help="the public lists a verifier needs").add_subparsers(
        dest="trust_command", required=True
    )
    save = tl.add_parser("save", help="fetch the trust list and the revocation list once, into a file")
    save.add_argument("out", help="a JSON file for `nhdp verify-cert --lists`")
    save.add_argument("--api", help="the API's URL (default: the local stack's)")
    save.set_defaults(fn=cmd_trust_list_save)
    vc = sub.add_parser("verify-cert", help="verify a vaccination certificate (QR image or HC1: text); exit 0 if valid")
    vc.add_argument("certificate", help="a PNG/JPEG of the QR code, a file with the HC1: text, or the text itself")
    vc.add_argument("--lists", help="the lists saved by `nhdp trust-list save` (offline); default: fetch them")
    vc.add_argument("--api", help="the API's URL to fetch the lists from (default: the local stack's)")
    vc.add_argument("--now", help="verify as of this ISO time (default: now)")
    vc.add_argument("--json", action="store_true", help="print the verdict and the payload as JSON")
    vc.set_defaults(fn=cmd_verify_cert)

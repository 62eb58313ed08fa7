"""The health book at the edge: the citizen's QR, check-in by scan, vaccination certificates.

    POST /v1/health-book/qr         citizen app (health-book)  citizen_id → signed HB1: code + QR
    POST /v1/checkins               site (check-in)            scanned code → CheckedIn + what staff need
    POST /v1/certificates           citizen app (health-book)  citizen_id, name, birth date → signed HC1: certificate
    GET  /v1/certificates/revoked   anyone                     UCI hashes of revoked certificates
    GET  /v1/trust-list             anyone                     the certificate keys, by kid

National ids, names and birth dates stop here: the citizen_id becomes its
subject_id (producers.pseudonym) before anything else; a name and birth date
are put into the certificate being signed and nowhere else (not logged, not
stored, not in an error message). The reads go through
`app.state.health_records` (projections/health_records.py), composed by
nhdp.app, so this layer does not import the projections.
"""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from producers.gateway import RETRY_AFTER_S, Gateway, content_hash
from schemas import hcert, healthbook, qr
from schemas.access import Caller, Right
from schemas.api_auth import require
from schemas.bounds import now_ms, record_problem
from schemas.cose_tokens import Refused
from schemas.ids import is_uuid
from schemas.models import PROVINCE_CODES, Identifier
from schemas.signing_keys import KeyRing

CHECKINS = Counter("nhdp_checkins_total", "Scans at check-in, by outcome", ["outcome"])
CHECKIN_SECONDS = Histogram(
    "nhdp_checkin_seconds", "POST /v1/checkins latency", buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5)
)
CERTIFICATES = Counter("nhdp_certificates_total", "Certificate requests, by outcome", ["outcome"])

router = APIRouter(tags=["health book"])
CitizenApp = Annotated[Caller, Depends(require(Right.HEALTH_BOOK))]
Site = Annotated[Caller, Depends(require(Right.CHECK_IN))]
Format = Literal["json", "png", "svg"]


def _error(status: int, message: str, **extra: Any) -> ORJSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return ORJSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _keys(request: Request) -> KeyRing:
    return request.app.state.keyring


def _qr_answer(text: str, fmt: Format, body: dict[str, Any]) -> Response:
    if fmt == "png":
        return Response(qr.png(text), media_type="image/png")
    if fmt == "svg":
        return Response(qr.svg(text), media_type="image/svg+xml")
    about, png = qr.described_png(text)
    return ORJSONResponse(body | {"qr": about | {"png": base64.b64encode(png).decode()}})


# -- the citizen's code ---------------------------------------------------------------------------


class CitizenRequest(BaseModel):
    citizen_id: str = Field(description="the national id, 9 or 12 digits; turned into its subject_id here")


def _subject(request: Request, citizen_id: str) -> str:
    gateway: Gateway = request.app.state.gateway
    return gateway.pseudonymiser.subject_id(citizen_id)  # ValueError: a message without the id


@router.post(
    "/v1/health-book/qr",
    summary="The citizen's health-book QR code (citizen app)",
    description="A signed `HB1:` token naming the citizen's subject_id (never the national id), with its QR code: "
    "JSON with the token and a PNG (base64) by default; `format=png` or `svg` answers with the image alone.",
)
async def post_health_book_qr(
    request: Request, body: Annotated[CitizenRequest, Body()], _: CitizenApp, format: Format = "json"
):
    try:
        subject = _subject(request, body.citizen_id)
    except ValueError as exc:
        return _error(400, f"citizen_id: {exc}")

    def issue() -> Response:
        key, private = _keys(request).signer("healthbook", healthbook.TTL)
        text, token = healthbook.issue(subject, key, private)
        return _qr_answer(
            text,
            format,
            {
                "token": text,
                "subject_id": subject,
                "kid": key.kid.hex(),
                "issued_at": _iso(token.issued_at),
                "expires_at": _iso(token.expires_at),
            },
        )

    return await run_in_threadpool(issue)


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


# -- check-in by scan -----------------------------------------------------------------------------


class CheckInRequest(BaseModel):
    code: str = Field(max_length=4096, description="the scanned text of the health-book QR (HB1:…)")
    site_id: Identifier = Field(description="the site scanning it")
    province_code: str = Field(description="the site's province (2008 code); one of the token's provinces")
    event_id: str | None = Field(
        None, description="the CheckedIn's id, made by the scanner so that a retried scan counts once (default: new)"
    )


@router.post(
    "/v1/checkins",
    summary="Check a citizen in by scanning their health-book QR (site)",
    description="Verifies the code (signature, expiry), publishes `CheckedIn` (with the matching appointment) and "
    "answers with what staff need: the valid doses, the dose due, the appointment, serious adverse events. "
    "400 with `reason` for a bad code: prefix, base45, zlib, cose, unknown-key, signature, expired, claims.",
)
async def post_checkin(request: Request, body: Annotated[CheckInRequest, Body()], caller: Site):
    started = time.perf_counter()
    if body.province_code not in PROVINCE_CODES:
        return _error(400, f"province_code: {body.province_code!r} is not a 2008 province code")
    if body.event_id is not None and not is_uuid(body.event_id):
        return _error(400, "event_id: must be a UUID")
    problem = caller.event_problem("CheckedIn", caller.source or "", body.province_code)
    if problem:
        return _error(403, problem, missing_right=Right.WRITE_EVENTS.value)

    def scan() -> tuple[int, dict[str, Any]]:
        try:
            token = healthbook.verify(body.code, lambda kid: _keys(request).public("healthbook", kid), int(time.time()))
        except Refused as exc:
            CHECKINS.labels(f"refused:{exc.reason}").inc()
            return 400, {"error": exc.message, "reason": exc.reason}
        now = datetime.now(UTC)
        view = request.app.state.health_records.staff_view(token.subject_id, body.site_id, now)
        appointment = view["appointment"]
        record = {
            "event_id": (body.event_id or str(uuid.uuid4())).lower(),
            "event_type": "CheckedIn",
            "occurred_at": now_ms(),
            "province_code": body.province_code,
            "source": caller.source,
            "subject_id": token.subject_id,
            "trace_id": request.headers.get("x-trace-id"),
            "payload": {"site_id": body.site_id, "appointment_id": appointment and appointment["appointment_id"]},
        }
        problem = record_problem(record)
        if problem:
            return 400, {"error": problem}
        return _publish_checkin(request.app.state.gateway, record, caller, view)

    status, answer = await run_in_threadpool(scan)
    CHECKIN_SECONDS.observe(time.perf_counter() - started)
    if status != 200:
        return _error(status, answer.pop("error"), **answer)
    CHECKINS.labels("checked-in" if answer["checked_in"]["new"] else "duplicate").inc()
    return ORJSONResponse(answer)


def _publish_checkin(gateway: Gateway, record: dict, caller: Caller, view: dict) -> tuple[int, dict[str, Any]]:
    """Through the gateway's reservation, so a retried scan (same event_id) is published once."""
    h = content_hash({**record, "occurred_at": None, "trace_id": None})  # a retry is the same check-in, later
    accepted, duplicates, conflicts, failure = gateway.publish_checked([(0, record["event_id"], h, record)], caller)
    if failure is not None:
        return 503, {"error": f"Kafka did not acknowledge the check-in; retry after {RETRY_AFTER_S} s"}
    if conflicts:
        return 409, {"error": "; ".join(conflicts[0]["errors"])}
    checked_in = {
        "event_id": record["event_id"],
        "occurred_at": _iso(record["occurred_at"] // 1000),
        "site_id": record["payload"]["site_id"],
        "appointment_id": record["payload"]["appointment_id"],
        "new": bool(accepted),
    }
    return 200, {"checked_in": checked_in} | view


# -- certificates -----------------------------------------------------------------------------


class CertificateRequest(BaseModel):
    citizen_id: str = Field(description="the national id; turned into its subject_id here")
    family_name: str = Field(min_length=1, max_length=80, description="as in the citizen's papers (Nguyễn)")
    given_name: str = Field("", max_length=80, description="middle and given names (Văn An)")
    date_of_birth: str = Field(description="YYYY-MM-DD (or YYYY-MM, YYYY)")


@router.post(
    "/v1/certificates",
    summary="A signed EU DCC vaccination certificate for the citizen's latest valid dose (citizen app)",
    description="Waits until the projections have applied the log as it was on arrival (a dose voided a moment "
    "ago is never certified), then signs. The name and birth date are used only to sign: never logged or stored. "
    "404: no valid dose; 422: the dose's vaccine has no EU code; 503: the projections are behind, retry.",
)
async def post_certificate(
    request: Request, body: Annotated[CertificateRequest, Body()], _: CitizenApp, format: Format = "json"
):
    try:
        subject = _subject(request, body.citizen_id)
    except ValueError as exc:
        return _error(400, f"citizen_id: {exc}")
    problem = hcert.birth_date_problem(body.date_of_birth)
    if problem:
        return _error(400, problem)
    holder = hcert.Holder(body.family_name.strip(), body.given_name.strip(), body.date_of_birth)
    if not hcert.icao(holder.family_name):
        return _error(400, "family_name: has no letter that ICAO 9303 can write (A-Z after transliteration)")
    records = request.app.state.health_records

    def certify() -> Response:
        try:
            records.caught_up()
        except Exception as exc:  # BehindTheLog, or Kafka / PostgreSQL unreachable: try again shortly
            CERTIFICATES.labels("behind").inc()
            return _error(503, f"cannot be sure the record is current ({exc}); nothing was signed")
        record = records.record(subject)
        doses = record["doses"] if record else []
        if not doses:
            CERTIFICATES.labels("no-dose").inc()
            return _error(404, "no valid dose is recorded for this citizen; nothing to certify")
        ci = hcert.new_uvci()
        try:
            dcc = hcert.payload(holder, doses[-1], len(doses), ci)
        except Refused as exc:
            CERTIFICATES.labels("uncertifiable").inc()
            return _error(422, exc.message, reason=exc.reason)
        key, private = _keys(request).signer("hcert", hcert.TTL)
        text, iat, exp = hcert.sign(dcc, doses[-1]["lot_number"], key, private)
        records.record_certificate(ci, hcert.uci_hash(ci), subject, [d["event_id"] for d in doses], key.kid, iat, exp)
        CERTIFICATES.labels("issued").inc()
        return _qr_answer(
            text,
            format,
            {
                "certificate": text,
                "ci": ci,
                "kid": base64.b64encode(key.kid).decode(),
                "issued_at": _iso(iat),
                "expires_at": _iso(exp),
                "dose": doses[-1] | {"dn": dcc["v"][0]["dn"], "sd": dcc["v"][0]["sd"]},
            },
        )

    return await run_in_threadpool(certify)


@router.get(
    "/v1/certificates/revoked",
    summary="Revoked certificates, by UCI hash (public, as EU DCC revocation lists)",
    description="Every unexpired certificate resting on a dose that has since been voided: the first 16 bytes of "
    "SHA-256 of its `ci`, base64. Public: verifiers download it to check offline.",
)
async def get_revoked(request: Request):
    hashes = await run_in_threadpool(request.app.state.health_records.revoked)
    return {"hash_type": "UCI", "generated_at": _iso(int(time.time())), "hashes": hashes}


@router.get(
    "/v1/trust-list",
    summary="The certificate signing keys, by kid (public)",
    description="Every unexpired hcert key: kid (base64, 8 bytes), its DER certificate (base64) and validity. "
    "Older keys stay until their certificates expire, so certificates they signed still verify.",
)
async def get_trust_list(request: Request):
    keys = await run_in_threadpool(_keys(request).trust_list, "hcert")
    return {"country": hcert.COUNTRY, "keys": keys}

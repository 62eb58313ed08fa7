"""The demo's health-book part: one citizen of the campaign, from QR code to verified certificate.

The citizen app asks for the citizen's health-book QR (saved as a PNG); a site
scans it (the PNG read back with zxing-cpp, as a scanner would) and checks the
citizen in; the citizen app asks for the vaccination certificate (saved as a
PNG); `nhdp verify-cert` checks that PNG against the published trust list.
The name and birth date are the demo's own: the platform holds neither.
"""

from __future__ import annotations

import base64
import uuid
from argparse import Namespace

import httpx
from rich.console import Console

from infra.settings import Settings
from nhdp.healthbook_cli import cmd_verify_cert
from producers.simulator import simulate
from schemas import qr
from schemas.api_auth import issue_token

DEMO_NAME = {"family_name": "Nguyễn", "given_name": "Thị Minh Khai", "date_of_birth": "1985-04-30"}


def first_vaccinated(scenario: str, seed: int, scale: float) -> tuple[str, dict]:
    """(citizen_id, dose event) of the campaign's first dose of a certifiable vaccine: the simulation
    is made again from its seed (the platform itself never holds a national id)."""
    sim = simulate(scenario, seed=seed, scale=scale, days=1, daily_doses=0)
    for batch in sim.batches(5000):
        for event in batch:
            if event["event_type"] == "DoseAdministered" and event["payload"]["vaccine"] != "unknown":
                return event["payload"]["citizen_id"], event
    raise LookupError(f"the {scenario} simulation has no dose")


def run(settings: Settings, console: Console, scenario: str, seed: int, scale: float) -> bool:
    console.rule("the health book: one citizen's QR, check-in and certificate")
    citizen, dose = first_vaccinated(scenario, seed, scale)
    out = settings.data_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    app = issue_token(settings, "demo-citizen-app", "citizen_app", ttl="1h").token
    site_source, province = "demo-site", dose["province_code"]
    site = issue_token(settings, "demo-site", "site", ttl="1h", source=site_source, provinces=[province]).token
    with httpx.Client(base_url=settings.api_url, timeout=60) as api:
        as_app = {"authorization": f"Bearer {app}"}
        code = api.post("/v1/health-book/qr", json={"citizen_id": citizen}, headers=as_app)
        if code.status_code != 200:
            console.print(f"[red]health-book QR refused: {code.json()}[/]")
            return False
        qr_png = out / "health-book-qr.png"
        qr_png.write_bytes(base64.b64decode(code.json()["qr"]["png"]))
        console.print(
            f"health-book QR for subject {code.json()['subject_id'][:12]}…: {qr_png} "
            f"(version {code.json()['qr']['version']}, {code.json()['qr']['characters']} characters, no national id)"
        )

        scanned = qr.read(qr_png)[0]  # what a site's scanner reads off the citizen's phone
        check_in = {"code": scanned, "site_id": dose["payload"]["site_id"], "province_code": province}
        check_in["event_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"nhdp-demo-checkin-{citizen}-{seed}"))
        seen = api.post("/v1/checkins", json=check_in, headers={"authorization": f"Bearer {site}"})
        if seen.status_code != 200:
            console.print(f"[red]check-in refused: {seen.json()}[/]")
            return False
        staff = seen.json()
        console.print(
            f"scanned at site {check_in['site_id']}: CheckedIn {staff['checked_in']['event_id']}; "
            f"{staff['valid_doses']} valid dose(s), dose {staff['dose_due']} due, "
            f"{len(staff['serious_adverse_events'])} serious adverse event(s)"
        )

        cert = api.post("/v1/certificates", json={"citizen_id": citizen, **DEMO_NAME}, headers=as_app)
        if cert.status_code != 200:
            console.print(f"[red]certificate refused: {cert.json()}[/]")
            return False
        cert_png = out / "certificate.png"
        cert_png.write_bytes(base64.b64decode(cert.json()["qr"]["png"]))
        (out / "certificate.txt").write_text(cert.json()["certificate"] + "\n")
        console.print(f"certificate {cert.json()['ci']}: {cert_png} ({cert.json()['qr']['characters']} characters)")
    console.print(f"$ nhdp verify-cert {cert_png}")
    verdict = cmd_verify_cert(
        Namespace(certificate=str(cert_png), lists=None, api=settings.api_url, now=None, json=False)
    )
    return verdict == 0

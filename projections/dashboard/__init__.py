"""The national technology center's dashboard (DESIGN §5): one page the API serves at /dashboard.

No build step: an HTML page, its script and style, and a vendored ECharts
(static/vendor/README.md records versions and licences). The page and its static
files are public because they hold no figure. The page asks for an API token,
keeps it in the tab's sessionStorage (never in a URL or a cookie, so no CSRF),
and reads every figure through the API's own endpoints with it; a province's
token therefore sees exactly what the API lets it see. A Content-Security-Policy
allows scripts from this origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
# ECharts styles its tooltips through style attributes: 'unsafe-inline' for styles only, never scripts.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", headers=HEADERS)


def mount(app: FastAPI) -> None:
    """The page and its static files on `app`."""
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")

"""The dashboard (projections/dashboard) in a real browser: Debian's chromium driven by Playwright,
against the session stack. Figures are read off the page (each number's data-value) and compared
with the API's answers; nothing of the page is mocked.

Screenshots of the main views go to $NHDP_SCREENSHOTS (default .nhdp/screenshots in the checkout);
the README shows copies of them."""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from infra.settings import CHECKOUT
from schemas.reference import units
from tests.helpers import HCM, api, post, token, valid_event, wait_caught_up

pytestmark = pytest.mark.stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AXE = CHECKOUT / "tests" / "data" / "axe-core-4.14.1" / "axe.min.js"
SHOTS = Path(os.environ.get("NHDP_SCREENSHOTS", CHECKOUT / ".nhdp" / "screenshots"))
WAIT_MS = 30_000  # generous: on 2 busy cores a poll can wait for the CPU; the targets are measured in bench/
FIGURES = ["doses_administered", "people_vaccinated", "people_fully_vaccinated", "coverage_pct", "full_coverage_pct"]
FIGURES += ["population", "doses_allocated", "doses_remaining", "adverse_events", "serious_adverse_events"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (Debian/Ubuntu: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def seeded(stack_settings):
    """Doses in 79 (one serious adverse event) and in 74, at known times, projected."""
    day = datetime(2021, 8, 12, 8, 0, tzinfo=HCM)
    events = []
    for i, province in enumerate(["79", "79", "74", "79"]):
        dose = valid_event("DoseAdministered")
        dose["occurred_at"] = (day + timedelta(hours=i)).isoformat()
        dose["province_code"] = province
        events.append(dose)
    adverse = valid_event("AdverseEventReported", severity="serious", dose_event_id=events[0]["event_id"])
    adverse["payload"]["citizen_id"] = events[0]["payload"]["citizen_id"]
    adverse["occurred_at"] = (day + timedelta(hours=5)).isoformat()
    events.append(adverse)
    assert post(stack_settings, events).json()["accepted"] == len(events)
    wait_caught_up(stack_settings)
    return {"day": day, "events": events}


def open_dashboard(browser, settings, role: str = "national", hash_: str = "", **scope):
    context = browser.new_context(
        viewport={"width": 1400, "height": 1000}, timezone_id="Asia/Ho_Chi_Minh", accept_downloads=True
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{settings.api_url}/dashboard{hash_}")
    page.fill("[data-testid=token]", token(settings, role, **scope))
    page.click("[data-testid=sign-in]")
    until(page, "!!(document.body.dataset.rendered || document.getElementById('error').textContent)")
    page.errors = errors
    return page


@pytest.fixture
def page(browser, stack_settings, seeded) -> Iterator:
    page = open_dashboard(browser, stack_settings)
    yield page
    page.context.close()


def figures_on(page) -> dict:
    values = page.eval_on_selector_all("[data-figure]", "els => els.map(e => [e.dataset.figure, e.dataset.value])")
    return {k: float(v) if k.endswith("_pct") else int(v) for k, v in values}


def ranking_on(page) -> dict[str, dict[str, str]]:
    """The ranking table's rows in their order on the page, by code."""
    rows = page.eval_on_selector_all(
        "[data-testid=ranking] tbody tr",
        """rows => rows.map(r => [r.dataset.code,
             Object.fromEntries([...r.cells].map(c => [c.dataset.column, c.dataset.value]))])""",
    )
    return dict(rows)  # pairs, not a JS object: JS orders integer-like keys ("79") numerically


def until(page, expression: str, timeout_ms: float = WAIT_MS) -> None:
    """Until the JS expression is true in the page. Polled with evaluate, which runs as the
    debugger does: the page's CSP forbids the eval that Playwright's wait_for_function uses."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_ms / 1000:.0f} s: {expression}"
        time.sleep(0.05)


def wait_rendered_after(page, renders: int) -> None:
    until(page, f"window.nhdp.renders > {renders}")


def screenshot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def settled(page, settings, path: str, params: dict | None = None) -> dict:
    """The API's answer once the page has drawn a refresh that started after it (nothing is posted meanwhile)."""
    with api(settings) as client:
        answer = client.get(path, params=params or {}).json()
    wait_rendered_after(page, page.evaluate("window.nhdp.renders") + 1)  # one started after the answer
    return answer


# -- the page itself ----------------------------------------------------------------------------------------


def test_the_page_is_public_holds_no_figure_and_allows_scripts_from_itself_only(stack_settings):
    page = httpx.get(f"{stack_settings.api_url}/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    chart = httpx.get(f"{stack_settings.api_url}/dashboard/static/vendor/echarts-6.1.0/echarts.common.min.js")
    assert chart.status_code == 200 and len(chart.content) > 100_000
    # every figure comes through the token-checked API: without one, none
    assert httpx.get(f"{stack_settings.api_url}/v1/national/summary").status_code == 401


def test_a_refused_token_stays_on_the_sign_in_form(browser, stack_settings):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{stack_settings.api_url}/dashboard")
    page.fill("[data-testid=token]", "not-a-token")
    page.click("[data-testid=sign-in]")
    page.wait_for_selector("#signin-error:not(:empty)", timeout=WAIT_MS)
    assert page.is_visible("#signin") and not page.is_visible("#board")
    assert page.evaluate("sessionStorage.getItem('nhdp-token')") is None
    context.close()


# -- national: figures, live, time travel, 2025 -------------------------------------------------------------


def test_national_figures_on_the_page_equal_the_api(page, stack_settings):
    national = settled(page, stack_settings, "/v1/national/summary")
    assert figures_on(page) == {f: national[f] for f in FIGURES}
    provinces = {p["province_code"]: p for p in settled(page, stack_settings, "/v1/provinces")}
    rows = ranking_on(page)
    assert len(rows) == 63 and page.locator("[data-testid=tiles] .tile").count() == 63
    for code, row in rows.items():
        assert int(row["people_vaccinated"]) == provinces[code]["people_vaccinated"], code
        assert float(row["coverage_pct"]) == provinces[code]["coverage_pct"], code
        assert int(row["serious_adverse_events"]) == provinces[code]["serious_adverse_events"], code
    ranks = [int(r["rank"]) for r in rows.values()]
    assert ranks[0] == 1 and ranks == sorted(ranks)
    assert page.locator("td.alert[data-column=serious_adverse_events]").count() == sum(
        1 for p in provinces.values() if p["serious_adverse_events"] > 0
    )
    assert page.get_attribute("[data-testid=freshness]", "data-lag").isdigit()  # how far behind the log, shown
    assert "PostgreSQL" in page.text_content("[data-testid=freshness]")
    screenshot(page, "national")
    assert page.errors == []


def test_new_events_appear_without_a_reload(page, stack_settings):
    page.evaluate("window.sameDocument = true")
    before = figures_on(page)["doses_administered"]
    dose = valid_event("DoseAdministered")
    assert post(stack_settings, [dose]).json()["accepted"] == 1
    until(page, f"Number(document.querySelector('[data-figure=doses_administered]').dataset.value) >= {before + 1}")
    assert page.evaluate("window.sameDocument") is True  # the same document: no reload happened
    change = page.evaluate("window.nhdp.changes.find(c => c.figure === 'doses_administered')")
    assert change is not None and change["value"] >= before + 1


def test_the_time_control_shows_the_page_as_of_that_moment(page, stack_settings, seeded):
    as_of = seeded["day"] + timedelta(hours=1, minutes=30)  # after the first two doses, before the rest
    renders = page.evaluate("window.nhdp.renders")
    page.fill("[data-testid=as-of]", as_of.strftime("%Y-%m-%dT%H:%M:%S"))
    page.dispatch_event("[data-testid=as-of]", "change")
    wait_rendered_after(page, renders)
    assert page.is_visible("[data-testid=as-of-banner]")
    iso = as_of.astimezone().isoformat()
    with api(stack_settings) as client:
        want = client.get("/v1/national/summary", params={"as_of": iso, "wait": 30}).json()
        live = client.get("/v1/national/summary").json()
        hcm = client.get("/v1/provinces/79/summary", params={"as_of": iso}).json()
    assert figures_on(page) == {f: want[f] for f in FIGURES}
    assert want["doses_administered"] < live["doses_administered"]  # it is not the live page
    assert int(ranking_on(page)["79"]["doses_administered"]) == hcm["doses_administered"]
    assert "as_of=" in page.url
    screenshot(page, "as-of")
    # back to live
    renders = page.evaluate("window.nhdp.renders")
    page.click("[data-testid=live]")
    wait_rendered_after(page, renders)
    assert not page.is_visible("[data-testid=as-of-banner]")
    assert figures_on(page)["doses_administered"] >= live["doses_administered"]


def test_the_2025_switch_shows_34_units_that_add_up_to_the_nation(page, stack_settings):
    renders = page.evaluate("window.nhdp.renders")
    page.select_option("[data-testid=scheme]", "2025")
    wait_rendered_after(page, renders)
    national = settled(page, stack_settings, "/v1/national/summary")
    rows = ranking_on(page)
    assert sorted(rows) == sorted(units("2025")) and page.locator("[data-testid=tiles] .tile").count() == 34
    for figure in ("doses_administered", "people_vaccinated", "people_fully_vaccinated", "population"):
        assert sum(int(r[figure]) for r in rows.values()) == national[figure], figure
    with api(stack_settings) as client:
        hcm = client.get("/v1/provinces/79/summary", params={"scheme": "2025"}).json()
    assert int(rows["79"]["people_vaccinated"]) == hcm["people_vaccinated"]
    assert rows["79"]["name"] == "Thành phố Hồ Chí Minh"
    assert "scheme=2025" in page.url
    screenshot(page, "scheme-2025")
    assert page.errors == []


def test_a_tile_opens_its_province(page, stack_settings):
    renders = page.evaluate("window.nhdp.renders")
    page.click("[data-testid=tiles] .tile[data-code='79']")
    wait_rendered_after(page, renders)
    assert "(79)" in page.text_content("[data-testid=scope]") and "province=79" in page.url
    hcm = settled(page, stack_settings, "/v1/provinces/79/summary")
    assert figures_on(page) == {f: hcm[f] for f in FIGURES}
    assert page.locator("[data-figure=serious_adverse_events]").text_content() != "0"
    assert page.is_visible(".kpi.serious.alert")  # a serious adverse event is highlighted
    screenshot(page, "province-79")
    page.click("[data-testid=back]")
    until(page, "!location.hash.includes('province')")


# -- a province's token ----------------------------------------------------------------------------------------


def test_a_province_sees_only_its_own_province(browser, stack_settings, seeded):
    page = open_dashboard(browser, stack_settings, "province", hash_="#province=01&scheme=2025", province="79")
    try:
        hcm = settled(page, stack_settings, "/v1/provinces/79/summary")
        assert "(79)" in page.text_content("[data-testid=scope]")
        assert figures_on(page) == {f: hcm[f] for f in FIGURES}
        assert not page.is_visible("#provinces")  # no map or ranking of other provinces
        assert page.is_disabled("[data-testid=scheme]")
        assert page.text_content("[data-testid=error]") == ""  # it asked only for what it may read
        daily = page.eval_on_selector_all("[data-testid=daily-table] tbody tr", "rs => rs.length")
        with api(stack_settings, "province", province="79") as client:
            mine = client.get("/v1/analytics/doses", params={"group_by": "day,vaccine"}).json()["rows"]
        assert daily == len(mine)
        screenshot(page, "province-token")
        assert page.errors == []
    finally:
        page.context.close()


# -- CSV, language, accessibility --------------------------------------------------------------------------------


def test_the_ranking_downloads_as_csv_with_the_tables_figures(page):
    with page.expect_download() as download:
        page.click("[data-testid=csv-ranking]")
    text = Path(download.value.path()).read_bytes().decode("utf-8")
    assert text.startswith("\ufeff") and download.value.suggested_filename.endswith(".csv")
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    on_page = ranking_on(page)
    assert len(rows) == 1 + len(on_page) == 64
    by_code = {r[1]: r for r in rows[1:]}
    for code, cells in on_page.items():
        assert by_code[code][2] == cells["name"] and by_code[code][4] == cells["people_vaccinated"]


def test_the_language_switch(page):
    assert page.get_attribute("html", "lang") == "vi"
    names = [r["name"] for r in ranking_on(page).values()]
    page.click("[data-testid=lang]")
    until(page, "document.documentElement.lang === 'en'")
    assert page.text_content("#progress-h") == "Progress"
    wait_rendered_after(page, page.evaluate("window.nhdp.renders"))
    assert [r["name"] for r in ranking_on(page).values()] == names  # names as in the reference data
    page.click("[data-testid=lang]")
    until(page, "document.documentElement.lang === 'vi'")


def test_no_critical_accessibility_violations(page):
    page.evaluate(AXE.read_text() + "\n;true")  # as the debugger would: the page's CSP refuses a script tag
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    found = [(v["id"], v["impact"], len(v["nodes"])) for v in result["violations"]]
    print("\naxe-core violations:", found)
    assert [v for v in found if v[1] == "critical"] == []


def test_an_unknown_province_in_the_address_is_a_clear_error(browser, stack_settings):
    page = open_dashboard(browser, stack_settings, hash_=f"#province=x{uuid.uuid4().hex[:4]}")
    try:
        page.wait_for_selector("[data-testid=error]:not(:empty)", timeout=WAIT_MS)
        assert "unknown province code" in page.text_content("[data-testid=error]")
    finally:
        page.context.close()

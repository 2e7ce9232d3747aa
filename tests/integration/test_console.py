"""The operator's console in a real headless Chromium (Debian's, driven by Playwright): it
loads with no console error and no request to another origin, shows an event made
during the test, draws the lag chart, a retry clicked on a parked dead letter empties
it, and a rebuild started there swaps a new version in, which a rollback undoes. The
screenshot is kept in `TEST_ARTIFACTS` (default `test-artifacts/`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import ConsoleMessage, Dialog, Request, async_playwright, expect

from projections.db import create_pool
from shared_kernel.settings import Settings
from tests.auth import api_client, token
from tests.integration.harness import WriteSide, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

BROWSER = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))
HAVE_BROWSER = Path(BROWSER).exists()


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("console"))
    await ws.start_serving()
    ws.start_projectors("incidents")
    await ws.wait_until_projected()
    yield ws
    ws.stop()


async def test_the_console_shows_events_lag_and_dead_letters_live_and_a_retry_empties_one(
    side: WriteSide,
) -> None:
    assert HAVE_BROWSER, "Debian's chromium: `python3 infra/stack.py up` installs it"
    origin = side.api_url.rstrip("/")
    errors: list[str] = []
    elsewhere: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    def on_request(request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and f"{parts.scheme}://{parts.netloc}" != origin:
            elsewhere.append(request.url)

    # the page and its assets are public (no data in them), with a policy of this origin only
    async with httpx.AsyncClient(base_url=side.api_url, timeout=30) as anonymous:
        page_answer = await anonymous.get("/console")
        assert page_answer.status_code == 200
        assert "default-src 'none'" in page_answer.headers["content-security-policy"]
        assert 'content="datasets,incidents,webhooks"' in page_answer.text
        assert (await anonymous.get("/console/assets/console.js")).status_code == 200
        assert (await anonymous.get("/console/assets/other.js")).status_code in (401, 404, 422)
        assert (await anonymous.get("/api/v1/admin/processor")).status_code == 401

    pool = await create_pool(side.settings)
    async with async_playwright() as playwright, api_client(base_url=side.api_url, timeout=30) as client:
        browser = await playwright.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("request", on_request)
            await page.goto(f"{origin}/console#token={token()}")
            await expect(page.locator("#events-state")).to_have_text("live", timeout=30_000)
            assert "#token=" not in page.url  # the token leaves the address bar

            # an event made now appears in the live table
            r = await client.post("/api/v1/incidents", json={"title": "seen by the console"})
            assert r.status_code == 201, r.text
            opened = r.json()["id"]
            row = page.locator(f'#event-table tr[data-aggregate="{opened}"]')
            await row.wait_for(timeout=30_000)
            assert await row.get_attribute("data-type") == "incidents.IncidentOpened"

            # the lag chart: a line per projection, growing with every sample
            line = page.locator('#lag-events polyline[data-projection="incidents"]')
            await line.wait_for(state="attached", timeout=15_000)

            async def samples() -> int:
                return len((await line.get_attribute("points") or "").split())

            first = await samples()

            async def moved() -> int | None:
                n = await samples()
                return n if n > first else None

            await until(moved, 15, "the lag chart taking another sample")
            assert await page.locator('#projection-table tr[data-projection="incidents"]').count() == 1
            await page.locator("#partition-grid .partition").first.wait_for(timeout=15_000)

            # a poison event parks its incident; after the fix, Retry in the console empties it
            await pool.execute(
                "ALTER TABLE incidents_v1 ADD CONSTRAINT test_console CHECK (title NOT LIKE 'poison%')"
            )
            try:
                r = await client.post("/api/v1/incidents", json={"title": "poison for the console"})
                assert r.status_code == 201, r.text
                poisoned = r.json()["id"]
                r = await client.post(f"/api/v1/incidents/{poisoned}/assign", json={"assignee": "dora"})
                assert r.status_code == 200, r.text
                dead = page.locator(f'#dead-table tr[data-key="{poisoned}"]')
                await dead.locator("td.state-parked").wait_for(timeout=60_000)
            finally:
                await pool.execute("ALTER TABLE incidents_v1 DROP CONSTRAINT IF EXISTS test_console")
            await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            await dead.locator("button.retry").click()
            await dead.wait_for(state="detached", timeout=30_000)

            async def assigned() -> str | None:
                r = await client.get(f"/api/v1/incidents/{poisoned}")
                return str(r.json()["assignee"]) if r.status_code == 200 else None

            assert await until(assigned, 30, "the retried incident readable") == "dora"
            actions = page.locator("#actions li", has_text="tester retry incidents")
            await actions.first.wait_for(timeout=15_000)

            # a rebuild started from the console runs to the swap; a rollback brings v1 back
            async def confirm(dialog: Dialog) -> None:
                await dialog.accept()

            page.on("dialog", confirm)
            incidents = page.locator('#projection-table tr[data-projection="incidents"]')
            await incidents.locator("button.rebuild").click()
            await expect(incidents.locator("td").nth(1)).to_have_text("v2", timeout=120_000)
            await incidents.locator("button.rollback").click()
            await expect(incidents.locator("td").nth(1)).to_have_text("v1", timeout=30_000)

            assert errors == []
            assert elsewhere == []
        finally:
            await browser.close()
            await pool.close()

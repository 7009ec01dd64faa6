"""The dashboard in a real headless Chromium, over the example system as real processes.

A coordinator, the four services, RabbitMQ and PostgreSQL (``services.stack``),
and ``sagaflow dashboard`` as a process of its own. Debian's ``chromium``
(``scripts/ensure-chromium.sh``, run by ``make test``) is driven by Playwright;
no browser is downloaded. The operator:

1. finds a compensated saga by its order id, opens it and sees the
   compensations on the timeline in reverse order of the steps;
2. signs in, retries a FAILED saga with a reason and watches it reach
   COMPENSATED without reloading the page;
3. replays a dead-lettered reply from the dead-letter page; its saga,
   stuck until then, completes.

Screenshots of the list, a saga and the dead-letter page are saved in the
test's directory, and in ``$SAGAFLOW_SCREENSHOTS`` when set (docs/images/ holds
the current ones: ``SAGAFLOW_SCREENSHOTS=docs/images pytest tests/e2e/test_dashboard_browser.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from sagaflow import SagaClient, SagaStatus
from sagaflow.store import PostgresSagaStore
from services.stack import ROOT, Stack, free_port
from tests.faults import sagas
from tests.faults.harness import injecting
from tests.faults.injection import POISON_ENV
from tests.faults.workload import DirectPlacer, PlannedOrder

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHROMIUM = os.environ.get("SAGAFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-0123456789"
SAGA_SPECS = (
    "services.order.saga:SAGAS",
    "tests.faults.sagas:quick",
    "tests.faults.sagas:patient",
)
STUCK = "dlq-1"  # the order whose first reply the coordinator dead-letters
REJECT_UPDATES = """
CREATE FUNCTION inventory.reject_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'fault injection: inventory.reservations rejects updates'; END $$;
CREATE TRIGGER reject_updates BEFORE UPDATE ON inventory.reservations
FOR EACH ROW EXECUTE FUNCTION inventory.reject_updates();
"""
ACCEPT_UPDATES = """
DROP TRIGGER reject_updates ON inventory.reservations;
DROP FUNCTION inventory.reject_updates();
"""


def _order(order_id: str, customer: str) -> PlannedOrder:
    body = {
        "order_id": order_id,
        "customer_id": customer,
        "sku": "sku-widget",
        "quantity": 1,
        "amount": 1000,
        "destination": "US",
    }
    return PlannedOrder(kind="test", body=body)


@contextlib.asynccontextmanager
async def dashboard_process(stack: Stack, log_dir: Path) -> AsyncIterator[str]:
    """``sagaflow dashboard`` as a process; yields its base URL."""
    port = free_port()
    env = {
        **stack.env,
        "SAGAFLOW_DASHBOARD_TOKEN": TOKEN,
        "SAGAFLOW_DASHBOARD_REFRESH": "1",
        "SAGAFLOW_JAEGER_URL": "http://jaeger.example:16686",
    }
    argv = [sys.executable, "-m", "sagaflow", "dashboard", "--port", str(port)]
    for spec in SAGA_SPECS:
        argv += ["-m", spec]
    log_path = log_dir / "dashboard.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as http:
                deadline = time.monotonic() + 30
                while True:
                    assert process.returncode is None, log_path.read_text()
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(f"{url}/health")).status_code == 200:
                            break
                    assert time.monotonic() < deadline, log_path.read_text()
                    await asyncio.sleep(0.2)
            yield url
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _status(store: PostgresSagaStore, saga_id: str) -> SagaStatus | None:
    state = await store.get(saga_id)
    return None if state is None else state.status


async def _wait_for_dead_letter(url: str, saga_id: str) -> None:
    """Until the dashboard's dead-letter page lists a letter of ``saga_id``."""
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + 60
        while saga_id not in (await http.get(f"{url}/dead-letters")).text:
            assert time.monotonic() < deadline, "the poisoned reply was not dead-lettered"
            await asyncio.sleep(0.5)


def _keep(shot: Path) -> None:
    target = os.environ.get("SAGAFLOW_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


@pytest.fixture
def chromium() -> str:
    """Debian's chromium; missing is a failure, not a skip (CI installs it)."""
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (make test does)"
    )
    return CHROMIUM


async def test_an_operator_finds_retries_and_replays_in_a_real_browser(
    amqp_url: str, pg_url: str, tmp_path: Path, chromium: str
) -> None:
    from playwright.async_api import async_playwright, expect

    logs = tmp_path / "logs"
    stack = Stack(
        amqp_url,
        pg_url,
        log_dir=logs,
        sagas=SAGA_SPECS,
        # the coordinator dead-letters the first reply of one saga (a bug in a hook)
        launchers=injecting("coordinator"),
        process_env={"coordinator": {POISON_ENV: f"order-{STUCK}"}},
    )
    async with stack:
        store = PostgresSagaStore(pg_url, min_size=1, max_size=2)
        await store.start()
        quick = DirectPlacer(pg_url, SagaClient([sagas.quick], store=store), sagas.quick)
        patient = DirectPlacer(pg_url, SagaClient([sagas.patient], store=store), sagas.patient)
        conn = await asyncpg.connect(pg_url)
        try:
            # a completed order and a compensated one (the customer has no money)
            ok = await stack.place_order(**_order("ok-1", "cust-1").body)
            broke = await stack.place_order(**_order("broke-1", "cust-broke").body)
            states = await stack.wait_settled([ok["saga_id"], broke["saga_id"]], 60)
            assert states[broke["saga_id"]].status is SagaStatus.COMPENSATED
            # a FAILED saga: its release keeps failing (a trigger), quick runs out of tries
            await conn.execute(REJECT_UPDATES)
            await quick(_order("stuck-release-1", "cust-broke"))
            failed_id = "order-stuck-release-1"
            states = await stack.wait_settled([failed_id], 60)
            assert states[failed_id].status is SagaStatus.FAILED, states[failed_id]
            await conn.execute(ACCEPT_UPDATES)  # fixed: the operator may retry now
            # a saga whose reply is dead-lettered: it waits (ten-minute timeouts)
            await patient(_order(STUCK, "cust-2"))

            async with (
                dashboard_process(stack, logs) as url,
                async_playwright() as playwright,
            ):
                await _wait_for_dead_letter(url, f"order-{STUCK}")
                browser = await playwright.chromium.launch(
                    executable_path=chromium, args=CHROMIUM_FLAGS
                )
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(30_000)

                # -------------------------------------------- 1. find the compensated saga
                await page.goto(f"{url}/")
                await expect(page.locator("tr[data-saga-id]")).to_have_count(4)
                shot = tmp_path / "dashboard-list.png"
                await page.screenshot(path=shot, full_page=True)
                _keep(shot)
                await page.fill("input[name=q]", "broke-1")
                await page.click("#filters button[type=submit]")
                rows = page.locator("tr[data-saga-id]")
                await expect(rows).to_have_count(1)
                await expect(rows.first).to_contain_text("COMPENSATED")
                await expect(rows.first).to_contain_text("insufficient_funds")
                await rows.first.locator("a").click()
                await expect(page.locator("#saga-status")).to_have_text("COMPENSATED")
                sent = page.locator("#timeline li[data-event=compensation_sent]")
                undone = [
                    await sent.nth(i).get_attribute("data-step") for i in range(await sent.count())
                ]
                forward = page.locator("#timeline li[data-event=command_sent]")
                done = [
                    await forward.nth(i).get_attribute("data-step")
                    for i in range(await forward.count())
                ]
                assert done == ["validate", "reserve", "charge"], done
                assert undone == ["reserve", "validate"], undone  # reverse order
                states_drawn = page.locator("ol.drawing li")
                await expect(states_drawn.nth(2)).to_have_attribute("data-state", "failed")
                await expect(states_drawn.nth(1)).to_have_attribute("data-state", "compensated")
                shot = tmp_path / "dashboard-saga.png"
                await page.screenshot(path=shot, full_page=True)
                _keep(shot)

                # without JavaScript every page still reads (and filters) the same
                entries = await page.locator("#timeline li").count()
                plain = await browser.new_context(java_script_enabled=False)
                no_js = await plain.new_page()
                await no_js.goto(f"{url}/?q=broke-1")
                await expect(no_js.locator("tr[data-saga-id]")).to_have_count(1)
                await no_js.locator("tr[data-saga-id] a").click()
                await expect(no_js.locator("#saga-status")).to_have_text("COMPENSATED")
                await expect(no_js.locator("#timeline li")).to_have_count(entries)
                await plain.close()

                # -------------------------------------------- 2. retry the FAILED saga
                await page.goto(f"{url}/login")
                await page.fill("input[name=token]", TOKEN)
                await page.click("button[type=submit]")
                await page.goto(f"{url}/?status=FAILED")
                await page.locator(f"tr[data-saga-id='{failed_id}'] a").click()
                await expect(page.locator("#saga-status")).to_have_text("FAILED")
                await page.fill("#act input[name=by]", "alice")
                await page.fill("#act input[name=reason]", "inventory accepts updates again")
                await page.click("#retry")
                await expect(page.locator("h1")).to_contain_text("Confirm: retry saga")
                await page.click("#confirm")
                await expect(page.locator(".notice")).to_contain_text("Retry requested")
                # mark this document: a reload would lose the mark
                await page.evaluate("window.__notReloaded = true")
                await expect(page.locator("#saga-status")).to_have_text(
                    "COMPENSATED", timeout=60_000
                )
                assert await page.evaluate("window.__notReloaded === true")
                operator = page.locator("#timeline li[data-event=retry_requested]")
                await expect(operator).to_contain_text("by alice (dashboard)")
                await expect(operator).to_contain_text("inventory accepts updates again")
                assert await _status(store, failed_id) is SagaStatus.COMPENSATED

                # -------------------------------------------- 3. replay the dead letter
                await page.goto(f"{url}/dead-letters")
                letter = page.locator(f"tr[data-letter-id]:has-text('order-{STUCK}')")
                await expect(letter).to_have_count(1)
                shot = tmp_path / "dashboard-dead-letters.png"
                await page.screenshot(path=shot, full_page=True)
                _keep(shot)
                assert await _status(store, f"order-{STUCK}") is SagaStatus.RUNNING
                await letter.locator("input[name=by]").fill("alice")
                await letter.locator("input[name=reason]").fill("the hook is fixed")
                await letter.locator("button").click()
                await expect(page.locator("h1")).to_contain_text("Confirm: replay 1 dead letter")
                await page.click("#confirm")
                await expect(page.locator(".notice")).to_contain_text("Replayed")
                await expect(letter).to_have_count(0)
                await page.goto(f"{url}/sagas/order-{STUCK}")
                await expect(page.locator("#saga-status")).to_have_text("COMPLETED", timeout=60_000)
                replayed = page.locator("#timeline li[data-event=dead_letter_replayed]")
                await expect(replayed).to_contain_text("by alice (dashboard)")
                await browser.close()
        finally:
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute(ACCEPT_UPDATES)
            await conn.close()
            await quick.close()
            await patient.close()
            await store.close()

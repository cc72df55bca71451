"""The dashboard page in a real headless Chromium over real processes: both backends with
non-zero figures and moving charts, then a kill and a restore clicked on the page.

Debian's /usr/bin/chromium driven by playwright (tests/helpers/services.py); waits are on
selectors and text (the page's CSP forbids the script evaluation behind
``wait_for_function``). Screenshots are saved under ``test-artifacts/`` (ignored by git),
like the chat page's, and their paths printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from netstack.servers.up.dashboard import Dashboard
from tests.helpers import TIMEOUT
from tests.helpers.services import chromium
from tests.servers.up.support import DashServer, ProcController, Traffic

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
NONZERO = re.compile(r"^(0\.[1-9]|[1-9])")  # "0.4", "7.5", "1,234" (fmtRate's forms)

pytestmark = [pytest.mark.single_loop, pytest.mark.slow]  # the page is under test


async def test_dashboard_page_in_chromium(tmp_path: Path) -> None:
    from playwright.async_api import expect

    ctl = ProcController(tmp_path)
    assert ctl.balancer is not None
    dash = Dashboard(ctl, interval=0.5)
    srv = DashServer(dash.app)
    traffic = Traffic(ctl.balancer.port)
    try:
        async with chromium() as browser:
            ctx = await browser.new_context(viewport={"width": 1440, "height": 1100})
            page = await ctx.new_page()
            page.set_default_timeout(TIMEOUT * 2000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            # Without the trailing slash: the app redirects so relative URLs resolve.
            await page.goto(srv.url(""))
            assert page.url.endswith("/_dashboard/")
            await expect(page.locator("#conn")).to_have_text("live")

            cards = {
                name: page.locator(f'.server[data-name="{name}"]') for name in ("web-1", "web-2")
            }
            for card in cards.values():
                await expect(card.locator(".fig-rps .fig-value")).to_have_text(NONZERO)
                await expect(card.locator(".fig-p99 .fig-value")).to_have_text(re.compile(r" ms$"))
                await expect(card.locator(".lb-state")).to_have_text("lb: up")
                await expect(card.locator(".state")).to_have_text("running")
            await expect(page.locator("#t-lb-rps")).to_have_text(NONZERO)
            await expect(page.locator("#t-web-up")).to_have_text("2 / 2")
            await expect(page.locator("#t-p99")).to_have_text(re.compile(r" ms$"))
            await expect(page.locator("#chart-rps .u-legend")).to_contain_text("web-2")
            await expect(page.locator("#chart-rps canvas")).to_have_count(1)
            await expect(page.locator("#chart-p99 canvas")).to_have_count(1)
            await expect(page.locator("#balancer .backends tr")).to_have_count(3)

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 30_000  # a real rendering, not a blank page
            print(f"screenshot: {shot}")

            # Kill web-1 from its card; the page shows it stopped, the balancer's view
            # turns, and web-2 keeps serving.
            web1 = cards["web-1"]
            await web1.get_by_role("button", name="Kill").click()
            await expect(web1.locator(".state")).to_have_text("stopped")
            await expect(web1.locator(".fig-rps .fig-value")).to_have_text("no data")
            await expect(web1.locator(".lb-state")).not_to_have_text("lb: up")
            await expect(page.locator("#t-web-up")).to_have_text("1 / 2")
            await expect(cards["web-2"].locator(".fig-rps .fig-value")).to_have_text(NONZERO)
            shot = ARTIFACTS / "dashboard-killed.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            # A refused action shows its error on the page (here: the controller's).
            await web1.get_by_role("button", name="Restore").click()
            await expect(web1.locator(".state")).to_have_text("running")
            await expect(web1.locator(".fig-rps .fig-value")).to_have_text(NONZERO)
            await expect(web1.locator(".lb-state")).to_have_text("lb: up")
            assert errors == []
            await ctx.close()
    finally:
        traffic.close()
        dash.close()
        srv.close()
        ctl.close()


async def test_polling_fallback_all_tiers_and_an_error_shown_on_the_page(tmp_path: Path) -> None:
    """No event stream allowed (max_streams=0): the page polls api/snapshot. Every tier
    has figures (exporters whose counters a thread advances), and a kill the controller
    refuses shows its reason on the page."""
    import json
    import threading

    from playwright.async_api import expect

    from netstack.servers.up.topology import Component, Kind, State
    from tests.servers.up.support import Exporter
    from tests.servers.up.test_collector import (
        CHAT_TEXT,
        LB_TEXT,
        RPC_TEXT,
        TOKEN,
        MemoryController,
        web_text,
    )

    lb, web1, web2, rpc, chat = (Exporter(TOKEN), Exporter(), Exporter(), Exporter(), Exporter())
    backends = [
        {"name": "b1", "address": f"127.0.0.1:{8001}", "state": "up", "admin": "enabled",
         "active": 0, "total": 1, "failures": 0, "ejections": 0},
        {"name": "b2", "address": f"127.0.0.1:{8002}", "state": "up", "admin": "draining",
         "active": 0, "total": 1, "failures": 0, "ejections": 0},
    ]  # fmt: skip
    lb.set(json.dumps({"web": backends}), "/api/backends")
    stop = threading.Event()

    def advance() -> None:
        n = 0
        while not stop.wait(0.05) and n < 2000:  # bounded: at most 100 s of ticks
            n += 1
            lb.set(LB_TEXT.format(requests=20 * n, ok=19 * n, bad=n))
            web1.set(web_text(10 * n, 9 * n, n))
            web2.set(web_text(10 * n, 10 * n, 0))
            rpc.set(RPC_TEXT.format(ok=5 * n, bad=n, failed=n, total=5 * n))
            chat.set(CHAT_TEXT.format(messages=3 * n))

    ticker = threading.Thread(target=advance, daemon=True)
    ticker.start()

    class Refusing(MemoryController):
        def kill(self, name: str) -> None:
            if name == "web-2":
                self.calls.append(("kill", name))
                raise ValueError("web-2 is the last web server in service")
            super().kill(name)

    ctl = Refusing(
        [
            Component(
                "balancer",
                Kind.BALANCER,
                "127.0.0.1:8000",
                admin_url=lb.url(""),
                pid=1,
                state=State.RUNNING,
            ),
            Component(
                "web-1",
                Kind.WEB,
                "127.0.0.1:8001",
                metrics_url=web1.url(),
                pid=2,
                state=State.RUNNING,
            ),
            Component(
                "web-2",
                Kind.WEB,
                "127.0.0.1:8002",
                metrics_url=web2.url(),
                pid=3,
                state=State.RUNNING,
            ),
            Component(
                "rpc",
                Kind.RPC,
                "127.0.0.1:50051",
                metrics_url=rpc.url(),
                pid=4,
                state=State.RUNNING,
            ),
            Component(
                "chat",
                Kind.CHAT,
                "127.0.0.1:7000",
                metrics_url=chat.url(),
                pid=5,
                state=State.RUNNING,
            ),
        ]
    )
    dash = Dashboard(ctl, interval=0.25, max_streams=0)
    srv = DashServer(dash.app)
    try:
        async with chromium() as browser:
            ctx = await browser.new_context(viewport={"width": 1440, "height": 1100})
            page = await ctx.new_page()
            page.set_default_timeout(TIMEOUT * 2000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(srv.url("/"))
            await expect(page.locator("#conn")).to_have_text("polling")
            await expect(page.locator("#t-rpc")).to_have_text(NONZERO)
            await expect(page.locator("#t-chat")).to_have_text("7")
            await expect(page.locator("#t-5xx")).to_have_text(NONZERO)
            await expect(page.locator("#t-lb-rps")).to_have_text(NONZERO)
            rpc_card = page.locator('.server[data-name="rpc"]')
            await expect(rpc_card.locator(".fig-calls .fig-value")).to_have_text(NONZERO)
            await expect(rpc_card.locator(".fig-errors .fig-value")).to_have_text(NONZERO)
            await expect(rpc_card.locator(".fig-client-errors .fig-value")).to_have_text(NONZERO)
            await expect(page.locator('.server[data-name="chat"]')).to_contain_text("websocket")
            card2 = page.locator('.server[data-name="web-2"]')
            await expect(card2.locator(".lb-state")).to_have_text("lb: draining")
            await expect(card2.locator(".fig-rps .fig-value")).to_have_text(NONZERO)

            await card2.get_by_role("button", name="Kill").click()
            toast = page.locator(".toast", has_text="web-2 is the last web server in service")
            await expect(toast).to_be_visible()
            await expect(card2.locator(".state")).to_have_text("running")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard-all-tiers.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert ("kill", "web-2") in ctl.calls
            assert errors == []
            await ctx.close()
    finally:
        stop.set()
        ticker.join(TIMEOUT)
        dash.close()
        srv.close()
        for e in (lb, web1, web2, rpc, chat):
            e.close()

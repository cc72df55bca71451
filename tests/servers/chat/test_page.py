"""The browser page in a real headless Chromium: two people sign up and talk, then the
server restarts and the page reconnects and backfills what it missed.

Debian's /usr/bin/chromium, driven by playwright (tests/helpers/services.py). Waits are
on selectors and text (the page's CSP forbids the script evaluation behind
``wait_for_function``). The final screen of each user is saved as a PNG under
``test-artifacts/`` (ignored by git), and the path printed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from netstack.servers.chat import ChatServer
from tests.helpers import TIMEOUT, free_port
from tests.helpers.services import chromium
from tests.servers.chat.support import PASSWORD, chat_config, ws

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"

pytestmark = pytest.mark.single_loop  # the browser is under test, not the event loop


async def test_two_users_chat_in_chromium(tmp_path: Path) -> None:
    from playwright.async_api import Page, expect

    async def sign_up(page: Page, url: str, nick: str) -> None:
        page.set_default_timeout(TIMEOUT * 1000)
        await page.goto(url)
        await expect(page.locator("#login")).to_be_visible()
        await page.fill("#nick", nick)
        await page.fill("#password", PASSWORD)
        await page.click("#register-btn")
        await expect(page.locator("#me-nick")).to_have_text(nick)
        await expect(page.locator("#conn-state")).to_have_text("connected")

    async def type_line(page: Page, text: str) -> None:
        await expect(page.locator("#input")).to_be_enabled()
        await page.fill("#input", text)
        await page.press("#input", "Enter")
        await expect(page.locator("#input")).to_have_value("")  # sent and acknowledged

    db = tmp_path / "chat.sqlite3"
    port = free_port()
    srv = ChatServer(chat_config(db, bind=f"127.0.0.1:{port}", tcp_bind=None))
    await srv.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        async with chromium() as browser:
            # Two contexts: separate storage, like two people on two machines.
            alice_ctx = await browser.new_context(viewport={"width": 1200, "height": 720})
            bob_ctx = await browser.new_context(viewport={"width": 1200, "height": 720})
            alice, bob = await alice_ctx.new_page(), await bob_ctx.new_page()
            errors: list[str] = []
            for page in (alice, bob):
                page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Alice creates a channel from the channel browser...
            await sign_up(alice, url, "alice")
            await alice.click("#browse-btn")
            await alice.fill("#new-room", "general")
            await alice.fill("#new-topic", "Everything netstack")
            await alice.click("#create-btn")
            await expect(alice.locator("#chan-title")).to_have_text("#general")
            await expect(alice.locator("#chan-topic")).to_have_text("Everything netstack")

            # ...and Bob finds it there and joins.
            await sign_up(bob, url, "bob")
            await bob.click("#browse-btn")
            await bob.locator("#browse-list li", has_text="general").get_by_role("button").click()
            await expect(bob.locator("#chan-title")).to_have_text("#general")
            await expect(alice.locator(".system").last).to_have_text("bob joined #general")

            await type_line(alice, "Hello Bob, welcome to netstack chat!")
            bob_msg = bob.locator(".msg", has_text="Hello Bob, welcome to netstack chat!")
            await expect(bob_msg.locator(".from")).to_have_text("alice")
            await type_line(bob, "Thanks Alice, the page works in Chromium.")
            alice_msg = alice.locator(".msg", has_text="the page works in Chromium")
            await expect(alice_msg.locator(".from")).to_have_text("bob")
            await expect(alice.locator("#member-list")).to_contain_text("bob")

            # A direct message shows up in the other person's sidebar.
            await type_line(bob, "/msg alice see you at lunch")
            await expect(alice.locator("#dm-list")).to_contain_text("bob")
            await alice.locator("#dm-list li", has_text="bob").click()
            await expect(alice.locator(".msg", has_text="see you at lunch")).to_be_visible()
            await alice.locator("#room-list li", has_text="general").click()
            await expect(alice.locator("#chan-title")).to_have_text("#general")

            # A DM partner who shares no room with alice: her online/offline reaches
            # alice's DM list although #general is on screen.
            carol = await ws(srv)
            await carol.register("carol")
            await carol.ok("dm", to="alice", text="hi from carol")
            carol_dot = alice.locator("#dm-list li", has_text="carol").locator(".dot.online")
            await expect(carol_dot).to_have_count(1)  # a live DM: she is connected
            await carol.close()
            await expect(carol_dot).to_have_count(0)
            carol = await ws(srv)
            await carol.login("carol")
            await expect(carol_dot).to_have_count(1)
            await carol.close()
            await expect(carol_dot).to_have_count(0)
            # With her conversation on screen, its header follows too.
            await alice.locator("#dm-list li", has_text="carol").click()
            await expect(alice.locator("#chan-topic")).to_have_text("offline")
            carol = await ws(srv)
            await carol.login("carol")
            await expect(alice.locator("#chan-topic")).to_have_text("online")
            await carol.close()
            await expect(alice.locator("#chan-topic")).to_have_text("offline")
            await alice.locator("#room-list li", has_text="general").click()
            await expect(alice.locator("#chan-title")).to_have_text("#general")

            ARTIFACTS.mkdir(exist_ok=True)
            for nick, page in (("alice", alice), ("bob", bob)):
                shot = ARTIFACTS / f"chat-page-{nick}.png"
                await page.screenshot(path=str(shot))
                assert shot.stat().st_size > 10_000  # a real rendering, not a blank page
                print(f"screenshot: {shot}")
            assert errors == []

            # The server restarts; meanwhile bob says something through another instance
            # on the same database. Alice's page reconnects, resumes and backfills it.
            # Alice's member pane watches #general: bob's dot goes out when he leaves
            # (a batched online/offline event, no new `who`).
            bob_dot = alice.locator("#member-list li", has_text="bob").locator(".dot.online")
            await expect(bob_dot).to_have_count(1)
            await bob_ctx.close()
            await expect(bob_dot).to_have_count(0)
            await srv.close()
            await expect(alice.locator("#conn-state")).to_contain_text("reconnecting")
            async with ChatServer(chat_config(db, tcp_bind=None)) as other:
                bob_ws = await ws(other)
                await bob_ws.login("bob")
                await bob_ws.ok("say", room="general", text="said while the page was offline")
                await bob_ws.close()
            srv = ChatServer(chat_config(db, bind=f"127.0.0.1:{port}", tcp_bind=None))
            await srv.start()
            missed = alice.locator(".msg", has_text="said while the page was offline")
            await expect(missed).to_have_count(1, timeout=TIMEOUT * 4000)  # backoff: up to ~8 s
            await expect(alice.locator("#conn-state")).to_have_text("connected")
            assert errors == []
            await alice_ctx.close()
    finally:
        await srv.close()

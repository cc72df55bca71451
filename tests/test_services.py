"""The real components the tests start: each answers, or the test fails (never skips)."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers.services import RedisServer, chromium


def test_redis_server_answers(redis: RedisServer) -> None:
    assert redis.cli("ping") == "PONG"
    assert redis.cli("config", "get", "save") == "save"  # and an empty value: no disk writes


def test_postgres_answers(postgres: str, pg_url: str) -> None:
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, current_database(), current_schema()").fetchone()
    assert row is not None
    assert row[:2] == ("netstack", "netstack_test")
    assert row[2].startswith("t_")  # a schema of its own


@pytest.mark.single_loop
async def test_chromium_renders_a_page() -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        await page.set_content("<title>t</title><p id=x>hello</p>")
        assert await page.inner_text("#x") == "hello"

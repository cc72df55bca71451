"""``netstack up`` end to end: real processes, every request through the balancer.

One module-scoped ``netstack up`` (supervisor in a thread, children real processes) serves
most tests; they leave it as they found it (everything running). The SIGINT and
port-in-use tests run ``netstack up`` as a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Origin

from netstack.config import UpConfig
from netstack.servers.rpc._pb import notes_pb2 as pb
from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc
from netstack.servers.up.topology import Kind, State
from tests.helpers import TIMEOUT, free_port, poll_until
from tests.helpers.services import RedisServer
from tests.servers.chat.support import PASSWORD, WSClient
from tests.servers.up.stack import Up, processes_in_sessions
from tests.servers.up.support import Traffic

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data = tmp_path_factory.mktemp("up-data")
    cfg = UpConfig(listen=f"127.0.0.1:{free_port()}", data_dir=str(data), web_servers=2)
    running = Up(cfg).start()
    try:
        yield running
    finally:
        running.stop()
        assert {c.pid for c in running.supervisor.components()} == {None}  # all exited


@pytest.fixture
def healthy(up: Up) -> Up:
    """Every component running and both web servers answering through the balancer."""
    for c in up.supervisor.components():
        if c.state in (State.STOPPED, State.FAILED):
            up.supervisor.restore(c.name)
    for c in up.supervisor.components():
        up.wait_state(c.name, State.RUNNING)
    up.wait_serving({"web-1", "web-2"})
    return up


# --------------------------------------------------------------------------- the app


def test_note_created_on_one_web_server_is_read_back_through_the_other(healthy: Up) -> None:
    created = healthy.post_json("/api/notes", {"title": "shopping", "body": "milk, eggs"})
    assert created.status == 201, created.body
    note = created.json()
    assert created.headers["Location"] == f"/api/notes/{note['id']}"
    writer = created.served_by
    assert writer in ("web-1", "web-2")

    other = None
    for _ in range(10):  # round robin: the next request or the one after goes elsewhere
        reply = healthy.get(f"/api/notes/{note['id']}")
        assert reply.status == 200, reply.body
        assert reply.json() == note
        if reply.served_by != writer:
            other = reply.served_by
            break
    assert other is not None
    assert other != writer

    # It went through gRPC to the database: ask the notes service, then the file itself.
    sup = healthy.supervisor
    with grpc.insecure_channel(sup.urls["grpc"]) as channel:
        stub = pb_grpc.NotesStub(channel)
        got = stub.GetNote(
            pb.GetNoteRequest(id=note["id"]),
            timeout=TIMEOUT,
            metadata=(("authorization", f"Bearer {sup.rpc_token}"),),
        )
        assert (got.title, got.body) == ("shopping", "milk, eggs")
        with pytest.raises(grpc.RpcError) as refused:  # the service wants the token
            stub.GetNote(pb.GetNoteRequest(id=note["id"]), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    db = sqlite3.connect(f"file:{sup.data_dir / 'notes.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT title, body FROM notes WHERE id = ?", (note["id"],)).fetchone()
    finally:
        db.close()
    assert row == ("shopping", "milk, eggs")


def test_json_api_lists_searches_pages_and_maps_errors(healthy: Up) -> None:
    ids = []
    for i in range(3):
        reply = healthy.post_json("/api/notes", {"title": f"paging {i}", "body": "zebra"})
        assert reply.status == 201
        ids.append(reply.json()["id"])
    first = healthy.get("/api/notes?page_size=2")
    assert first.status == 200
    page = first.json()
    assert [n["id"] for n in page["notes"]] == ids[::-1][:2]  # newest first
    assert page["next_page_token"]
    second = healthy.get(f"/api/notes?page_size=2&page_token={page['next_page_token']}")
    assert second.json()["notes"][0]["id"] == ids[0]
    found = healthy.get("/api/notes?q=zebra").json()
    assert {n["id"] for n in found["notes"]} >= set(ids)

    missing = healthy.get("/api/notes/999999")
    assert missing.status == 404
    assert missing.json() == {"code": "NOT_FOUND", "error": "note 999999 does not exist"}
    assert missing.served_by in ("web-1", "web-2")
    empty = healthy.post_json("/api/notes", {"title": "  ", "body": "x"})
    assert empty.status == 400
    assert empty.json()["code"] == "INVALID_ARGUMENT"
    assert "title" in empty.json()["error"]
    assert healthy.post_json("/api/notes", ["not", "an", "object"]).status == 400
    not_json = healthy.request("POST", "/api/notes", body=b"title=x")
    assert not_json.status == 415
    bad_token = healthy.get("/api/notes?page_token=garbage")
    assert bad_token.status == 400
    assert bad_token.json()["code"] == "INVALID_ARGUMENT"
    # Values protobuf itself refuses are the client's error too, never a 500.
    huge = healthy.get(f"/api/notes?page_size={2**40}")
    assert huge.status == 400
    assert "page_size" in huge.json()["error"]
    assert healthy.get(f"/api/notes/{2**70}").status == 404
    surrogate = healthy.request(
        "POST",
        "/api/notes",
        body=b'{"title": "\\ud800", "body": ""}',
        headers={"Content-Type": "application/json"},
    )
    assert surrogate.status == 400, surrogate.body
    odd_id = healthy.request("GET", "/api/notes?page_size=1", headers={"X-Request-Id": "a b"})
    assert odd_id.status == 200  # an id gRPC would refuse is simply not passed on


def test_html_pages_list_view_create_and_search(healthy: Up) -> None:
    form = healthy.get("/notes/new")
    assert form.status == 200
    assert b'<form class="card form" method="post"' in form.body
    created = healthy.request(
        "POST",
        "/notes",
        body=b"title=Release+%3Cplan%3E&body=ship+it",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert created.status == 303
    location = created.headers["Location"]
    assert re.fullmatch(r"/notes/\d+", location)
    page = healthy.get(location)
    assert page.status == 200
    assert b"Release &lt;plan&gt;" in page.body  # escaped, never raw HTML
    assert b"<plan>" not in page.body
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    listing = healthy.get("/")
    assert b"Release &lt;plan&gt;" in listing.body
    assert healthy.get("/static/notes.css").status == 200
    searched = healthy.get("/?q=ship")
    assert b"Release &lt;plan&gt;" in searched.body
    nothing = healthy.get("/?q=no-such-words-anywhere")
    assert b"No note matches" in nothing.body

    invalid = healthy.request(
        "POST",
        "/notes",
        body=b"title=&body=kept",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert invalid.status == 400
    assert b"title: must not be empty" in invalid.body
    assert b">kept</textarea>" in invalid.body  # the form keeps what was typed
    cross_site = healthy.request(
        "POST",
        "/notes",
        body=b"title=csrf",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": "http://evil.example",
        },
    )
    assert cross_site.status == 400
    assert healthy.get("/notes/999999").status == 404


# --------------------------------------------------------------------------- supervision


def test_components_name_every_process_and_its_endpoints(healthy: Up) -> None:
    comps = healthy.supervisor.components()
    assert [c.name for c in comps] == ["balancer", "web-1", "web-2", "rpc", "chat"]
    assert [c.kind for c in comps] == [Kind.BALANCER, Kind.WEB, Kind.WEB, Kind.RPC, Kind.CHAT]
    assert all(c.state == State.RUNNING and c.pid for c in comps)
    balancer = comps[0]
    assert balancer.admin_url is not None
    assert balancer.metrics_url == balancer.admin_url + "/metrics"
    host, port = balancer.admin_url.removeprefix("http://").rsplit(":", 1)
    backends = healthy.request(
        "GET",
        "/api/backends",
        headers={"Authorization": f"Bearer {healthy.supervisor.admin_token}"},
        address=(host, int(port)),
    )
    assert backends.status == 200
    text = json.dumps(backends.json())
    assert "web-1" in text
    assert "web-2" in text
    assert healthy.get("/metrics", address=(host, int(port))).status == 200
    for child in comps[1:]:  # web-1, web-2, rpc, chat: each runs with --metrics-bind
        assert child.metrics_url is not None, child.name
        mhost, mport = child.metrics_url.removeprefix("http://").split("/")[0].rsplit(":", 1)
        metrics = healthy.get("/metrics", address=(mhost, int(mport)))
        assert metrics.status == 200
        assert b"# TYPE" in metrics.body
    with pytest.raises(ValueError, match="balancer"):
        healthy.supervisor.kill("balancer")
    with pytest.raises(KeyError):
        healthy.supervisor.kill("web-9")
    with pytest.raises(KeyError):
        healthy.supervisor.restore("web-9")
    healthy.supervisor.restore("web-1")  # running: a no-op
    assert healthy.component("web-1").pid == comps[1].pid


def test_killed_web_server_is_routed_around_then_restored(healthy: Up) -> None:
    sup = healthy.supervisor
    before = healthy.component("web-1")
    sup.kill("web-1")
    killed = healthy.component("web-1")
    assert killed.state == State.STOPPED
    poll_until(lambda: healthy.component("web-1").pid is None)
    with contextlib.suppress(ProcessLookupError):  # gone, or a zombie about to be reaped
        os.kill(before.pid or 0, 0)

    served = []
    for i in range(20):  # the next requests all succeed: the balancer routes around it
        reply = healthy.get("/api/notes?page_size=1") if i % 2 else healthy.get("/")
        assert reply.status == 200, (i, reply.status, reply.body[:200])
        served.append(reply.served_by)
    assert set(served) == {"web-2"}
    assert healthy.component("web-1").state == State.STOPPED  # not restarted by itself
    assert any("web-1: killed (SIGKILL) on request" in line for line in healthy.lines)

    sup.restore("web-1")
    restored = healthy.wait_state("web-1", State.RUNNING)
    assert restored.pid not in (None, before.pid)
    assert restored.restarts == before.restarts  # a restore is not a crash
    healthy.wait_serving({"web-1"})


def test_crashed_child_is_restarted(healthy: Up) -> None:
    before = healthy.component("web-2")
    assert before.pid is not None
    os.kill(before.pid, signal.SIGKILL)  # from outside: a crash, not a kill on request

    def restarted() -> bool:
        now = healthy.component("web-2")
        return now.state == State.RUNNING and now.pid not in (None, before.pid)

    poll_until(restarted, timeout=4 * TIMEOUT)
    assert healthy.component("web-2").restarts == before.restarts + 1
    assert any("web-2 crashed (killed by SIGKILL); restarting" in line for line in healthy.lines)
    healthy.wait_serving({"web-1", "web-2"})


def test_notes_service_down_is_a_clear_503_then_recovers(healthy: Up) -> None:
    healthy.supervisor.kill("rpc")
    poll_until(lambda: healthy.component("rpc").pid is None)
    down = healthy.get("/api/notes")
    assert down.status == 503
    assert down.json() == {
        "code": "UNAVAILABLE",
        "error": "the notes service is unavailable; try again in a moment",
    }
    page = healthy.get("/")
    assert page.status == 503
    assert b"the notes service is unavailable" in page.body
    assert healthy.get("/healthz").status == 200  # the web tier itself is fine

    healthy.supervisor.restore("rpc")
    healthy.wait_state("rpc", State.RUNNING)
    # Both web servers' channels reconnect (backoff at most 2 s).
    ok: set[str] = set()

    def both_recovered() -> bool:
        reply = healthy.get("/api/notes?page_size=1")
        if reply.status == 200 and reply.served_by:
            ok.add(reply.served_by)
        return ok == {"web-1", "web-2"}

    poll_until(both_recovered, timeout=4 * TIMEOUT, interval=0.1)


# --------------------------------------------------------------------------- chat, dashboard


def test_chat_page_and_redirect_through_the_balancer(healthy: Up) -> None:
    redirect = healthy.get("/chat")
    assert redirect.status == 308
    assert redirect.headers["Location"] == "/chat/"
    page = healthy.get("/chat/")
    assert page.status == 200
    assert b"netstack chat" in page.body
    # Relative URLs: under /chat/ the browser asks for /chat/app.js, /chat/ws.
    assert b'src="app.js"' in page.body
    assert b'href="app.css"' in page.body
    for asset in ("app.js", "app.css", "favicon.svg"):
        reply = healthy.get(f"/chat/{asset}")
        assert reply.status == 200, asset
        assert reply.headers.get("X-Served-By") is None  # chat, not the web pool
    assert b'new URL("ws", location.href)' in healthy.get("/chat/app.js").body


@pytest.mark.single_loop
async def test_chat_over_websocket_through_the_balancer(healthy: Up) -> None:
    host, port = healthy.address
    origin = f"http://{host}:{port}"

    async def open_client() -> WSClient:
        ws = await connect(f"ws://{host}:{port}/chat/ws", origin=Origin(origin), max_size=None)
        client = WSClient(ws)
        client.hello = await client.expect("hello")
        return client

    alice, bob = await open_client(), await open_client()
    try:
        suffix = str(time.monotonic_ns())[-6:]
        await alice.register(f"alice{suffix}")
        await bob.register(f"bob{suffix}")
        room = f"up{suffix}"
        await alice.ok("create", room=room, topic="through the balancer")
        await bob.ok("join", room=room)
        sent = await alice.ok("say", room=room, text="hello via /chat/ws")
        assert (await bob.expect("message"))["message"] == sent["message"]
    finally:
        await alice.close()
        await bob.close()
    assert PASSWORD  # the shared test password was used by register()

    with pytest.raises(Exception, match="403"):  # the chat origin check still applies
        await connect(f"ws://{host}:{port}/chat/ws", origin=Origin("http://evil.example"))


def test_dashboard_is_routed_with_its_prefix(healthy: Up) -> None:
    reply = healthy.get("/_dashboard/")
    assert reply.status == 200, reply.body[:200]
    assert reply.headers.get("X-Served-By") is None  # served by the supervisor, not web


# --------------------------------------------------------------------------- the process


def _run_up(args: list[str], cwd: Path, *, merge: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETSTACK_")}
    return subprocess.Popen(
        [sys.executable, "-m", "netstack", "up", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        text=True,
    )


def test_sigint_stops_everything_in_order_without_orphans(tmp_path: Path) -> None:
    port = free_port()
    proc = _run_up(["--listen", f"127.0.0.1:{port}", "--web-servers", "1"], tmp_path, merge=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        poll_until(
            lambda: any("pid" in line and "balancer" in line for line in lines), 12 * TIMEOUT
        )
        pids = {
            int(p) for p in re.findall(r"pid (\d+)", next(x for x in lines if "balancer pid" in x))
        }
        assert len(pids) == 4  # balancer, web-1, rpc, chat
        assert any(f"http://localhost:{port}/_dashboard/" in line for line in lines)
        assert (tmp_path / "netstack-data" / "notes.sqlite3").exists()  # the default data dir
        proc.send_signal(signal.SIGINT)
        assert proc.wait(8 * TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()
    out = "".join(lines)
    assert "all stopped" in out
    # Balancer first, then web, then the services: each one's last line is in that order.
    last = {
        name: max(i for i, x in enumerate(lines) if x.startswith(name))
        for name in ("balancer", "web-1", "rpc")
    }
    assert last["balancer"] < last["web-1"] < last["rpc"]
    assert processes_in_sessions(pids) == []  # no orphan, workers included


def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no chance to clean up: the children must notice
    (PR_SET_PDEATHSIG) and stop. Port 0 asks for any free public port."""
    proc = _run_up(["--listen", "127.0.0.1:0", "--web-servers", "1"], tmp_path, merge=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        poll_until(lambda: any("balancer pid" in line for line in lines), 12 * TIMEOUT)
        pids = {
            int(p) for p in re.findall(r"pid (\d+)", next(x for x in lines if "balancer pid" in x))
        }
        assert len(pids) == 4
        assert processes_in_sessions(pids) != []
        proc.kill()
        proc.wait(TIMEOUT)
        poll_until(lambda: processes_in_sessions(pids) == [], 8 * TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in processes_in_sessions(pids):  # only when the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reader.join(TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()


def test_port_in_use_exits_3_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run_up(["--listen", f"127.0.0.1:{port}"], tmp_path)
        out, err = proc.communicate(timeout=4 * TIMEOUT)
    assert proc.returncode == 3
    assert err.strip().splitlines() == [
        f"netstack: error: cannot bind 127.0.0.1:{port}: Address already in use"
    ]
    assert "pid" not in out  # nothing was started


@pytest.mark.single_loop
async def test_chat_page_and_notes_app_in_chromium_through_the_balancer(healthy: Up) -> None:
    """The page at /chat/ loads its files and opens its WebSocket at /chat/ws (relative
    URLs); the notes form works in a real browser (CSP, same-origin POST)."""
    from playwright.async_api import expect

    from tests.helpers.services import chromium

    host, port = healthy.address
    nick = f"carol{str(time.monotonic_ns())[-5:]}"
    async with chromium() as browser:
        page = await browser.new_page()
        page.set_default_timeout(TIMEOUT * 1000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on(
            "response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )

        await page.goto(f"http://{host}:{port}/chat")  # redirected to /chat/
        await expect(page.locator("#login")).to_be_visible()
        await page.fill("#nick", nick)
        await page.fill("#password", PASSWORD)
        await page.click("#register-btn")
        await expect(page.locator("#me-nick")).to_have_text(nick)
        await expect(page.locator("#conn-state")).to_have_text("connected")
        assert page.url == f"http://{host}:{port}/chat/"

        await page.goto(f"http://{host}:{port}/notes/new")
        await page.fill("input[name=title]", "From Chromium")
        await page.fill("textarea[name=body]", "typed in a real browser")
        await page.click("button[type=submit]")
        await expect(page.locator("article h1")).to_have_text("From Chromium")
        assert re.search(r"/notes/\d+$", page.url)
        assert await page.locator(".top").evaluate("e => getComputedStyle(e).display") == "flex"
        await page.goto(f"http://{host}:{port}/")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "up-notes.png"
        await page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
    assert errors == []


@pytest.mark.single_loop
async def test_dashboard_in_chromium_through_netstack_up(healthy: Up) -> None:
    """The whole stack's dashboard, as a person opens it: both web servers with non-zero
    requests/s, the balancer's view of them, gRPC calls/s from the notes app's traffic."""
    from playwright.async_api import expect

    from tests.helpers.services import chromium

    host, port = healthy.address
    nonzero = re.compile(r"^(0\.[1-9]|[1-9])")
    traffic = Traffic(port)
    try:
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT * 3000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://{host}:{port}/_dashboard/")
            await expect(page.locator("#conn")).to_have_text("live")
            for name in ("web-1", "web-2"):
                card = page.locator(f'.server[data-name="{name}"]')
                await expect(card.locator(".fig-rps .fig-value")).to_have_text(nonzero)
                await expect(card.locator(".lb-state")).to_have_text("lb: up")
            await expect(page.locator("#t-web-up")).to_have_text("2 / 2")
            await expect(page.locator("#t-lb-rps")).to_have_text(nonzero)
            await expect(page.locator("#t-rpc")).to_have_text(nonzero)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "up-dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert errors == []
    finally:
        traffic.close()
    assert traffic.ok > 0


@pytest.mark.single_loop
async def test_postgres_and_redis_back_the_services(
    tmp_path: Path, pg_url: str, redis: RedisServer
) -> None:
    """--db: notes (and chat) live in PostgreSQL; --redis: chat instances meet in Redis."""
    import psycopg

    cfg = UpConfig(
        listen=f"127.0.0.1:{free_port()}",
        data_dir=str(tmp_path),
        web_servers=1,
        db=pg_url,
        redis=redis.url,
    )
    running = await asyncio.to_thread(Up(cfg).start)
    try:
        created = running.post_json("/api/notes", {"title": "in postgres", "body": "yes"})
        assert created.status == 201, created.body
        with psycopg.connect(pg_url, connect_timeout=int(TIMEOUT)) as conn:
            row = conn.execute(
                "SELECT title FROM notes WHERE id = %s", (created.json()["id"],)
            ).fetchone()
        assert row == ("in postgres",)
        assert not (tmp_path / "notes.sqlite3").exists()

        host, port = running.address
        ws = await connect(f"ws://{host}:{port}/chat/ws", origin=Origin(f"http://{host}:{port}"))
        client = WSClient(ws)
        client.hello = await client.expect("hello")
        try:
            await client.register("pgredis")
            # The chat instance announced itself in Redis (presence, fan-out channel).
            assert redis.cli("ZCARD", "netstack:chat:instances") == "1"
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(running.stop)

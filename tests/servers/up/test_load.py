"""run_demo_load against a real netstack WSGIServer on loopback serving a small notes app:
the mix, the bounds (time, count, in flight), stop, errors counted and never raised, and
the loopback-only rule."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from netstack.config import WSGIServerConfig
from netstack.servers.up.load import LoadStats, loopback_target, run_demo_load
from netstack.servers.wsgi import WSGIServer
from tests.helpers import TIMEOUT, apoll_until, free_port


class NotesApp:
    """What the example app's public URLs answer, in memory: /, /api/notes, /api/notes/ID."""

    def __init__(self, *, hold: threading.Event | None = None, fail_list: bool = False) -> None:
        self.notes: dict[int, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.hold = hold
        self.fail_list = fail_list

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        with self.lock:
            self.requests.append((method, path))
        if self.hold is not None:
            self.hold.wait(TIMEOUT)
        status, doc = "404 Not Found", {"error": "not found"}
        if path == "/" and method == "GET":
            return self._send(start_response, "200 OK", b"<h1>notes</h1>", "text/html")
        if path == "/api/notes" and method == "GET":
            if self.fail_list:
                status, doc = "500 Internal Server Error", {"error": "database is down"}
            else:
                status, doc = "200 OK", {"notes": list(self.notes.values())[-20:]}
        elif path == "/api/notes" and method == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(size))
            assert set(body) == {"title", "body"}
            with self.lock:
                note = {"id": len(self.notes) + 1, **body}
                self.notes[note["id"]] = note
            status, doc = "201 Created", note
        elif path.startswith("/api/notes/") and method == "GET":
            note = self.notes.get(int(path.rsplit("/", 1)[1]))
            if note is not None:
                status, doc = "200 OK", note
        return self._send(start_response, status, json.dumps(doc).encode(), "application/json")

    @staticmethod
    def _send(start_response, status, body, ctype):
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]


def serve(app, threads: int = 0, **cfg) -> WSGIServer:
    cfg = WSGIServerConfig(
        app="x:app", bind=("127.0.0.1:0",), threads=threads, access_log=False, **cfg
    )
    return WSGIServer(cfg, app)


async def test_the_mix_against_a_real_server():
    app = NotesApp()
    async with serve(app) as server:
        url = f"http://127.0.0.1:{server.addresses[0][1]}"
        stats = LoadStats()
        start = time.monotonic()
        await run_demo_load(url, stop=asyncio.Event(), rate=200, duration=0.5, stats=stats, seed=7)
        elapsed = time.monotonic() - start
    assert stats.sent == 100  # rate * duration, on schedule
    assert 0.45 < elapsed < 0.5 + TIMEOUT
    assert (stats.ok, stats.errors, stats.dropped) == (100, 0, 0)
    assert set(stats.statuses) <= {200, 201}
    assert set(stats.by_kind) == {"home", "list", "create", "read"}
    assert stats.created == len(app.notes) > 0
    assert len(app.requests) == 100
    reads = [p for m, p in app.requests if m == "GET" and p.startswith("/api/notes/")]
    assert reads
    assert all(int(p.rsplit("/", 1)[1]) in app.notes for p in reads)  # only notes it made


async def test_a_base_path_is_kept_and_stop_ends_the_run_early():
    app = NotesApp()
    async with serve(app) as server:
        url = f"http://localhost:{server.addresses[0][1]}/app/"
        stop = asyncio.Event()
        stats = LoadStats()
        run = asyncio.create_task(run_demo_load(url, stop=stop, rate=100, duration=60, stats=stats))
        await apoll_until(lambda: len(app.requests) >= 10)
        stop.set()
        async with asyncio.timeout(TIMEOUT):
            await run
    assert 10 <= stats.sent < 100
    assert all(p.startswith("/app/") for _, p in app.requests)  # mounted under /app: 404s
    assert stats.errors == stats.sent - stats.ok
    assert 404 in stats.statuses


async def test_http_errors_and_a_dead_server_are_counted_not_raised():
    app = NotesApp(fail_list=True)
    async with serve(app) as server:
        url = f"http://127.0.0.1:{server.addresses[0][1]}"
        stats = LoadStats()
        await run_demo_load(url, stop=asyncio.Event(), rate=200, duration=0.3, stats=stats, seed=1)
    assert stats.statuses[500] == stats.by_kind["list"] > 0
    assert stats.errors == stats.statuses[500]
    assert stats.ok == stats.sent - stats.errors

    # Nobody listens: every request fails to connect, and the run still ends on time.
    stats = LoadStats()
    await run_demo_load(
        f"http://127.0.0.1:{free_port()}", stop=asyncio.Event(), rate=100, duration=0.2, stats=stats
    )
    assert stats.sent == 20
    assert stats.errors == 20
    assert stats.ok == 0
    assert stats.failures["ConnectionRefusedError"] == 20


async def test_the_server_going_away_mid_run():
    app = NotesApp()
    server = serve(app)
    await server.start()
    url = f"http://127.0.0.1:{server.addresses[0][1]}"
    stats = LoadStats()
    run = asyncio.create_task(
        run_demo_load(url, stop=asyncio.Event(), rate=100, duration=0.6, stats=stats)
    )
    await apoll_until(lambda: stats.ok >= 10)
    server.close()
    await server.wait_closed()
    async with asyncio.timeout(TIMEOUT):
        await run  # no exception: a killed backend must not stop the demo
    assert stats.ok >= 10
    assert stats.errors > 0
    assert stats.ok + stats.errors == stats.sent == 60


async def test_idle_connections_the_server_closed_are_retried_on_a_new_one():
    from netstack.config import HTTPTimeouts

    app = NotesApp()
    # The server closes idle keep-alive connections after 20 ms; requests leave every
    # 100 ms, so each one after the first finds its pooled connection closed.
    async with serve(app, http_timeouts=HTTPTimeouts(keepalive_timeout=0.02)) as server:
        url = f"http://127.0.0.1:{server.addresses[0][1]}"
        stats = LoadStats()
        await run_demo_load(url, stop=asyncio.Event(), rate=10, duration=0.5, stats=stats)
    assert (stats.sent, stats.ok, stats.errors) == (5, 5, 0)
    assert len(app.requests) == 5


async def test_requests_beyond_max_in_flight_are_dropped_not_queued():
    hold = threading.Event()
    app = NotesApp(hold=hold)
    async with serve(app, threads=4) as server:
        url = f"http://127.0.0.1:{server.addresses[0][1]}"
        stats = LoadStats()
        run = asyncio.create_task(
            run_demo_load(
                url, stop=asyncio.Event(), rate=100, duration=0.2, max_in_flight=2, stats=stats
            )
        )
        try:
            await apoll_until(lambda: stats.sent + stats.dropped == 20)
        finally:
            hold.set()
        await run
    assert (stats.sent, stats.dropped) == (2, 18)
    assert stats.ok == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8080/",
        "http://192.168.1.10/",
        "http://example.com/",
        "http://[2001:db8::1]:80/",
        "https://127.0.0.1/",
        "ftp://127.0.0.1/",
        "http:///nohost",
        "http://127.0.0.1:99999/",
    ],
)
async def test_refuses_anything_but_plain_http_to_loopback(url):
    with pytest.raises(ValueError, match=r"loopback|http://|no host|port"):
        await run_demo_load(url, stop=asyncio.Event(), duration=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": 1e6}, "rate"),
        ({"duration": 0}, "duration"),
        ({"duration": 1e9}, "duration"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"timeout": 0}, "timeout"),
    ],
)
async def test_refuses_unbounded_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        await run_demo_load("http://127.0.0.1:1/", stop=asyncio.Event(), **kwargs)


def test_loopback_target_forms():
    assert loopback_target("http://127.0.0.1:8080").authority == "127.0.0.1:8080"
    assert loopback_target("http://[::1]:81/x/").prefix == "/x"
    assert loopback_target("http://[::1]:81/x/").authority == "[::1]:81"
    assert loopback_target("http://127.9.9.9").port == 80
    assert loopback_target("http://localhost:1/").host == "localhost"

"""The pre-fork master as a real process tree: restarts, SIGTERM, SIGHUP, max_requests,
--reload, orphaned workers. Every process binds 127.0.0.1:0; nothing sleeps to synchronise."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from tests.helpers import TIMEOUT, poll_until
from tests.servers.wsgi.procs import APP, LoadResult, Serve, alive, keepalive_load

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/task"), reason="reads worker pids from Linux /proc"
)

# The SIGHUP and max_requests load: 4 keep-alive client threads, bounded in time and count.
LOAD_THREADS = 4


def run_load(
    port: int, stop: threading.Event, max_requests: int = 20_000, *, until_refused: bool = False
) -> tuple:
    result = LoadResult()
    threads = [
        threading.Thread(
            target=keepalive_load,
            args=(port, stop, result, max_requests),
            kwargs={"until_refused": until_refused},
        )
        for _ in range(LOAD_THREADS)
    ]
    for t in threads:
        t.start()
    return result, threads


def finish_load(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    for t in threads:
        t.join(3 * TIMEOUT)
        assert not t.is_alive()


def test_killed_worker_is_restarted_and_counted(tmp_path):
    with Serve(tmp_path, "--workers", "2", "--metrics-bind", "127.0.0.1:0") as srv:
        before = srv.wait_workers(2)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        poll_until(lambda: victim not in srv.workers() and len(srv.workers()) == 2, 3 * TIMEOUT)
        after = srv.wait_workers(2)
        assert victim not in after
        assert len(after & before) == 1
        assert srv.get("/")[0] == 200
        key = 'netstack_worker_restarts_total{reason="crash"}'
        poll_until(lambda: srv.scrape()[key] == 1)
        assert srv.scrape()["netstack_workers"] == 2
        assert "died (status -9): restarting it" in srv.stderr
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_sigterm_finishes_in_flight_closes_idle_and_exits_0(tmp_path):
    with Serve(tmp_path, "--workers", "1", "--graceful-timeout", "10") as srv:
        srv.wait_workers(1)
        # An idle keep-alive connection: one request answered, then silence.
        idle = srv.connect()
        idle.request("GET", "/")
        assert idle.getresponse().read()
        # A request in flight in the app.
        slow: dict[str, object] = {}

        def call_slow() -> None:
            conn = srv.connect()
            conn.request("GET", "/hold/a")
            resp = conn.getresponse()
            slow["status"], slow["body"] = resp.status, resp.read()
            slow["connection"] = resp.getheader("connection")
            conn.close()

        client = threading.Thread(target=call_slow)
        client.start()
        poll_until(lambda: (tmp_path / "a.started").exists())
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        # The idle connection is closed by the server (EOF), not left to time out.
        assert idle.sock is not None
        idle.sock.settimeout(3 * TIMEOUT)
        assert idle.sock.recv(1) == b""
        idle.close()

        # New connections are refused once the worker stopped accepting.
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT).close()
            except ConnectionRefusedError:
                return True
            return False

        poll_until(refused)
        assert srv.proc.poll() is None  # still finishing the held request
        (tmp_path / "a.release").touch()
        client.join(3 * TIMEOUT)
        assert slow["status"] == 200
        assert b"/hold/a" in slow["body"]  # type: ignore[operator]
        assert slow["connection"] == "close"  # so the client sends nothing more on it
        assert srv.wait() == 0
        assert time.monotonic() - started < 10
        assert "shutting down: 2 connection(s) to finish" in srv.stderr  # idle + busy


def test_sigterm_under_load_breaks_no_request(tmp_path):
    with Serve(tmp_path, "--workers", "2", "--no-access-log") as srv:
        srv.wait_workers(2)
        stop = threading.Event()
        result, threads = run_load(srv.port, stop, until_refused=True)
        try:
            poll_until(lambda: result.ok >= 500)
            srv.signal(signal.SIGTERM)
            assert srv.wait() == 0
            for t in threads:  # each one ends at its first refused connect
                t.join(3 * TIMEOUT)
        finally:
            finish_load(stop, threads)
        print(f"SIGTERM: {result.ok} ok, {result.retries} retries, {result.failures[:3]}")
        # Every request sent got its whole response, or its reused connection closed
        # before any byte of it (a retry, then refused): none broke half-way.
        assert result.failures == []
        assert result.refused == LOAD_THREADS


def test_sigterm_aborts_what_outlives_graceful_timeout(tmp_path):
    with Serve(tmp_path, "--workers", "1", "--graceful-timeout", "0.5") as srv:
        srv.wait_workers(1)
        conn = srv.connect()
        conn.request("GET", "/hold/b")
        poll_until(lambda: (tmp_path / "b.started").exists())
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        with pytest.raises((ConnectionError, OSError)):
            conn.getresponse().read()
        assert srv.wait() == 0
        # graceful_timeout, not the app's 20 s hold, bounded the stop.
        assert time.monotonic() - started < 0.5 + 2 * TIMEOUT
        assert "graceful_timeout=0.5s expired: aborting 1 connection(s)" in srv.stderr
        (tmp_path / "b.release").touch()  # lets the orphaned app thread end, if any


def test_sigterm_while_a_worker_still_imports_the_app_stops_at_once(tmp_path):
    slow_import = (
        "import os, time\n"
        "open('importing', 'w').close()\n"
        "deadline = time.monotonic() + 30\n"
        "while not os.path.exists('go') and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n" + APP
    )
    with Serve(tmp_path, "--graceful-timeout", "10", source=slow_import) as srv:
        poll_until(lambda: (tmp_path / "importing").exists())
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        # Not graceful_timeout + the kill margin: the booting worker got the SIGTERM.
        assert time.monotonic() - started < 5


def test_sighup_twice_under_load_fails_no_request(tmp_path):
    with Serve(tmp_path, "--workers", "2", "--no-access-log") as srv:
        generation0 = srv.wait_workers(2)
        stop = threading.Event()
        load_started = time.monotonic()
        result, threads = run_load(srv.port, stop)
        try:
            poll_until(lambda: result.ok >= 200)
            generations = [generation0]
            for _ in range(2):
                srv.signal(signal.SIGHUP)
                previous = generations[-1]
                poll_until(
                    lambda prev=previous: (
                        len(srv.workers()) == 2 and not srv.workers() & prev and srv._all_serving()
                    ),
                    4 * TIMEOUT,
                )
                generations.append(srv.workers())
                seen = result.ok
                poll_until(lambda seen=seen: result.ok >= seen + 200)  # new workers serve
            # The load lasts a few seconds in all (a duration, not a synchronisation).
            poll_until(lambda: time.monotonic() - load_started >= 3.0)
        finally:
            finish_load(stop, threads)
        print(f"SIGHUP x2: {result.ok} ok, {result.retries} retries, {result.failures[:3]}")
        assert result.failures == []
        answered = {int(p) for p in result.pids}
        assert answered & generations[1]
        assert answered & generations[2]
        assert srv.stderr.count("replacing 2 worker(s)") == 2
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_max_requests_recycles_workers_without_failures(tmp_path):
    args = ["--workers", "1", "--max-requests", "60", "--max-requests-jitter", "20"]
    with Serve(tmp_path, *args, "--no-access-log", "--metrics-bind", "127.0.0.1:0") as srv:
        first = srv.wait_workers(1)
        stop = threading.Event()
        result, threads = run_load(srv.port, stop, max_requests=5_000)
        try:
            # Bounded: until three generations of workers answered (or the poll fails).
            poll_until(lambda: len(result.pids) >= 3, 6 * TIMEOUT)
        finally:
            finish_load(stop, threads)
        print(f"max_requests: {result.ok} ok, {result.retries} retries, {result.failures[:3]}")
        assert result.failures == []
        # The replacement starts once a worker passed its 60 + jitter(0..20) requests; the
        # old one serves on until the new one is ready, so 60 is a floor for each one.
        generations = sorted(result.pids.items(), key=lambda kv: int(kv[0]))
        assert int(generations[0][0]) in first
        assert all(n >= 60 for _, n in generations[:-1]), generations
        key = 'netstack_worker_restarts_total{reason="max_requests"}'
        poll_until(lambda: srv.scrape()[key] >= len(result.pids) - 1)
        assert srv.scrape()['netstack_worker_restarts_total{reason="crash"}'] == 0
        # Retired workers' counts are kept: nothing lost across recycling (each worker
        # sends a last snapshot before it exits).
        get_200 = 'netstack_http_requests_total{method="GET",status="200"}'
        poll_until(lambda: srv.scrape()[get_200] == result.ok)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_reload_restarts_workers_on_source_change(tmp_path):
    with Serve(tmp_path, "--workers", "1", "--reload") as srv:
        first = srv.wait_workers(1)
        assert " v1 " in srv.get("/")[1]
        app = tmp_path / "app.py"
        app.write_text(APP.replace('VERSION = "v1"', 'VERSION = "v2"'))
        touch_later(app)
        poll_until(lambda: " v2 " in srv.get("/")[1], 4 * TIMEOUT)
        poll_until(lambda: not srv.workers() & first)  # the old worker stops
        assert "source changed: restarting workers" in srv.stderr
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def touch_later(path) -> None:
    stamp = time.time() + 2 + path.stat().st_mtime % 1  # a distinct mtime on any clock
    os.utime(path, (stamp, stamp))


def test_broken_code_on_reload_keeps_the_old_workers_serving(tmp_path):
    with Serve(tmp_path, "--workers", "1", "--reload") as srv:
        first = srv.wait_workers(1)
        app = tmp_path / "app.py"
        app.write_text("def app(:\n")  # a SyntaxError
        touch_later(app)
        srv.wait_log("a new worker could not load the app")
        assert srv.workers() == first
        assert " v1 " in srv.get("/")[1]  # still the code it loaded
        app.write_text(APP.replace('VERSION = "v1"', 'VERSION = "v3"'))
        touch_later(app)
        poll_until(lambda: " v3 " in srv.get("/")[1], 6 * TIMEOUT)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert "SyntaxError" in srv.stderr


def test_workers_exit_when_the_master_is_killed(tmp_path):
    with Serve(tmp_path, "--workers", "2") as srv:
        workers = srv.wait_workers(2)
        srv.signal(signal.SIGKILL)
        srv.wait()
        poll_until(lambda: not any(alive(p) for p in workers), 3 * TIMEOUT)


def test_app_that_fails_to_import_exits_3_without_a_restart_loop(tmp_path):
    source = "raise RuntimeError('boom at import')\n"
    srv = Serve(tmp_path, "--workers", "2", source=source, wait_listening=False)
    with srv:
        assert srv.wait() == 3
        err = srv.stderr
        last = err.strip().splitlines()[-1]
        assert last == "netstack: error: cannot load the app app:app: RuntimeError: boom at import"
        assert err.count("started worker pid") == 2  # the two first workers, no restarts
        assert "Traceback" in err  # the app's own error keeps its traceback in the log


def test_missing_attribute_exits_3_with_one_clear_line(tmp_path):
    srv = Serve(tmp_path, app="app:nope", wait_listening=False)
    with srv:
        assert srv.wait() == 3
        assert srv.stderr.strip().splitlines()[-1] == (
            "netstack: error: app: module 'app' has no attribute 'nope'"
        )
        assert "Traceback" not in srv.stderr


async def test_a_connection_accepted_just_before_shutdown_is_answered():
    """The race behind "fresh connection closed without response" during a SIGHUP roll:
    the old worker accepted a connection, then stopped before its request arrived."""
    import asyncio
    from wsgiref.validate import validator

    from netstack.config import WSGIServerConfig
    from netstack.servers.wsgi import WSGIServer
    from tests.helpers import apoll_until

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    cfg = WSGIServerConfig(app="x:app", bind=("127.0.0.1:0",), access_log=False)
    server = WSGIServer(cfg, validator(app))
    await server.start()
    port = server.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # A second, idle keep-alive connection that has served one request.
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await idle_reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
    await apoll_until(lambda: len(server.connections) == 2)
    server.close()
    assert await asyncio.wait_for(idle_reader.read(), TIMEOUT) == b""  # idle: closed now
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), TIMEOUT)  # answered, then closed
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nconnection: close\r\n" in response
    assert response.endswith(b"\r\n\r\nok")
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    writer.close()
    idle_writer.close()

"""Pre-fork workers share connections evenly (servers/wsgi/balance.py).

The table itself in-process; the balance with a real ``netstack serve`` master and two
workers over loopback. Nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import ssl
import time
from collections import Counter
from wsgiref.validate import validator

import pytest

from netstack.servers.wsgi import WSGIServer
from netstack.servers.wsgi.balance import (
    ACCEPTED,
    CELLS,
    CONNECTIONS,
    LISTENING,
    PAUSED,
    PID,
    STALL,
    WAKE,
    LoadSlot,
    LoadTable,
    backlog,
    slack,
)
from tests.helpers import TIMEOUT, apoll_until, poll_until
from tests.servers.wsgi.procs import Serve
from tests.servers.wsgi.support import config, port_of

# Keep-alive connections opened at once in the split tests.
BURST = 40


# ---------------------------------------------------------------------------- the table


def test_slack_is_ten_percent_but_at_least_two():
    assert [slack(n) for n in (0, 1, 19, 20, 29, 30, 100)] == [2, 2, 2, 2, 2, 3, 10]


def test_claim_assign_release_reuse_slots():
    table = LoadTable(2)
    try:
        a, b = table.claim(), table.claim()
        assert (a, b) == (0, 1)
        assert table.claim() is None  # full
        table.assign(a, 101)
        table.cells[a * CELLS + CONNECTIONS] = 7
        assert table.row(a) == (101, 0, 7, 0, 0)
        table.release(a)
        assert table.row(a) == (0, 0, 0, 0, 0)
        assert table.claim() == a
        assert table.row(a)[PID] == -1  # reserved until the fork returns
    finally:
        table.close()


def _peer(table: LoadTable, index: int, *, state: int, connections: int, pid: int = 0) -> None:
    base = index * CELLS
    table.cells[base + PID] = pid or os.getpid()
    table.cells[base + 1] = state
    table.cells[base + CONNECTIONS] = connections


def test_a_worker_pauses_above_the_least_loaded_peer_plus_slack():
    table = LoadTable(3)
    try:
        me = LoadSlot(table, 0)
        _peer(table, 1, state=LISTENING, connections=5)
        _peer(table, 2, state=LISTENING, connections=30)
        assert not me.opened(7)  # 5 + 2
        assert me.opened(8)
        assert table.row(0)[CONNECTIONS] == 8
        # A peer that does not listen (booting, stopping) does not count.
        table.cells[1 * CELLS + 1] = 0
        assert not me.opened(9)
        assert me.least() == 30
        # A full worker gives way to any peer with fewer connections.
        _peer(table, 1, state=LISTENING, connections=11)
        assert not me.over_share(12)
        me.limit = 12
        assert not me.opened(11)
        assert me.opened(12)
        assert me.over_share(12)
    finally:
        table.close()


def test_a_paused_peer_with_fewer_connections_is_woken_once(monkeypatch):
    table = LoadTable(2)
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    try:
        me = LoadSlot(table, 0)
        _peer(table, 1, state=PAUSED, connections=4, pid=4242)
        assert not me.opened(6)
        assert sent == []  # within the slack: nobody to wake
        assert me.opened(7)
        assert me.opened(8)
        assert [pid for pid, _ in sent] == [4242]  # the WAKE cell stops a second signal
        assert table.row(1)[WAKE] == 1
        peer = LoadSlot(table, 1)
        peer.woken()
        assert table.row(1)[WAKE] == 0
    finally:
        table.close()


def test_a_stalled_peer_is_ignored_until_it_accepts_again():
    table = LoadTable(2)
    try:
        me = LoadSlot(table, 0)
        _peer(table, 1, state=LISTENING, connections=0)
        before = me.progress()
        assert me.over_share(5)
        assert not me.moved(before)
        me.stall(before)
        assert not me.over_share(50)
        table.cells[1 * CELLS + ACCEPTED] += 1  # it accepted one
        assert me.moved(before)
        assert me.over_share(5)
        assert me.stalled == {}
    finally:
        table.close()


def test_backlog_reads_the_accept_queue_of_a_tcp_listener(tmp_path):
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        if backlog(listener) < 0:
            pytest.skip("TCP_INFO of a listening socket is Linux only")
        assert backlog(listener) == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            poll_until(lambda: backlog(listener) == 3)
        finally:
            for c in clients:
                c.close()
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "s"))
        unix.listen(1)
        assert backlog(unix) == -1  # unknown


# ---------------------------------------------------------------------------- real workers


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=3 * TIMEOUT)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def server_sockets(port: int) -> int:
    """Connected TCP sockets on the server's side of ``port``: ESTABLISHED, and CLOSE_WAIT
    or LAST_ACK until the worker has closed its end (Linux /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] not in ("0A", "06"):  # LISTEN, TIME_WAIT
                    count += 1
    return count


def split(conns: list[http.client.HTTPConnection]) -> Counter[str]:
    """Connect all of them at once, then ask each which worker serves it."""
    for conn in conns:
        conn.connect()
    pids: Counter[str] = Counter()
    try:
        for conn in conns:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            pids[resp.getheader("X-Pid", "")] += 1
    finally:
        for conn in conns:
            conn.close()
    return pids


def assert_even(pids: Counter[str], workers: set[int]) -> None:
    assert set(pids) == {str(w) for w in workers}, pids
    low, high = min(pids.values()), max(pids.values())
    # The guarantee is slack(low); one more may be accepted before the count is seen.
    assert high - low <= slack(low) + 1, pids


def test_two_workers_split_a_burst_of_keepalive_connections_evenly(tmp_path):
    with Serve(tmp_path, "--workers", "2", "--threads", "0", "--no-access-log") as srv:
        workers = srv.wait_workers(2)
        for _ in range(2):  # the second burst starts from balanced, idle workers
            # The workers count the last burst's connections until they see them close.
            poll_until(lambda: server_sockets(srv.port) == 0)
            assert_even(split([srv.connect() for _ in range(BURST)]), workers)


def test_two_workers_on_a_unix_socket_split_evenly(tmp_path):
    path = str(tmp_path / "web.sock")
    args = ("--workers", "2", "--threads", "0", "--bind", f"unix:{path}")
    with Serve(tmp_path, *args, wait_listening=False) as srv:
        workers = srv.wait_workers(2)
        assert_even(split([UnixHTTPConnection(path) for _ in range(BURST)]), workers)


def test_a_stuck_worker_does_not_hold_up_new_connections(tmp_path):
    # --threads 0: /hold runs on the worker's event loop, which then serves nothing else.
    with Serve(tmp_path, "--workers", "2", "--threads", "0", "--no-access-log") as srv:
        workers = srv.wait_workers(2)
        held = srv.connect()
        held.request("GET", "/hold/stuck")
        poll_until(lambda: (tmp_path / "stuck.started").exists())
        try:
            started = time.monotonic()
            pids = split([srv.connect() for _ in range(10)])
            elapsed = time.monotonic() - started
            # All served by the other worker, well before the hold ends (20 s).
            ((pid, served),) = pids.items()
            assert served == 10
            assert int(pid) in workers
            assert elapsed < TIMEOUT
        finally:
            (tmp_path / "stuck.release").touch()
        resp = held.getresponse()
        assert resp.status == 200
        assert resp.getheader("X-Pid") not in pids
        held.close()


def test_balanced_workers_keep_serving_while_one_stops(tmp_path):
    """SIGHUP under keep-alive connections: the new worker takes the reconnecting
    clients, and the balance never leaves a connection unserved."""
    with Serve(tmp_path, "--workers", "2", "--threads", "0", "--no-access-log") as srv:
        workers = srv.wait_workers(2)
        assert_even(split([srv.connect() for _ in range(10)]), workers)
        poll_until(lambda: server_sockets(srv.port) == 0)
        srv.signal(signal.SIGHUP)
        poll_until(lambda: len(srv.workers() - workers) == 2, 3 * TIMEOUT)
        fresh = srv.wait_workers(2)
        assert_even(split([srv.connect() for _ in range(BURST)]), fresh)


def test_two_workers_with_tls_split_evenly(tmp_path, tls_certs):
    args = ("--workers", "2", "--threads", "0", "--no-access-log")
    tls = ("--certfile", tls_certs.certfile, "--keyfile", tls_certs.keyfile)
    with Serve(tmp_path, *args, *tls, wait_listening=False) as srv:
        srv.port = srv._expect(r"listening on https://127\.0\.0\.1:(\d+)")
        workers = srv.wait_workers(2)
        context = ssl.create_default_context(cafile=tls_certs.cafile)
        conns: list[http.client.HTTPConnection] = [
            http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=3 * TIMEOUT, context=context)
            for _ in range(BURST)
        ]
        assert_even(split(conns), workers)


def test_two_workers_on_ipv6_refuse_only_when_both_are_full(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    args = ("--workers", "2", "--threads", "0", "--max-connections", "3")
    with Serve(tmp_path, *args, "--bind", "[::1]:0", wait_listening=False) as srv:
        srv.port = srv._expect(r"listening on http://\[::1\]:(\d+)")
        workers = srv.wait_workers(2)
        conns = [http.client.HTTPConnection("::1", srv.port, timeout=3 * TIMEOUT) for _ in range(8)]
        for conn in conns:
            conn.connect()
        statuses: Counter[int] = Counter()
        pids: Counter[str] = Counter()
        try:
            for conn in conns:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                statuses[resp.status] += 1
                if resp.status == 200:
                    pids[resp.getheader("X-Pid", "")] += 1
        finally:
            for conn in conns:
                conn.close()
        # A full worker leaves the next connection to the one with room: 3 + 3 served,
        # and only then 503 (max_connections is per worker).
        assert statuses == {200: 6, 503: 2}
        assert pids == {str(w): 3 for w in workers}


# ---------------------------------------------------------------------------- in-process


async def test_a_paused_server_listens_again_when_a_peer_catches_up_or_stalls():
    """One in-process server with slot 0; slot 1 is a listening peer the test writes."""

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    table = LoadTable(2)
    peer = 1 * CELLS
    table.cells[peer + PID] = os.getpid()
    table.cells[peer + 1] = LISTENING  # with 0 connections
    slot = LoadSlot(table, 0)
    server = WSGIServer(config(), validator(app), load_slot=slot)
    await server.start()
    port = port_of(server)
    clients: list[asyncio.StreamWriter] = []

    async def get() -> asyncio.Future[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clients.append(writer)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return asyncio.ensure_future(reader.readuntil(b"ok"))

    try:
        for _ in range(3):
            assert (await asyncio.wait_for(await get(), TIMEOUT)).startswith(b"HTTP/1.1 200")
        assert server.paused  # 3 > 0 + slack 2
        assert table.row(0)[1] == PAUSED
        # The 4th waits in the accept queue until the peer catches up.
        fourth = await get()
        await apoll_until(lambda: backlog(server.sockets[0]) in (1, -1))
        assert not fourth.done()
        table.cells[peer + CONNECTIONS] = 5
        table.cells[peer + ACCEPTED] = 5
        assert (await asyncio.wait_for(fourth, TIMEOUT)).startswith(b"HTTP/1.1 200")
        assert server.pauses == 1
        # Now the peer stops accepting (0 connections again, its count never moves): the
        # server pauses, and after STALL serves the waiting connection itself.
        table.cells[peer + CONNECTIONS] = 0
        assert (await asyncio.wait_for(await get(), TIMEOUT)).startswith(b"HTTP/1.1 200")
        assert server.pauses == 2
        assert server.paused
        started = time.monotonic()
        assert (await asyncio.wait_for(await get(), TIMEOUT)).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started >= STALL
        assert slot.stalled == {peer: 5}
        assert not server.paused
        server.close()
        await server.wait_closed()
        assert table.row(0)[1] == 0  # CLOSED
    finally:
        server.close()
        await server.wait_closed()
        for writer in clients:
            writer.close()
        table.close()
